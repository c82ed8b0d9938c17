"""Prometheus metrics (prometheus-client) and the `/metrics` route.

Each app gets its own registry, so tests can build many apps. With several gunicorn workers,
set PROMETHEUS_MULTIPROC_DIR: values then live in shared files and `/metrics` aggregates them.
"""

from __future__ import annotations

import re
import threading

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
from prometheus_client.registry import Collector

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
        # --- per key (issue #9): `key` is the key's name, or its key_id for env keys ---
        self.tokens = Counter(
            "gateway_tokens",
            "Tokens used (reported by the provider, or estimated when it reported none)",
            ["kind", "key", "model", "provider"],
            registry=r,
        )
        self.key_requests = Counter(
            "gateway_key_requests",
            "Authenticated requests answered",
            ["key", "model", "provider", "status"],
            registry=r,
        )
        self.key_rejections = Counter(
            "gateway_key_rejections",
            "Requests a key's rules refused",
            ["key", "reason"],
            registry=r,
        )
        # Clients choose model names: only so many become label values.
        self.model_label = BoundedLabel(200)
        # Read at scrape time (the quota gauges read the shared token counters).
        self._live: list[Collector] = []

    def add_live_collector(self, collector: Collector) -> None:
        self._live.append(collector)
        self.registry.register(collector)

    def exposition(self) -> bytes:
        if self.multiproc_dir:
            registry = CollectorRegistry()
            MultiProcessCollector(registry, path=self.multiproc_dir)
            for collector in self._live:
                registry.register(collector)
            return generate_latest(registry)
        return generate_latest(self.registry)


class BoundedLabel:
    """A client-chosen value as a label: plain and short, and at most `size` distinct ones
    per process; anything else is "other", so a client cannot create unbounded series.
    Only values the provider accepted (`may_add`) become new labels: a key sending made-up
    model names cannot use up the set."""

    _PLAIN = re.compile(r"[A-Za-z0-9._:/@+-]{1,100}")

    def __init__(self, size: int) -> None:
        self._size = size
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, value: str | None, may_add: bool = True) -> str:
        if not value or not self._PLAIN.fullmatch(value):
            return "other"
        if value in self._seen:
            return value
        if not may_add:
            return "other"
        with self._lock:
            if len(self._seen) < self._size:
                self._seen.add(value)
                return value
        return "other"


bp = Blueprint("metrics", __name__)


@bp.get("/metrics")
def metrics() -> Response:
    exposition = current_app.extensions["gateway.metrics"].exposition()
    return Response(exposition, content_type=CONTENT_TYPE_LATEST)
