"""Prometheus metrics (prometheus-client) and the `/metrics` route.

Each app gets its own registry, so tests can build many apps. With several gunicorn workers,
set PROMETHEUS_MULTIPROC_DIR: values then live in shared files and `/metrics` aggregates them.
With METRICS_KEY set, `/metrics` answers only `Authorization: Bearer <METRICS_KEY>`: a
scrape reads every worker's files and the quota counters, which anonymous loops once turned
into a slowdown of every tenant's requests; without the key it is a 401 that reads nothing.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable
from typing import Generic, TypeVar

from flask import Blueprint, Response, current_app, request
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
from gateway.errors import GatewayError

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
_Metric = TypeVar("_Metric", Counter, Histogram)
_TTFB_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class GatewayMetrics:
    def __init__(self, settings: Settings) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        # The digest of METRICS_KEY (None: /metrics is public).
        self._key_digest = _digest(settings.metrics_key) if settings.metrics_key else None
        self.multiproc_dir = settings.prometheus_multiproc_dir
        r = self.registry
        # --- routing (issue #10): `provider` is the provider that answered ("none" if no
        # provider was reached); `model` a configured public name, "other" or "none".
        self.model_names = frozenset(
            route.name for route in settings.routes if not route.is_pattern
        )
        # Called before each scrape (the router turns cooldowns that ended off).
        self.before_scrape: list[Callable[[], object]] = []
        self.requests = Counter(
            "gateway_requests",
            "Requests answered",
            ["route", "method", "status", "provider", "model"],
            registry=r,
        )
        self.latency = Histogram(
            "gateway_request_duration_seconds",
            "Time from request to the last byte sent",
            ["route", "provider", "model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_errors = Counter(
            "gateway_upstream_errors",
            "Upstream failures by kind",
            ["kind", "provider", "model"],
            registry=r,
        )
        self.stream_ttfb = Histogram(
            "gateway_stream_ttfb_seconds",
            "Time from request to the first streamed byte",
            ["provider", "model"],
            buckets=_TTFB_BUCKETS,
            registry=r,
        )
        self.attempts = Counter(
            "gateway_upstream_attempts",
            "Requests sent to a provider, by outcome (ok, connect, timeout, rate_limited, "
            "server_error, arrearage, provider_auth, stream_broken)",
            ["provider", "model", "outcome"],
            registry=r,
        )
        self.fallbacks = Counter(
            "gateway_fallbacks",
            "Times the next deployment was tried; provider is the one that failed",
            ["provider", "model", "reason"],
            registry=r,
        )
        self.cooldown = Gauge(
            "gateway_deployment_cooldown",
            "1 while a deployment is cooling down (skipped) in this process",
            ["provider", "upstream_model"],
            registry=r,
            multiprocess_mode="livemax",
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
        # Money (issue #17): in the prices' currency; the access line has the exact decimal.
        self.cost = Counter(
            "gateway_cost",
            "What answers cost, from their usage and the price of the deployment that served",
            ["key", "team", "model", "provider"],
            registry=r,
        )
        self.key_rejections = Counter(
            "gateway_key_rejections",
            "Requests a key's rules refused",
            ["key", "reason"],
            registry=r,
        )
        # Load the server shed (issue #18): answers and drops the worker (gateway/server/)
        # makes itself, which no request metric sees. The worker names the reasons
        # (gateway/server/shedding.py) and counts them through shed().
        self.shed_requests = Counter(
            "gateway_shed_requests",
            "Requests the server refused or dropped to protect its capacity, by reason "
            "(queue_timeout, header_timeout, header_too_large, slow_client, draining, "
            "scrape_busy)",
            ["reason"],
            registry=r,
        )
        self._shed_by_reason: dict[str, Counter] = {}
        # What every request counts, by its labels (see Children).
        self.requests_for = Children(self.requests)
        self.latency_for = Children(self.latency)
        self.stream_ttfb_for = Children(self.stream_ttfb)
        self.key_requests_for = Children(self.key_requests)
        self.tokens_for = Children(self.tokens)
        self.cost_for = Children(self.cost)
        self._attempts_for = Children(self.attempts)
        # Read at scrape time (the quota gauges read the shared token counters).
        self._live: list[Collector] = []

    def add_live_collector(self, collector: Collector) -> None:
        self._live.append(collector)
        self.registry.register(collector)

    def model_label(self, model: str | None) -> str:
        """A bounded `model` label: configured public names, else "other" (or "none")."""
        if not model:
            return "none"
        return model if model in self.model_names else "other"

    def attempted(self, provider: str, model: str, outcome: str) -> None:
        self._attempts_for(provider, self.model_label(model), outcome).inc()

    def fell_back(self, provider: str, model: str, reason: str) -> None:
        self.fallbacks.labels(provider, self.model_label(model), reason).inc()

    def cooldown_changed(self, deployment: tuple[str, str], cooling: bool) -> None:
        self.cooldown.labels(*deployment).set(1 if cooling else 0)

    def shed(self, reason: str, count: int = 1) -> None:
        """Count requests the worker shed. Called on its main loop, which must never wait:
        a dict look-up and an add (an mmap write with PROMETHEUS_MULTIPROC_DIR)."""
        child = self._shed_by_reason.get(reason)
        if child is None:  # the worker's few reasons, each looked up once
            child = self._shed_by_reason[reason] = self.shed_requests.labels(reason)
        child.inc(count)

    def allows(self, authorization: str) -> bool:
        """Whether a scrape with this Authorization header may read the metrics."""
        if self._key_digest is None:
            return True
        scheme, _, token = authorization.partition(" ")
        # Digests compared, so the time does not depend on how much of the key matched.
        presented = _digest(token.strip()) if scheme.lower() == "bearer" else b""
        return hmac.compare_digest(presented, self._key_digest)

    def exposition(self) -> bytes:
        for step in self.before_scrape:
            step()
        if self.multiproc_dir:
            registry = CollectorRegistry()
            MultiProcessCollector(registry, path=self.multiproc_dir)
            for collector in self._live:
                registry.register(collector)
            return generate_latest(registry)
        return generate_latest(self.registry)


class Children(Generic[_Metric]):
    """A labelled metric's children, each looked up once.

    prometheus-client checks the label values and takes a lock on every `labels()` call;
    a request makes eight of them. The children are the ones its registry keeps anyway,
    so this holds no more series than the labels allow.
    """

    def __init__(self, metric: _Metric) -> None:
        self._metric: _Metric = metric
        self._found: dict[tuple[str, ...], _Metric] = {}

    def __call__(self, *values: str) -> _Metric:
        child = self._found.get(values)
        if child is None:
            child = self._found[values] = self._metric.labels(*values)
        return child


bp = Blueprint("metrics", __name__)


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


@bp.get("/metrics")
def metrics() -> Response:
    gateway_metrics: GatewayMetrics = current_app.extensions["gateway.metrics"]
    if not gateway_metrics.allows(request.headers.get("Authorization", "")):
        raise GatewayError(
            401,
            "Send METRICS_KEY as 'Authorization: Bearer <key>' to read the metrics.",
            code="invalid_api_key",
        )
    return Response(gateway_metrics.exposition(), content_type=CONTENT_TYPE_LATEST)
