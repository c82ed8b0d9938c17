"""Metrics under real gunicorn with two workers (issue 19 items 3 and 6): the storage gauge
tells the truth in multi-process mode and its shipped alert follows a real Redis outage in
a real Prometheus; /metrics answers only its key."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.constants import GATEWAY_KEY
from tests.e2e.conftest import Gateway, GatewayFactory, RedisServer
from tests.monitoring.conftest import METRICS_KEY, Prometheus, start_prometheus, wait_until

pytestmark = pytest.mark.e2e

SCRAPE = {"Authorization": f"Bearer {METRICS_KEY}"}
AUTH = {"Authorization": f"Bearer {GATEWAY_KEY}"}
ALERT = "AIGatewayRateLimitStorageDown"


@pytest.fixture
def two_workers(
    start_gateway: GatewayFactory, redis_server: RedisServer, tmp_path: Path
) -> Gateway:
    shared = tmp_path / "h19b_multiproc"
    shared.mkdir()
    return start_gateway(
        GUNICORN_WORKERS="2",
        PROMETHEUS_MULTIPROC_DIR=str(shared),
        RATE_LIMIT_STORAGE_URI=redis_server.url,
        RATE_LIMIT_REQUESTS_PER_MINUTE="100000",
        METRICS_KEY=METRICS_KEY,
    )


@pytest.fixture
def prometheus(two_workers: Gateway, tmp_path: Path) -> Iterator[Prometheus]:
    directory = tmp_path / "h19b_prometheus"
    directory.mkdir()
    started = start_prometheus(directory, two_workers.url.removeprefix("http://"))
    yield started
    started.stop()


def storage_up(gateway: Gateway) -> float:
    text = requests.get(gateway.url + "/metrics", headers=SCRAPE, timeout=5).text
    line = next(x for x in text.splitlines() if x.startswith("gateway_rate_limit_storage_up"))
    return float(line.rsplit(" ", 1)[1])


def traffic(gateway: Gateway, count: int = 20) -> None:
    """New connections each: the kernel spreads them over both workers."""
    for _ in range(count):
        requests.get(gateway.url + "/v1/models", headers=AUTH, timeout=10).close()


def prometheus_value(prometheus: Prometheus, promql: str) -> float | None:
    result = prometheus.query(promql)
    return float(result[0]["value"][1]) if result else None


def test_metrics_answer_only_their_key(two_workers: Gateway) -> None:
    anonymous = requests.get(two_workers.url + "/metrics", timeout=5)
    assert anonymous.status_code == 401
    assert anonymous.json()["error"]["code"] == "invalid_api_key"
    assert requests.get(two_workers.url + "/metrics", headers=SCRAPE, timeout=5).ok


def test_storage_gauge_and_its_alert_follow_redis_with_two_workers(
    two_workers: Gateway, redis_server: RedisServer, prometheus: Prometheus
) -> None:
    traffic(two_workers)
    # Before: 0 while Redis was up (each worker's file said 0), and the alert always fired.
    assert [storage_up(two_workers) for _ in range(10)] == [1.0] * 10
    up = 'min(gateway_rate_limit_storage_up{job="ai-gateway"})'
    wait_until(
        lambda: prometheus_value(prometheus, up) == 1.0, 20, "Prometheus to see 1", prometheus.logs
    )
    alerts = f'ALERTS{{alertname="{ALERT}"}}'
    assert prometheus.query(alerts) == []

    redis_server.process.terminate()
    redis_server.process.wait(10)
    stopped = time.monotonic()
    traffic(two_workers)

    wait_until(lambda: storage_up(two_workers) == 0.0, 10, "the gauge to be 0", two_workers.logs)
    wait_until(
        lambda: prometheus_value(prometheus, up) == 0.0, 15, "Prometheus to see 0", prometheus.logs
    )
    # The shipped rule holds `for: 2m`: pending within seconds of the outage.
    wait_until(
        lambda: bool(prometheus.query(f'ALERTS{{alertname="{ALERT}", alertstate="pending"}}')),
        15,
        f"{ALERT} to be pending",
        prometheus.logs,
    )
    assert time.monotonic() - stopped < 40
