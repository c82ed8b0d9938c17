"""The load the worker sheds, counted in the app's `gateway_shed_requests_total{reason}`.

Each reason is an answer (or a drop) the worker makes itself, so the app's own request
metrics never see it: a 503 written by the main loop is no `gateway_requests_total` sample.
A connection that closes, or idles out, before sending any byte of a head is not counted:
that is how kept-alive connections end, not load refused.
"""

from __future__ import annotations

from typing import Any, Protocol

# 503: no request thread started it within QUEUE_TIMEOUT (every thread was busy).
QUEUE_TIMEOUT = "queue_timeout"
# 408: its head had begun but was not complete within CLIENT_HEADER_TIMEOUT.
HEADER_TIMEOUT = "header_timeout"
# 431: its head grew past the most gunicorn's parser would ever accept.
HEADER_TOO_LARGE = "header_too_large"
# Dropped: it took no byte of its answer (or sent none of its body) for CLIENT_WRITE_TIMEOUT.
SLOW_CLIENT = "slow_client"
# 503: it reached a worker draining after SIGTERM or a reload.
DRAINING = "draining"
# 503: a scrape of /metrics beyond the few already waiting for the scrape thread.
SCRAPE_BUSY = "scrape_busy"

REASONS = (QUEUE_TIMEOUT, HEADER_TIMEOUT, HEADER_TOO_LARGE, SLOW_CLIENT, DRAINING, SCRAPE_BUSY)


class ShedCounter(Protocol):
    def __call__(self, reason: str, count: int = 1) -> None: ...


def shed_counter(app: Any) -> ShedCounter:
    """The app's `GatewayMetrics.shed`, every reason's series started at 0 in this process
    (so that a rate is 0, not absent, until something is shed), or a no-op without metrics.

    Called in the worker, after the fork: with PROMETHEUS_MULTIPROC_DIR the zeros go to this
    worker's own files (the server package imports no app module: it is reached through
    the app's extensions, as the worker reaches its settings)."""
    metrics = getattr(app, "extensions", {}).get("gateway.metrics")
    shed: ShedCounter | None = getattr(metrics, "shed", None)
    if shed is None:
        return _not_counted
    for reason in REASONS:
        shed(reason, 0)
    return shed


def _not_counted(reason: str, count: int = 1) -> None:
    pass
