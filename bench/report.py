"""Measurements, the issue's targets, and the markdown table that compares them."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass

MB = 1024 * 1024


@dataclass(frozen=True)
class Measurement:
    """One side (direct or gateway) of one scenario."""

    requests: int
    seconds: float
    p50: float
    p99: float
    errors: int
    error_detail: str
    # CPU and RSS of the server side: the upstream for direct calls, the gateway tree else.
    cpu_seconds: float
    peak_rss: int
    peak_pss: int = 0
    ttfb_p50: float | None = None
    ttfb_p99: float | None = None
    # long-N: SSE events in a full stream, and received in all streams (failed ones too).
    chunks: int = 0
    events: int = 0
    # CPU of the bench's other processes meanwhile: the upstream (unless it is the server),
    # the load generator, a redis-server. On shared cores it is taken from the server.
    bench_cpu_seconds: float = 0.0
    # Each gateway worker's CPU over the measured interval (the master's is not in it).
    worker_cpu_seconds: tuple[float, ...] = ()

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def cpu_per_request(self) -> float:
        # long-N: the CPU of a full stream's worth of chunks, so that the work done for
        # streams that then failed is not charged to the ones that completed.
        if self.chunks and self.events:
            return self.cpu_seconds / self.events * self.chunks
        return self.cpu_seconds / self.requests if self.requests else float("inf")

    @property
    def cpu_per_chunk(self) -> float | None:
        return self.cpu_seconds / self.events if self.events else None

    @property
    def cores_busy(self) -> float:
        """The server's CPU over the wall-clock time: 1.0 is one core fully used."""
        return self.cpu_seconds / self.seconds if self.seconds else 0.0

    @property
    def per_cpu_second(self) -> float:
        """Requests one fully busy core would serve per second at this CPU cost."""
        return self.requests / self.cpu_seconds if self.cpu_seconds else float("inf")


@dataclass(frozen=True)
class LimitCheck:
    """A key limited to `limit` requests a minute was sent `sent` at once."""

    limit: int
    sent: int
    admitted: int  # 200 with the upstream's body
    refused: int  # 429
    other: str  # any other outcome, "kind: n, ..."
    # Each worker's CPU seconds during the burst: all of them > 0 means all took part.
    worker_cpu: tuple[float, ...]

    @property
    def exact(self) -> bool:
        return self.admitted == self.limit and self.refused == self.sent - self.limit

    def describe(self) -> str:
        other = f", other: {self.other}" if self.other else ""
        workers = " / ".join(f"{cpu * 1000:.0f}" for cpu in self.worker_cpu)
        return (
            f"{self.admitted} of {self.sent} admitted, {self.refused} x 429{other}"
            f" (workers' CPU ms meanwhile: {workers})"
        )


@dataclass(frozen=True)
class Result:
    scenario: str
    direct: Measurement
    gateway: Measurement
    gateway_cores: int
    # The floor of the gateway's own stack (bench/calibration_app.py), when measured.
    calibration: Measurement | None = None
    # How this run's scenario differs from the one its targets are written for (--quick).
    note: str = ""
    # Dialect scenarios: the same upstream chat stream relayed by the same gateway, in the
    # same run; `gateway` is then the translated (or bridged) stream.
    chat: Measurement | None = None
    # teams-* and scale-*: the same load through the gateway set up otherwise (the plain
    # gateway; one worker), same run; what `gateway` is compared with (bench/baseline.py).
    baseline: Measurement | None = None
    baseline_cores: int = 1
    limit: LimitCheck | None = None


Check = Callable[[Result], bool]


def over_baseline(result: Result, metric: str) -> float:
    """`metric` of the gateway over the baseline's; inf if there is none."""
    if result.baseline is None:
        return float("inf")
    baseline = getattr(result.baseline, metric)
    return getattr(result.gateway, metric) / baseline if baseline else float("inf")


def _no_errors(result: Result) -> bool:
    baseline = result.baseline.errors if result.baseline is not None else 0
    return result.gateway.errors == 0 and baseline == 0


def _cpu_over_plain(limit: float) -> list[tuple[str, Check]]:
    return [
        (
            f"<= {limit}x plain gateway",
            lambda r: over_baseline(r, "cpu_per_request") <= limit,
        )
    ]


# (scenario, metric) -> [(target text, check)]. Metric names match the table's rows. The
# long-*, calibration and stream-200 p99 +50 ms targets are issue #8's.
TARGETS: dict[tuple[str, str], list[tuple[str, Check]]] = {
    ("json-c16", "errors"): [("0", lambda r: r.gateway.errors == 0)],
    ("json-c64", "req/s"): [
        (">= 2,000 per gateway core", lambda r: r.gateway.rps / r.gateway_cores >= 2000)
    ],
    ("json-c64", "CPU ms/request"): [
        ("<= 0.5", lambda r: r.gateway.cpu_per_request <= 0.0005),
        ("<= 1.3x calibration (#18)", lambda r: _over_calibration(r) <= 1.3),
    ],
    ("json-c64", "errors"): [("0", lambda r: r.gateway.errors == 0)],
    ("stream-50", "errors"): [("0", lambda r: r.gateway.errors == 0)],
    ("stream-200", "TTFB p50 ms"): [("<= +2 ms", lambda r: _ttfb_added(r, "p50") <= 0.002)],
    ("stream-200", "TTFB p99 ms"): [
        ("<= +10 ms", lambda r: _ttfb_added(r, "p99") <= 0.010),
        ("<= +50 ms (#8)", lambda r: _ttfb_added(r, "p99") <= 0.050),
    ],
    ("stream-200", "CPU ms/request"): [
        ("<= 1.0", lambda r: r.gateway.cpu_per_request <= 0.001),
        ("<= 2x calibration (#18)", lambda r: _over_calibration(r) <= 2.0),
    ],
    ("stream-200", "errors"): [("0", lambda r: r.gateway.errors == 0)],
    ("stream-1000", "errors"): [("0, bodies identical", lambda r: r.gateway.errors == 0)],
    ("stream-1000", "peak RSS MB"): [("<= 120", lambda r: r.gateway.peak_rss <= 120 * MB)],
    ("long-1000", "errors"): [("0, bodies identical", lambda r: r.gateway.errors == 0)],
    ("long-1000", "TTFB p50 ms"): [("<= +10 ms", lambda r: _ttfb_added(r, "p50") <= 0.010)],
    ("long-1000", "TTFB p99 ms"): [("<= +50 ms", lambda r: _ttfb_added(r, "p99") <= 0.050)],
    ("long-2000", "errors"): [("0, bodies identical", lambda r: r.gateway.errors == 0)],
    ("long-2000", "TTFB p50 ms"): [("<= +20 ms", lambda r: _ttfb_added(r, "p50") <= 0.020)],
    ("long-2000", "TTFB p99 ms"): [("<= +100 ms", lambda r: _ttfb_added(r, "p99") <= 0.100)],
    # Per chunk, so that --quick's shorter streams are held to the same rate (stricter:
    # their set-up is spread over fewer chunks).
    ("long-2000", "CPU ms/request"): [
        ("<= 3.5 per 50-chunk stream", lambda r: (r.gateway.cpu_per_chunk or 1.0) * 51 <= 0.0035)
    ],
    ("long-2000", "peak RSS MB"): [("<= 250", lambda r: r.gateway.peak_rss <= 250 * MB)],
    ("long-4000-redis", "errors"): [("0", lambda r: r.gateway.errors == 0)],
    # Issue #18 (bench/setups.py): the teams config costs little over the plain gateway
    # with the same load in the same run; two workers scale; the limits still hold.
    ("teams-json-c64", "CPU ms/request"): _cpu_over_plain(1.1),
    ("teams-json-c64", "errors"): [("0", _no_errors)],
    ("teams-stream-200", "CPU ms/request"): _cpu_over_plain(1.1),
    ("teams-stream-200", "errors"): [("0", _no_errors)],
    ("teams-json-c64-redis", "CPU ms/request"): _cpu_over_plain(1.5),
    ("teams-json-c64-redis", "errors"): [("0", _no_errors)],
    ("teams-stream-200-redis", "CPU ms/request"): _cpu_over_plain(1.5),
    ("teams-stream-200-redis", "errors"): [("0", _no_errors)],
    ("scale-json", "req/s"): [(">= 1.7x one worker", lambda r: over_baseline(r, "rps") >= 1.7)],
    ("scale-json", "errors"): [("0", _no_errors)],
    ("scale-json", "rpm limit exact"): [
        ("the limit, no more", lambda r: r.limit is not None and r.limit.exact)
    ],
    ("scale-json-pinned", "req/s"): [
        (">= 1.7x one worker", lambda r: over_baseline(r, "rps") >= 1.7)
    ],
    ("scale-json-pinned", "errors"): [("0", _no_errors)],
    ("scale-long", "errors"): [("0, bodies identical", _no_errors)],
}


def _over_calibration(result: Result) -> float:
    """Gateway CPU per request over the calibration relay's; inf if it was not measured."""
    if result.calibration is None or not result.calibration.requests:
        return float("inf")
    return result.gateway.cpu_per_request / result.calibration.cpu_per_request


def _ttfb_added(result: Result, which: str) -> float:
    direct = getattr(result.direct, f"ttfb_{which}") or 0.0
    gateway = getattr(result.gateway, f"ttfb_{which}") or 0.0
    return gateway - direct


def percentile(values: Sequence[float], pct: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    if math.inf in values:  # streams that never started: nearest rank, no interpolation
        ordered = sorted(values)
        return ordered[max(0, math.ceil(pct / 100 * len(ordered)) - 1)]
    return statistics.quantiles(values, n=100, method="inclusive")[round(pct) - 1]


def format_ms(seconds: float | None) -> str:
    if seconds == math.inf:
        return "none (timed out)"
    return "—" if seconds is None else f"{seconds * 1000:.2f}"


def format_ratio(gateway: float | None, direct: float | None) -> str:
    if gateway is None or not direct or not math.isfinite(gateway) or not math.isfinite(direct):
        return "—"
    return f"{gateway / direct:.2f}x"


Row = tuple[str, str, str, str, str, str]


def _rows(result: Result) -> list[Row]:
    """(metric, direct, gateway, gateway/direct, calibration, gateway/calibration)."""
    d, g, c = result.direct, result.gateway, result.calibration
    rows: list[Row] = []

    def add(
        metric: str,
        show: Callable[[Measurement], str],
        value: Callable[[Measurement], float | None],
    ) -> None:
        calibration = show(c) if c is not None else "—"
        over = format_ratio(value(g), value(c)) if c is not None else "—"
        rows.append((metric, show(d), show(g), format_ratio(value(g), value(d)), calibration, over))

    add("req/s", lambda m: f"{m.rps:,.0f}", lambda m: m.rps)
    add("req/s per CPU-second", lambda m: f"{m.per_cpu_second:,.0f}", lambda m: m.per_cpu_second)
    add("latency p50 ms", lambda m: format_ms(m.p50), lambda m: m.p50)
    add("latency p99 ms", lambda m: format_ms(m.p99), lambda m: m.p99)
    if d.ttfb_p50 is not None and g.ttfb_p50 is not None:
        for which in ("p50", "p99"):
            add(
                f"TTFB {which} ms",
                lambda m, w=which: format_ttfb(m, d, w),
                lambda m, w=which: getattr(m, f"ttfb_{w}"),
            )
    add("errors", lambda m: f"{m.errors}{m.error_detail}", lambda m: None)
    add("CPU ms/request", lambda m: f"{m.cpu_per_request * 1000:.3f}", lambda m: m.cpu_per_request)
    if g.chunks:
        add("CPU µs/chunk", lambda m: format_us(m.cpu_per_chunk), lambda m: m.cpu_per_chunk)
    add("peak RSS MB", lambda m: f"{m.peak_rss / MB:.1f}", lambda m: m.peak_rss)
    add("peak PSS MB", lambda m: f"{m.peak_pss / MB:.1f}", lambda m: m.peak_pss)
    return rows


def format_ttfb(m: Measurement, direct: Measurement, which: str) -> str:
    """TTFB, and for a relay the time it adds over the direct call: `12.30 (+12.10)`."""
    value = getattr(m, f"ttfb_{which}")
    if m is direct or value is None or value == math.inf:
        return format_ms(value)
    return f"{value * 1000:.2f} (+{(value - getattr(direct, f'ttfb_{which}')) * 1000:.2f})"


def format_us(seconds: float | None) -> str:
    return "—" if seconds is None else f"{seconds * 1e6:.1f}"


def table(results: Sequence[Result]) -> tuple[str, list[str]]:
    """The markdown table, and the targets that were missed."""
    lines = [
        "| scenario | metric | direct | gateway | gateway/direct | calibration"
        " | gateway/calibration | target | met? |",
        "|---|---|---:|---:|---:|---:|---:|---|---|",
    ]
    missed = []
    for result in results:
        name = f"{result.scenario} ({result.note})" if result.note else result.scenario
        for metric, *values in _rows(result):
            targets, verdicts = [], []
            for target, check in TARGETS.get((result.scenario, metric), []):
                ok = check(result)
                targets.append(target)
                verdicts.append("yes" if ok else "**NO**")
                if not ok:
                    missed.append(f"{name} {metric} (target {target})")
            row = [name, metric, *values, "; ".join(targets), "; ".join(verdicts)]
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines), missed


# Issues #14 and #15: a translated stream costs at most this much CPU over the chat relay.
DIALECT_CPU_LIMIT = 1.5


def _over_chat(result: Result) -> float:
    chat = result.chat
    if chat is None or not chat.requests or not result.gateway.requests:
        return float("inf")
    return result.gateway.cpu_per_request / chat.cpu_per_request


DialectRow = tuple[str, str, str, str, str, str, bool | None]


def _dialect_rows(r: Result) -> list[DialectRow]:
    """(metric, direct chat, gateway chat, gateway dialect, dialect/chat, target, met)."""
    d, c, g = r.direct, r.chat, r.gateway
    assert c is not None
    cpu = f"<= {DIALECT_CPU_LIMIT}x chat relayed"
    over = _over_chat(r)
    rows: list[DialectRow] = [
        ("streams/s", *(f"{m.rps:,.0f}" for m in (d, c, g)), format_ratio(g.rps, c.rps), "", None),
        (
            "CPU ms/stream",
            "—",
            f"{c.cpu_per_request * 1000:.3f}",
            f"{g.cpu_per_request * 1000:.3f}",
            f"**{over:.2f}x**" if math.isfinite(over) else "—",
            cpu,
            over <= DIALECT_CPU_LIMIT,
        ),
    ]
    for which in ("p50", "p99"):
        shown = [format_ttfb(m, d, which) for m in (d, c, g)]
        ratio = format_ratio(getattr(g, f"ttfb_{which}"), getattr(c, f"ttfb_{which}"))
        rows.append((f"TTFB {which} ms", *shown, ratio, "", None))
    errors = [f"{m.errors}{m.error_detail}" for m in (d, c, g)]
    rows.append(("errors", *errors, "—", "0, bodies checked", c.errors + g.errors == 0))
    # One process serves both, alternating: one peak.
    rows.append(("peak RSS MB", "—", "(same process)", f"{g.peak_rss / MB:.1f}", "—", "", None))
    return rows


def dialect_table(results: Sequence[Result]) -> tuple[str, list[str]]:
    """Translated streams against the same chat stream relayed: the table, targets missed."""
    if not results:
        return "", []
    lines = [
        "| scenario | metric | direct (chat) | gateway: chat relayed | gateway: translated"
        " | translated/chat | target | met? |",
        "|---|---|---:|---:|---:|---:|---|---|",
    ]
    missed = []
    for result in results:
        for metric, *values, target, met in _dialect_rows(result):
            verdict = "" if met is None else "yes" if met else "**NO**"
            if met is False:
                missed.append(f"{result.scenario} {metric} (target {target})")
            lines.append(
                "| " + " | ".join([result.scenario, metric, *values, target, verdict]) + " |"
            )
    return "\n".join(lines), missed


def dialect_ratios(results: Sequence[Result]) -> str:
    """One line: each translated stream's CPU over the same chat stream relayed."""
    found = [f"{r.scenario} {_over_chat(r):.2f}x" for r in results if r.chat is not None]
    if not found:
        return ""
    return (
        "Gateway CPU per translated stream over the same chat stream relayed (same gateway,"
        f" same run; target <= {DIALECT_CPU_LIMIT}x): " + ", ".join(found) + "."
    )


def floor_ratios(results: Sequence[Result]) -> str:
    """One line: the gateway's CPU per request over the floor of its own stack."""
    found = [
        f"{r.scenario} {r.gateway.cpu_per_request / r.calibration.cpu_per_request:.2f}x"
        for r in results
        if r.calibration is not None and r.calibration.requests and r.gateway.requests
    ]
    if not found:
        return ""
    return (
        "Gateway CPU per request over the calibration relay's (the floor of Flask +"
        " requests + gunicorn gthread, same settings, same run): " + ", ".join(found) + "."
    )


LEGEND = """\
- *direct*: the load generator calls the fake upstream itself; *gateway*: the same calls
  through the gateway, which relays them to that upstream. Both measured in this run.
- *req/s per CPU-second*: 1 / CPU per request, the rate one fully busy core would serve;
  unlike req/s it does not drop when other processes take CPU from the server.
- *CPU ms/request*: utime+stime from /proc of the server side (the upstream process for
  direct, gunicorn master + workers for gateway) over the measured interval, per request.
- *peak RSS*: the largest sampled sum of RSS of those processes (pages the worker shares
  with the master count twice: an upper bound); *peak PSS* splits shared pages instead.
- *TTFB*: request sent to first body byte received; `(+x)` is the time the relay adds.
- *calibration*: the smallest Flask + `requests` relay (bench/calibration_app.py: one view,
  one pooled adapter) under gunicorn gthread with the gateway's worker, thread and
  keep-alive settings; gateway/calibration is the gateway's cost over that floor.
- *long-N*: N clients each open one stream, all within the ramp in the header; every
  stream is timed, and one still queued or unfinished after its timeout is an error. TTFB
  percentiles count every stream (failed ones too; "none" when the percentile falls on a
  stream that never got a byte). *CPU µs/chunk*: CPU over all SSE events received;
  *CPU ms/request* is that times the events of one full stream.
- *messages-/responses-stream-N*: the stream-N chat stream asked for through
  `/v1/messages` (translated) or `/v1/responses` (bridged, `store: false`), alternating
  with that chat stream relayed in one gateway process (chat, translated, translated, chat,
  half the stream duration each); *translated/chat* is the CPU per stream of the one over
  the other. Translated bodies carry fresh ids: they are
  checked (every text piece in order, the closing event), not compared byte for byte.
- *teams-… and scale-…*: the gateway set up as teams run it (bench/setups.py: a
  GATEWAY_CONFIG with two providers on the fake upstream, an alias that rewrites the
  model, a key with rpm, tpm and a daily token quota too high to refuse) against a
  baseline gateway with the same load in the same run: for teams the plain gateway of
  json-c64 / stream-200, for scale one worker pinned to one core (scale-json-pinned:
  the bench pins each of the two workers to a core of its own). *server cores busy*:
  the server's CPU over the wall-clock time; *bench cores busy*: the same for the
  upstream, the load generator and redis-server, which share the cores with the
  two-worker gateway; *CPU s by worker*: each worker's share. *rpm limit exact*: after
  the load, a key limited to N requests a minute sends 3N at once, each on its own
  connection: exactly N must pass, whichever worker they reach.
- JSON load: wrk (1 thread, keep-alive). Streams: bench/streams.py, keep-alive connections
  running streams back to back; every body is compared with the upstream's bytes."""
