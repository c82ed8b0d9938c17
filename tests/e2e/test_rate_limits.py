"""Rate limits hold exactly under concurrency: across threads, workers and instances."""

from __future__ import annotations

import re
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

from tests.constants import GATEWAY_KEY, SECOND_GATEWAY_KEY
from tests.e2e.conftest import Gateway, GatewayFactory, RedisServer


def burst(gateways: list[Gateway], total: int, key: str = GATEWAY_KEY) -> Counter[int]:
    """`total` concurrent requests, spread round-robin over `gateways`."""
    headers = {"Authorization": f"Bearer {key}"}

    def one(i: int) -> int:
        url = gateways[i % len(gateways)].url + "/v1/models"
        return requests.get(url, headers=headers, timeout=30).status_code

    with ThreadPoolExecutor(max_workers=min(total, 64)) as pool:
        return Counter(pool.map(one, range(total), timeout=120))


def test_concurrent_burst_admits_exactly_n_in_memory(start_gateway: GatewayFactory) -> None:
    gateway = start_gateway(RATE_LIMIT_REQUESTS_PER_MINUTE="25", GUNICORN_THREADS="64")
    statuses = burst([gateway], 120)
    assert statuses == Counter({200: 25, 429: 95})
    # Each key has its own budget.
    assert burst([gateway], 30, key=SECOND_GATEWAY_KEY) == Counter({200: 25, 429: 5})


def test_workers_sharing_redis_admit_exactly_n(
    start_gateway: GatewayFactory, redis_url: str, tmp_path: Path
) -> None:
    metrics_dir = tmp_path / "prometheus"
    metrics_dir.mkdir()
    gateway = start_gateway(
        RATE_LIMIT_REQUESTS_PER_MINUTE="30",
        RATE_LIMIT_STORAGE_URI=redis_url,
        GUNICORN_WORKERS="2",
        GUNICORN_THREADS="32",
        PROMETHEUS_MULTIPROC_DIR=str(metrics_dir),
    )
    assert burst([gateway], 100) == Counter({200: 30, 429: 70})
    # One scrape reaches one worker, yet counts the requests both workers answered.
    assert scraped_requests(gateway, "/v1/models") == {"200": 30.0, "429": 70.0}


def scraped_requests(gateway: Gateway, route: str) -> dict[str, float]:
    """Requests by status from /metrics, once the last access lines are counted (bounded)."""
    pattern = re.compile(
        rf'gateway_requests_total{{method="GET",(?:[^}}]*,)?route="{route}",'
        rf'status="(\d+)"[^}}]*}} (\S+)'
    )
    deadline = time.monotonic() + 10
    counts: dict[str, float] = {}
    while time.monotonic() < deadline:
        text = requests.get(gateway.url + "/metrics", timeout=10).text
        counts = {status: float(value) for status, value in pattern.findall(text)}
        if sum(counts.values()) >= 100:
            break
        time.sleep(0.1)
    return counts


def test_two_instances_sharing_redis_admit_exactly_n_together(
    start_gateway: GatewayFactory, redis_url: str
) -> None:
    settings = {"RATE_LIMIT_REQUESTS_PER_MINUTE": "40", "RATE_LIMIT_STORAGE_URI": redis_url}
    first = start_gateway(**settings)
    second = start_gateway(**settings)
    statuses = burst([first, second], 120)
    assert statuses == Counter({200: 40, 429: 80})
    ready = [requests.get(g.url + "/ready", timeout=5) for g in (first, second)]
    assert [r.status_code for r in ready] == [200, 200]


def test_memory_storage_with_several_workers_is_refused(start_gateway: GatewayFactory) -> None:
    try:
        start_gateway(GUNICORN_WORKERS="2")
    except RuntimeError as failure:
        assert "RATE_LIMIT_STORAGE_URI" in str(failure)
    else:
        raise AssertionError("gunicorn started with memory:// and two workers")


def test_redis_dying_under_load_costs_the_limit_never_an_answer(
    start_gateway: GatewayFactory, redis_server: RedisServer
) -> None:
    gateway = start_gateway(
        RATE_LIMIT_REQUESTS_PER_MINUTE="100000",
        RATE_LIMIT_STORAGE_URI=redis_server.url,
        GUNICORN_THREADS="16",
        LOG_LEVEL="INFO",
    )
    headers = {"Authorization": f"Bearer {GATEWAY_KEY}"}
    body = {"model": "qwen-plus", "messages": [{"role": "user", "content": "hi"}]}
    stop = time.monotonic() + 6

    def load(_: int) -> list[requests.Response]:
        answers = []
        with requests.Session() as session:
            while time.monotonic() < stop and len(answers) < 2000:
                url = gateway.url + "/v1/chat/completions"
                answers.append(session.post(url, json=body, headers=headers, timeout=30))
        return answers

    with ThreadPoolExecutor(8) as pool:
        running = [pool.submit(load, i) for i in range(8)]
        time.sleep(2)
        log_before_kill = len(gateway.logs().splitlines())
        redis_server.process.kill()  # mid-load, no goodbye
        redis_server.process.wait(10)
        time.sleep(1)
        ready = requests.get(gateway.url + "/ready", timeout=5)
        answers = [a for future in running for a in future.result(timeout=60)]

    statuses = Counter(a.status_code for a in answers)
    assert statuses[200] == len(answers) > 100, statuses  # every answered request delivered
    assert all(a.json()["choices"] for a in answers)
    assert ready.status_code == 200
    assert ready.json()["checks"]["rate_limit_storage"].startswith("unreachable")
    scraped = requests.get(gateway.url + "/metrics", timeout=5).text
    assert "gateway_rate_limit_storage_up 0.0" in scraped
    after_kill = gateway.logs().splitlines()[log_before_kill:]
    not_access = [line for line in after_kill if '"event":"access"' not in line]
    assert len(not_access) <= 20, not_access[:5]  # one line per state change, not per request
    assert "Traceback" not in gateway.logs()
