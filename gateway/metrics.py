"""Prometheus metrics (prometheus-client) and the `/metrics` route.

Each app gets its own registry, so tests can build many apps. With several gunicorn workers,
set PROMETHEUS_MULTIPROC_DIR: values then live in shared files and `/metrics` aggregates them.
"""

from __future__ import annotations

from flask import Blueprint, Response, current_app
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector

from gateway.config import Settings

# Long tail on purpose: a non-streamed reasoning answer can take minutes.
_LATENCY_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
    120,
    300,
    600,
)
_TTFB_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class GatewayMetrics:
    def __init__(self, settings: Settings) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.multiproc_dir = settings.prometheus_multiproc_dir
        r = self.registry
        self.requests = Counter(
            "gateway_requests",
            "Requests answered",
            ["route", "method", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "gateway_request_duration_seconds",
            "Time from request to the last byte sent",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_errors = Counter(
            "gateway_upstream_errors", "Upstream failures by kind", ["kind"], registry=r
        )
        self.stream_ttfb = Histogram(
            "gateway_stream_ttfb_seconds",
            "Time from request to the first streamed byte",
            buckets=_TTFB_BUCKETS,
            registry=r,
        )
        self.streams_in_flight = Gauge(
            "gateway_streams_in_flight",
            "Streams open right now",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.rate_limit_storage_up = Gauge(
            "gateway_rate_limit_storage_up",
            "1 while the rate-limit storage answers; 0 while limits are held per process",
            registry=r,
            multiprocess_mode="livemin",
        )
        self.tokens = Counter(
            "gateway_tokens", "Tokens reported by the upstream", ["kind"], registry=r
        )

    def exposition(self) -> bytes:
        if self.multiproc_dir:
            registry = CollectorRegistry()
            MultiProcessCollector(registry, path=self.multiproc_dir)
            return generate_latest(registry)
        return generate_latest(self.registry)


bp = Blueprint("metrics", __name__)


@bp.get("/metrics")
def metrics() -> Response:
    exposition = current_app.extensions["gateway.metrics"].exposition()
    return Response(exposition, content_type=CONTENT_TYPE_LATEST)
