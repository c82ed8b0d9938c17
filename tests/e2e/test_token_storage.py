"""Token counters in a real Redis Cluster (redis+cluster://): one node holding every slot."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from gateway.policy.keys import Caller
from gateway.policy.tokens import TokenBudget
from tests.e2e.conftest import free_port, wait_for_port


@pytest.fixture
def cluster_url(tmp_path: Path) -> Iterator[str]:
    server = shutil.which("redis-server")
    if server is None:
        pytest.fail("redis-server is not installed: run the suite with `make test`")
    port = free_port()
    # The cluster bus port defaults to port + 10000, past 65535 for a high free port (redis
    # then exits 1): name a free one of its own.
    bus_port = free_port()
    process = subprocess.Popen(
        [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--cluster-enabled", "yes", "--cluster-config-file", str(tmp_path / "nodes.conf"),
         "--cluster-port", str(bus_port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_for_port(port, process)
        node = redis.Redis(host="127.0.0.1", port=port)
        node.execute_command("CLUSTER", "ADDSLOTSRANGE", 0, 16383)
        for _ in range(200):  # bounded: the node's cluster cron marks it ok within ~1 s
            if b"cluster_state:ok" in node.execute_command("CLUSTER", "INFO"):
                break
            time.sleep(0.05)
        else:
            pytest.fail("the one-node cluster never reached cluster_state:ok")
        yield f"redis+cluster://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(10)


def test_reading_several_keys_counters_keeps_the_cluster_storage_in_use(cluster_url: str) -> None:
    budget = TokenBudget(cluster_url)
    team_a, team_b = Caller("key_team_a", tpm=100), Caller("key_team_b", tpm=100)
    budget.reserve(team_a, 10)
    budget.reserve(team_b, 3)

    # What /v1/usage and every /metrics scrape do: the keys' counters sit in other slots.
    assert budget.read([team_a, team_b]) == [[10, 10, 10], [3, 3, 3]]
    assert budget.up
    assert budget.reserve(team_a, 10).used == (20, 20, 20)  # still the shared count
