"""End-to-end fixtures: a fake provider on loopback, real gunicorn, real redis-server.

Every process a test starts is stopped at teardown, by its PID.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.constants import GATEWAY_KEY, SECOND_GATEWAY_KEY, UPSTREAM_KEY
from tests.fake_upstream import FakeUpstream

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
# The README's start command, run from the repository root.
START_COMMAND = ["gunicorn", "-c", "gunicorn.conf.py", "app:app"]

pytestmark = pytest.mark.e2e


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_env(**overrides: str) -> dict[str, str]:
    """A clean environment: nothing from the developer's shell or .env leaks in."""
    env = {
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "HOME": os.environ.get("HOME", "/tmp"),
        "ENV_FILE": "",
        "TARGET_API_KEY": UPSTREAM_KEY,
        "GATEWAY_API_KEYS": f"{GATEWAY_KEY},{SECOND_GATEWAY_KEY}",
        "LOG_LEVEL": "DEBUG",
        "LOG_FORMAT": "json",
        "GUNICORN_THREADS": "32",
    }
    env.update(overrides)
    return env


@dataclass
class Gateway:
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")

    def access_line(self, request_id: str, timeout: float = 15.0) -> dict[str, Any]:
        """The access line of `request_id`, waited for (bounded): it is written once the
        answer's last byte is sent, which may be just after the client has read it."""
        deadline = time.monotonic() + timeout
        while True:
            for line in self.logs().splitlines():
                if line.startswith("{") and request_id in line:
                    entry = json.loads(line)
                    if entry.get("event") == "access" and entry.get("request_id") == request_id:
                        return dict(entry)
            if time.monotonic() > deadline:
                raise AssertionError(f"no access line for {request_id}:\n{self.logs()[-4000:]}")
            time.sleep(0.05)

    def stop(self, timeout: float = 30) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        return self.process.returncode


@dataclass
class GatewayFactory:
    tmp_path: Path
    upstream_url: str
    started: list[Gateway] = field(default_factory=list)

    def __call__(self, config: str | None = None, **env: str | None) -> Gateway:
        """A gateway with `env` over the base environment (a variable given as None is
        removed from it); `config`: the text of a GATEWAY_CONFIG file."""
        port = free_port()
        if config is not None:
            path = self.tmp_path / f"gateway-{port}.yaml"
            path.write_text(config)
            env = {"GATEWAY_CONFIG": str(path), **env}
        # Each gateway its own token store, unless a test shares one (a restart).
        store = str(self.tmp_path / f"tokens-{port}.sqlite3")
        full_env = base_env(
            PORT=str(port), TARGET_API_URL=self.upstream_url, TOKEN_STORE_FILE=store
        )
        for name, value in env.items():
            if value is None:
                full_env.pop(name, None)
            else:
                full_env[name] = value
        log_path = self.tmp_path / f"gateway-{port}.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                START_COMMAND, cwd=REPO, env=full_env, stdout=log, stderr=subprocess.STDOUT
            )
        gateway = Gateway(f"http://127.0.0.1:{port}", process, log_path)
        self.started.append(gateway)
        wait_until_healthy(gateway)
        return gateway

    def stop_all(self) -> None:
        for gateway in self.started:
            gateway.stop()


def wait_until_healthy(gateway: Gateway, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if gateway.process.poll() is not None:
            raise RuntimeError(
                f"gateway exited with {gateway.process.returncode}:\n{gateway.logs()}"
            )
        try:
            if requests.get(gateway.url + "/health", timeout=1).status_code == 200:
                return
        # Timeout: accepted by the listening socket while the worker still boots.
        except (requests.ConnectionError, requests.Timeout):
            pass
        time.sleep(0.05)
    raise RuntimeError(f"gateway did not become healthy:\n{gateway.logs()}")


@pytest.fixture(scope="module")
def fake_upstream() -> Iterator[FakeUpstream]:
    upstream = FakeUpstream().start()
    yield upstream
    upstream.stop()


@pytest.fixture
def start_gateway(tmp_path: Path, fake_upstream: FakeUpstream) -> Iterator[GatewayFactory]:
    """Starts gateways with per-test settings; all are stopped when the test ends."""
    factory = GatewayFactory(tmp_path, fake_upstream.url)
    yield factory
    factory.stop_all()


@pytest.fixture(scope="module")
def gateway(
    tmp_path_factory: pytest.TempPathFactory, fake_upstream: FakeUpstream
) -> Iterator[Gateway]:
    """One gateway shared by a module's tests that need no special settings."""
    factory = GatewayFactory(tmp_path_factory.mktemp("gateway"), fake_upstream.url)
    yield factory(RATE_LIMIT_REQUESTS_PER_MINUTE="100000")
    factory.stop_all()


@dataclass
class RedisServer:
    url: str
    process: subprocess.Popen[bytes]


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A private redis-server on a free loopback port (installed by `make test`)."""
    server = shutil.which("redis-server")
    if server is None:
        pytest.fail("redis-server is not installed: run the suite with `make test`")
    port = free_port()
    process = subprocess.Popen(
        [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for_port(port, process)
    yield RedisServer(f"redis://127.0.0.1:{port}/0", process)
    if process.poll() is None:
        process.terminate()
    process.wait(10)


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    return redis_server.url


def wait_for_port(port: int, process: subprocess.Popen[bytes], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listened on port {port}")


@pytest.fixture
def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {GATEWAY_KEY}"}


# Two fake providers for the tests that route between them (routing, reload, failures).
@pytest.fixture
def a() -> Iterator[FakeUpstream]:
    upstream = FakeUpstream().start()
    yield upstream
    upstream.stop()


@pytest.fixture
def b() -> Iterator[FakeUpstream]:
    upstream = FakeUpstream().start()
    yield upstream
    upstream.stop()
