"""The teams-* and scale-* table: the gateway set up one way against another, same run.

Each row shows the direct call, the baseline gateway (the plain one for teams-*, one worker
pinned for scale-*), the gateway as the scenario sets it up, and the ratio of those two;
the targets are report.TARGETS'. A baseline measured by an earlier scenario of the run
(json-c64's gateway for teams-json-c64) is reused, not measured again.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

from bench.report import (
    MB,
    TARGETS,
    Measurement,
    Result,
    format_ms,
    format_ratio,
    format_ttfb,
    format_us,
    over_baseline,
)

# (metric, direct, baseline gateway, gateway, gateway/baseline)
Row = tuple[str, str, str, str, str]


def _rows(result: Result) -> list[Row]:
    d, b, g = result.direct, result.baseline, result.gateway
    assert b is not None
    rows: list[Row] = []

    def add(
        metric: str,
        show: Callable[[Measurement], str],
        value: Callable[[Measurement], float | None],
    ) -> None:
        rows.append((metric, show(d), show(b), show(g), format_ratio(value(g), value(b))))

    add("req/s", lambda m: f"{m.rps:,.0f}", lambda m: m.rps)
    add("req/s per CPU-second", lambda m: f"{m.per_cpu_second:,.0f}", lambda m: m.per_cpu_second)
    add("latency p50 ms", lambda m: format_ms(m.p50), lambda m: m.p50)
    add("latency p99 ms", lambda m: format_ms(m.p99), lambda m: m.p99)
    if g.ttfb_p50 is not None and b.ttfb_p50 is not None:
        for which in ("p50", "p99"):
            add(
                f"TTFB {which} ms",
                partial(format_ttfb, direct=d, which=which),
                partial(_ttfb, which=which),
            )
    add("errors", lambda m: f"{m.errors}{m.error_detail}", lambda m: None)
    add("CPU ms/request", lambda m: f"{m.cpu_per_request * 1000:.3f}", lambda m: m.cpu_per_request)
    if g.chunks:
        add("CPU µs/chunk", lambda m: format_us(m.cpu_per_chunk), lambda m: m.cpu_per_chunk)
    if result.gateway_cores != result.baseline_cores:
        # Whether the server or the bench's own processes ran out of CPU.
        add("server cores busy", lambda m: f"{m.cores_busy:.2f}", lambda m: m.cores_busy)
        add("bench cores busy", lambda m: f"{_bench_busy(m):.2f}", _bench_busy)
        rows.append(("CPU s by worker", "—", _by_worker(b), _by_worker(g), "—"))
    add("peak RSS MB", lambda m: f"{m.peak_rss / MB:.1f}", lambda m: m.peak_rss)
    add("peak PSS MB", lambda m: f"{m.peak_pss / MB:.1f}", lambda m: m.peak_pss)
    if result.limit is not None:
        rows.append(("rpm limit exact", "—", "—", result.limit.describe(), "—"))
    return rows


def _ttfb(m: Measurement, which: str) -> float | None:
    return getattr(m, f"ttfb_{which}")


def _by_worker(m: Measurement) -> str:
    return " / ".join(f"{cpu:.2f}" for cpu in m.worker_cpu_seconds) or "—"


def _bench_busy(m: Measurement) -> float:
    return m.bench_cpu_seconds / m.seconds if m.seconds else 0.0


def baseline_table(results: Sequence[Result]) -> tuple[str, list[str]]:
    """The table, a line per scenario on its set-ups, and the targets missed."""
    if not results:
        return "", []
    lines = [
        "| scenario | metric | direct | gateway: baseline | gateway | gateway/baseline"
        " | target | met? |",
        "|---|---|---:|---:|---:|---:|---|---|",
    ]
    missed = []
    for result in results:
        for metric, *values in _rows(result):
            targets, verdicts = [], []
            for target, check in TARGETS.get((result.scenario, metric), []):
                ok = check(result)
                targets.append(target)
                verdicts.append("yes" if ok else "**NO**")
                if not ok:
                    missed.append(f"{result.scenario} {metric} (target {target})")
            row = [result.scenario, metric, *values, "; ".join(targets), "; ".join(verdicts)]
            lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    lines.extend(f"- {result.scenario}: {result.note}" for result in results)
    return "\n".join(lines), missed


def baseline_ratios(results: Sequence[Result]) -> str:
    """One line: each scenario's CPU per request and req/s over its baseline's."""
    found = [
        f"{r.scenario} CPU/request {over_baseline(r, 'cpu_per_request'):.2f}x,"
        f" req/s {over_baseline(r, 'rps'):.2f}x"
        for r in results
        if r.baseline is not None
    ]
    if not found:
        return ""
    return (
        "Gateway over its baseline (teams config over the plain gateway, two workers over one;"
        " same load, same run): " + "; ".join(found) + "."
    )
