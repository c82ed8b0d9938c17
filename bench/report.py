"""Measurements, the issue's targets, and the markdown table that compares them."""

from __future__ import annotations

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

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def cpu_per_request(self) -> float:
        return self.cpu_seconds / self.requests if self.requests else float("inf")

    @property
    def per_cpu_second(self) -> float:
        """Requests one fully busy core would serve per second at this CPU cost."""
        return self.requests / self.cpu_seconds if self.cpu_seconds else float("inf")


@dataclass(frozen=True)
class Result:
    scenario: str
    direct: Measurement
    gateway: Measurement
    gateway_cores: int


Check = Callable[[Result], bool]
# (scenario, metric) -> (target text, check). Metric names match the table's rows.
TARGETS: dict[tuple[str, str], tuple[str, Check]] = {
    ("json-c16", "errors"): ("0", lambda r: r.gateway.errors == 0),
    ("json-c64", "req/s"): (
        ">= 2,000 per gateway core",
        lambda r: r.gateway.rps / r.gateway_cores >= 2000,
    ),
    ("json-c64", "CPU ms/request"): ("<= 0.5", lambda r: r.gateway.cpu_per_request <= 0.0005),
    ("json-c64", "errors"): ("0", lambda r: r.gateway.errors == 0),
    ("stream-50", "errors"): ("0", lambda r: r.gateway.errors == 0),
    ("stream-200", "TTFB p50 ms"): ("<= +2 ms", lambda r: _ttfb_added(r, "p50") <= 0.002),
    ("stream-200", "TTFB p99 ms"): ("<= +10 ms", lambda r: _ttfb_added(r, "p99") <= 0.010),
    ("stream-200", "CPU ms/request"): ("<= 1.0", lambda r: r.gateway.cpu_per_request <= 0.001),
    ("stream-200", "errors"): ("0", lambda r: r.gateway.errors == 0),
    ("stream-1000", "errors"): ("0, bodies identical", lambda r: r.gateway.errors == 0),
    ("stream-1000", "peak RSS MB"): ("<= 120", lambda r: r.gateway.peak_rss <= 120 * MB),
}


def _ttfb_added(result: Result, which: str) -> float:
    direct = getattr(result.direct, f"ttfb_{which}") or 0.0
    gateway = getattr(result.gateway, f"ttfb_{which}") or 0.0
    return gateway - direct


def percentile(values: Sequence[float], pct: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[round(pct) - 1]


def _ms(seconds: float | None) -> str:
    return "—" if seconds is None else f"{seconds * 1000:.2f}"


def _ratio(gateway: float | None, direct: float | None) -> str:
    if gateway is None or not direct:
        return "—"
    return f"{gateway / direct:.2f}x"


def _rows(result: Result) -> list[tuple[str, str, str, str]]:
    """(metric, direct, gateway, ratio) for one scenario."""
    d, g = result.direct, result.gateway
    rows = [
        ("req/s", f"{d.rps:,.0f}", f"{g.rps:,.0f}", _ratio(g.rps, d.rps)),
        (
            "req/s per CPU-second",
            f"{d.per_cpu_second:,.0f}",
            f"{g.per_cpu_second:,.0f}",
            _ratio(g.per_cpu_second, d.per_cpu_second),
        ),
        ("latency p50 ms", _ms(d.p50), _ms(g.p50), _ratio(g.p50, d.p50)),
        ("latency p99 ms", _ms(d.p99), _ms(g.p99), _ratio(g.p99, d.p99)),
    ]
    if d.ttfb_p50 is not None and g.ttfb_p50 is not None:
        for which in ("p50", "p99"):
            dv, gv = getattr(d, f"ttfb_{which}"), getattr(g, f"ttfb_{which}")
            added = f"{gv * 1000:.2f} (+{(gv - dv) * 1000:.2f})"
            rows.append((f"TTFB {which} ms", _ms(dv), added, _ratio(gv, dv)))
    rows += [
        ("errors", str(d.errors) + d.error_detail, str(g.errors) + g.error_detail, "—"),
        (
            "CPU ms/request",
            f"{d.cpu_per_request * 1000:.3f}",
            f"{g.cpu_per_request * 1000:.3f}",
            _ratio(g.cpu_per_request, d.cpu_per_request),
        ),
        (
            "peak RSS MB",
            f"{d.peak_rss / MB:.1f}",
            f"{g.peak_rss / MB:.1f}",
            _ratio(g.peak_rss, d.peak_rss),
        ),
        (
            "peak PSS MB",
            f"{d.peak_pss / MB:.1f}",
            f"{g.peak_pss / MB:.1f}",
            _ratio(g.peak_pss, d.peak_pss),
        ),
    ]
    return rows


def table(results: Sequence[Result]) -> tuple[str, list[str]]:
    """The markdown table, and the targets that were missed."""
    lines = [
        "| scenario | metric | direct | gateway | gateway/direct | target | met? |",
        "|---|---|---:|---:|---:|---|---|",
    ]
    missed = []
    for result in results:
        for metric, direct, gateway, ratio in _rows(result):
            target, met = "", ""
            if (result.scenario, metric) in TARGETS:
                target, check = TARGETS[result.scenario, metric]
                ok = check(result)
                met = "yes" if ok else "**NO**"
                if not ok:
                    missed.append(f"{result.scenario} {metric} (target {target})")
            row = [result.scenario, metric, direct, gateway, ratio, target, met]
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines), missed


LEGEND = """\
- *direct*: the load generator calls the fake upstream itself; *gateway*: the same calls
  through the gateway, which relays them to that upstream. Both measured in this run.
- *req/s per CPU-second*: 1 / CPU per request, the rate one fully busy core would serve;
  unlike req/s it does not drop when other processes take CPU from the server.
- *CPU ms/request*: utime+stime from /proc of the server side (the upstream process for
  direct, gunicorn master + workers for gateway) over the measured interval, per request.
- *peak RSS*: the largest sampled sum of RSS of those processes (pages the worker shares
  with the master count twice: an upper bound); *peak PSS* splits shared pages instead.
- *TTFB*: request sent to first body byte received; `(+x)` is the time the gateway adds.
- JSON load: wrk (1 thread, keep-alive). Streams: bench/streams.py, keep-alive connections
  running streams back to back; every body is compared with the upstream's bytes."""
