"""Quotas that outlive a worker, under real gunicorn: a killed worker's reservation is released
within TOKEN_RESERVATION_TTL, and the day's tokens survive a SIGHUP and a restart, with
memory:// (the SQLite TOKEN_STORE_FILE) and with redis:// (a real redis-server, run with
the manifests' own persistence flags)."""

from __future__ import annotations

import math
import os
import shutil
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import requests
import yaml

from gateway.policy.keys import Caller
from gateway.policy.tokens import TokenBudget
from tests.e2e.conftest import REPO, Gateway, GatewayFactory, free_port, wait_for_port
from tests.e2e.test_keys import ADMIN, KEYS_ENV, TEAM, burst, config, cost_of

CHAT = "/v1/chat/completions"


@pytest.fixture(params=["sqlite", "redis"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, str]:
    """The environment naming where the token windows live."""
    if request.param == "redis":
        return {"RATE_LIMIT_STORAGE_URI": request.getfixturevalue("redis_url")}
    return {"TOKEN_STORE_FILE": str(tmp_path / "quotas.sqlite3")}


def day_tokens(gateway: Gateway) -> int:
    usage = requests.get(gateway.url + "/v1/usage", headers=ADMIN, timeout=5)
    assert usage.status_code == 200, usage.text
    return int(next(k for k in usage.json()["keys"] if k["key"] == "team-a")["day"]["tokens"])


def worker_pids(gateway: Gateway) -> set[int]:
    """The master's live children (its workers), read from /proc."""
    pids = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # the process ended while we looked
            continue
        state, ppid = text.rsplit(")", 1)[1].split()[:2]
        if int(ppid) == gateway.process.pid and state != "Z":
            pids.add(int(stat.parent.name))
    return pids


def wait_for(condition: Callable[[], Any], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def answered(gateway: Gateway) -> bool:
    try:
        return requests.get(gateway.url + "/health", timeout=1).status_code == 200
    except requests.RequestException:
        return False


def test_a_killed_workers_reservation_is_released_within_the_ttl(
    start_gateway: GatewayFactory, storage: dict[str, str]
) -> None:
    gateway = start_gateway(
        config(tokens_per_day=100_000), TOKEN_RESERVATION_TTL="8", **storage, **KEYS_ENV
    )
    body = {"model": "qwen-plus", "stream": True, "messages": [], "max_tokens": 5000}
    body["fake"] = {"chunks": 100, "delay": 0.2}  # 20 s: killed long before its end
    stream = requests.post(
        gateway.url + CHAT,
        data=orjson.dumps(body),
        headers={**TEAM, "Content-Type": "application/json"},
        stream=True,
        timeout=30,
    )
    assert stream.status_code == 200
    lines = stream.iter_lines()  # kept: a dropped iterator closes the connection
    next(lines)  # under way
    killed_at = time.monotonic()
    held = day_tokens(gateway)
    assert held > 5000  # its estimate: the body's tokens plus max_tokens

    workers = worker_pids(gateway)
    for pid in workers:
        os.kill(pid, signal.SIGKILL)  # mid-stream: nothing will ever settle it
    stream.close()
    wait_for(lambda: (pids := worker_pids(gateway)) and not pids & workers, "a new worker")
    wait_for(lambda: answered(gateway), "the new worker to answer")

    assert time.monotonic() - killed_at < 8, "the new worker took too long to test the hold"
    assert day_tokens(gateway) == held  # the store outlived the worker, and so did the hold
    wait_for(lambda: day_tokens(gateway) == 0, "the reservation's release", timeout=20)
    assert time.monotonic() - killed_at < 8 + 10  # within the TTL (plus polling)


def spend_the_day(gateway: Gateway) -> int:
    """Requests until the day's quota refuses one; the tokens then used."""
    usage = {"prompt_tokens": 300, "completion_tokens": 100, "total_tokens": 400}
    body = orjson.dumps({"model": "qwen-plus", "messages": [], "fake": {"usage": usage}})
    headers = {**TEAM, "Content-Type": "application/json"}
    for _ in range(10):  # bounded: 1,000 tokens at 400 a request
        answer = requests.post(gateway.url + CHAT, data=body, headers=headers, timeout=10)
        if answer.status_code == 429:
            assert answer.json()["error"]["code"] == "insufficient_quota"
            return day_tokens(gateway)
        assert answer.status_code == 200
    raise AssertionError("the day's quota never refused a request")


def refused(gateway: Gateway) -> bool:
    body = orjson.dumps({"model": "qwen-plus", "messages": []})
    answer = requests.post(gateway.url + CHAT, data=body, headers=TEAM, timeout=10)
    return answer.status_code == 429 and answer.json()["error"]["code"] == "insufficient_quota"


def test_the_days_quota_survives_a_hup_and_a_restart(
    start_gateway: GatewayFactory, storage: dict[str, str]
) -> None:
    gateway = start_gateway(config(tokens_per_day=1000), **storage, **KEYS_ENV)
    used = spend_the_day(gateway)
    assert used == 1200

    workers = worker_pids(gateway)
    gateway.process.send_signal(signal.SIGHUP)
    wait_for(lambda: (pids := worker_pids(gateway)) and not pids & workers, "new workers")
    wait_for(lambda: answered(gateway), "the new workers to answer")
    assert day_tokens(gateway) == used
    assert refused(gateway)

    assert gateway.stop() == 0
    again = start_gateway(config(tokens_per_day=1000), **storage, **KEYS_ENV)
    assert day_tokens(again) == used
    assert refused(again)


def test_two_workers_on_memory_share_one_exact_quota(
    start_gateway: GatewayFactory, tmp_path: Path
) -> None:
    metrics = tmp_path / "metrics"
    metrics.mkdir()
    gateway = start_gateway(
        config(tokens_per_day=400),
        GUNICORN_WORKERS="2",
        GUNICORN_THREADS="32",
        RATE_LIMIT_REQUESTS_PER_MINUTE="0",  # a request limit would still need Redis
        PROMETHEUS_MULTIPROC_DIR=str(metrics),
        **KEYS_ENV,
    )

    answers = burst([gateway], 40, max_tokens=0)  # each costs its prompt: ceil(1000 / c)

    statuses = Counter(a.status_code for a in answers)
    cost = cost_of(answers)
    assert statuses == Counter({200: math.ceil(400 / cost), 429: 40 - math.ceil(400 / cost)})
    assert day_tokens(gateway) == statuses[200] * cost  # each worker reads the same


def manifest_redis_args() -> dict[str, list[str]]:
    """The redis-server flags of the Compose file and of the Kubernetes manifest."""
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    documents = list(yaml.safe_load_all((REPO / "k8s-deployment.yaml").read_text()))
    redis = next(
        d for d in documents if d and d["kind"] == "Deployment" and "redis" in d["metadata"]["name"]
    )
    container = redis["spec"]["template"]["spec"]["containers"][0]
    return {
        "compose": compose["services"]["redis"]["command"][1:],
        "kubernetes": container["args"][1:],
    }


@pytest.fixture
def persistent_redis(tmp_path: Path) -> Iterator[Callable[[list[str]], str]]:
    """Starts redis-server with given flags, data in tmp_path; stopped (SIGTERM) at the end."""
    server = shutil.which("redis-server")
    if server is None:
        pytest.fail("redis-server is not installed: run the suite with `make test`")
    started: list[subprocess.Popen[bytes]] = []
    port = free_port()

    def start(flags: list[str]) -> str:
        for process in started:  # a restart: the previous one stops as a pod's would
            if process.poll() is None:
                process.terminate()
                process.wait(10)
        process = subprocess.Popen(
            [server, *flags, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(tmp_path)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        started.append(process)
        wait_for_port(port, process)
        return f"redis://127.0.0.1:{port}/0"

    yield start
    for process in started:
        if process.poll() is None:
            process.terminate()
        process.wait(10)


@pytest.mark.parametrize("manifest", ["compose", "kubernetes"])
def test_the_manifests_redis_keeps_quotas_across_its_restart(
    persistent_redis: Callable[[list[str]], str], manifest: str
) -> None:
    flags = manifest_redis_args()[manifest]
    caller = Caller("key_durable", tokens_per_month=10_000)
    budget = TokenBudget(persistent_redis(flags))
    budget.settle(budget.reserve(caller, 100), 4321)

    restarted = TokenBudget(persistent_redis(flags))  # the Redis pod restarted

    assert restarted.read([caller])[0][1:] == [4321, 4321]
    assert restarted.up


def test_redis_releases_a_reservation_at_its_deadline_and_never_twice(
    redis_url: str,
) -> None:
    budget = TokenBudget(redis_url, hold_seconds=60)
    caller = Caller("key_lua", tokens_per_day=1000)
    now = time.time()
    late = budget.reserve(caller, 400, now=now)
    budget.reserve(caller, 300, now=now + 30)

    assert budget.read([caller], now=now + 59)[0][1] == 700
    assert budget.read([caller], now=now + 60)[0][1] == 300  # the first one's deadline
    budget.settle(late, 10, now=now + 61)  # already released: not twice
    assert budget.read([caller], now=now + 61)[0][1] == 310
