"""A real Prometheus (Debian's `prometheus`, installed by `make test`) on loopback.

It is started with the shipped scrape configuration and alert rules, pointed at a gateway
started by the test, and stopped at teardown by its PID.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from tests.e2e.conftest import free_port
from tests.monitoring.promql import RULES, SCRAPE_CONFIG


@dataclass
class Prometheus:
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def query(self, promql: str) -> list[dict[str, Any]]:
        """An instant query's result; a query Prometheus refuses fails the test."""
        answer = requests.get(self.url + "/api/v1/query", params={"query": promql}, timeout=10)
        body = answer.json()
        assert body["status"] == "success", f"{promql}: {body.get('error')}"
        return body["data"]["result"]

    def api(self, path: str, **params: str) -> Any:
        body = requests.get(self.url + "/api/v1/" + path, params=params, timeout=10).json()
        assert body["status"] == "success", body
        return body["data"]

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


# The gateways these tests start require it on /metrics, as the shipped config sends it.
METRICS_KEY = "metrics-key-for-tests-7d1c"


def start_prometheus(directory: Path, target: str) -> Prometheus:
    """Prometheus scraping `target` (host:port) every second, with monitoring/'s rules and
    its scrape job's metrics key file (METRICS_KEY) beside the configuration."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("prometheus is not installed: run the suite with `make test`")
    config = yaml.safe_load(SCRAPE_CONFIG.read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config["rule_files"] = [str(RULES)]
    (job,) = config["scrape_configs"]
    job["static_configs"] = [{"targets": [target]}]
    (directory / job["authorization"]["credentials_file"]).write_text(METRICS_KEY + "\n")
    config_path = directory / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config))
    port = free_port()
    log_path = directory / "prometheus.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={config_path}",
                f"--storage.tsdb.path={directory / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    prometheus = Prometheus(f"http://127.0.0.1:{port}", process, log_path)
    try:
        wait_until(lambda: _ready(prometheus), 30, "Prometheus to be ready", prometheus.logs)
    except BaseException:
        prometheus.stop()
        raise
    return prometheus


def _ready(prometheus: Prometheus) -> bool:
    if prometheus.process.poll() is not None:
        raise RuntimeError(f"prometheus exited:\n{prometheus.logs()}")
    try:
        return requests.get(prometheus.url + "/-/ready", timeout=1).status_code == 200
    except (requests.ConnectionError, requests.Timeout):
        return False


def wait_until(
    condition: Callable[[], bool], timeout: float, what: str, details: Callable[[], str]
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}:\n{details()}")
