"""SIGHUP under real gunicorn: the configuration reloads without dropping a stream.

The keys live in an ENV_FILE and not in the process environment (a real variable would
win over the file), the way an operator rotates them in `.env`. Routes live in a
GATEWAY_CONFIG file rewritten between signals, with two fake providers told apart by the
request id each one received.
"""

from __future__ import annotations

import signal
import socket
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
import requests

from tests.constants import GATEWAY_KEY, UPSTREAM_KEY
from tests.e2e.conftest import Gateway, GatewayFactory
from tests.e2e.test_shutdown import StreamInFlight, port_of
from tests.fake_upstream import FakeUpstream, expected_stream

pytestmark = pytest.mark.e2e

OLD_KEY = GATEWAY_KEY
NEW_KEY = "gw-test-key-rotated-5e1d9b7c"


# Tests ask for a and b before start_gateway: teardown runs in reverse, so the gateway
# closes its connections to them before they stop.


def routes_m_to(provider: str, a_url: str, b_url: str) -> str:
    """A GATEWAY_CONFIG with providers a and b, and model `m` at `provider` only. The
    provider is asked for `m-at-<provider>`, so its answers name it (the fake echoes the
    model it was asked for)."""
    return f"""
providers:
  a:
    base_url: {a_url}
    api_key_env: TARGET_API_KEY
  b:
    base_url: {b_url}
    api_key_env: TARGET_API_KEY
models:
  m: {{provider: {provider}, model: m-at-{provider}}}
"""


def received_by(gateway: Gateway, upstreams: dict[str, FakeUpstream]) -> list[str]:
    """Send one chat request for `m` on a new connection (so any live worker may take it);
    the names of the fake providers that received it, found by its request id."""
    request_id = f"reload-{uuid.uuid4().hex}"
    headers = {"Authorization": f"Bearer {OLD_KEY}", "X-Request-ID": request_id}
    body: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    response = requests.post(
        gateway.url + "/v1/chat/completions", json=body, headers=headers, timeout=10
    )
    assert response.status_code == 200, response.text
    names = [
        name
        for name, upstream in upstreams.items()
        if any(r.headers.get("x-request-id") == request_id for r in upstream.requests)
    ]
    assert [response.json()["model"]] == [f"m-at-{name}" for name in names], names
    return names


@pytest.fixture
def env_file(tmp_path: Path) -> Path:
    path = tmp_path / "gateway.env"
    path.write_text(f"GATEWAY_API_KEYS={OLD_KEY}\n")
    return path


@pytest.fixture
def gateway(start_gateway: GatewayFactory, env_file: Path) -> Gateway:
    return start_gateway(
        ENV_FILE=str(env_file), GATEWAY_API_KEYS=None, RATE_LIMIT_REQUESTS_PER_MINUTE="100000"
    )


def status_with(gateway: Gateway, key: str) -> int:
    """The status of one request on a new connection (so any live worker may take it)."""
    headers = {"Authorization": f"Bearer {key}"}
    return requests.get(gateway.url + "/v1/models", headers=headers, timeout=10).status_code


def wait_for(condition: Callable[[], Any], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def worker_pids(gateway: Gateway) -> set[int]:
    """The master's live children (its workers), read from /proc."""
    pids = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # the process ended while we looked
            continue
        # After the name in parentheses (which may hold spaces): state, then the parent pid.
        state, ppid = text.rsplit(")", 1)[1].split()[:2]
        if int(ppid) == gateway.process.pid and state != "Z":
            pids.add(int(stat.parent.name))
    return pids


def log_lines(gateway: Gateway) -> list[dict[str, Any]]:
    """Every line of the gateway's output; a line that is not JSON is kept as level "raw"."""
    lines = []
    for line in gateway.logs().splitlines():
        if line.strip():
            try:
                lines.append(orjson.loads(line))
            except orjson.JSONDecodeError:
                lines.append({"level": "raw", "message": line})
    return lines


def errors_in(gateway: Gateway) -> list[dict[str, Any]]:
    return [e for e in log_lines(gateway) if e["level"] in ("error", "critical", "raw")]


def assert_no_secret_in_logs(gateway: Gateway) -> None:
    logs = gateway.logs()
    for secret in (OLD_KEY, NEW_KEY, UPSTREAM_KEY):
        assert secret not in logs


def test_hup_applies_keys_rotated_in_the_env_file(gateway: Gateway, env_file: Path) -> None:
    assert status_with(gateway, OLD_KEY) == 200
    assert status_with(gateway, NEW_KEY) == 401
    old_workers = worker_pids(gateway)

    env_file.write_text(f"GATEWAY_API_KEYS={NEW_KEY}\n")
    gateway.process.send_signal(signal.SIGHUP)
    # Once every worker of the old configuration has exited, only the new one answers.
    wait_for(
        lambda: (pids := worker_pids(gateway)) and not pids & old_workers,
        "the old workers to be replaced",
    )

    assert status_with(gateway, NEW_KEY) == 200
    assert status_with(gateway, OLD_KEY) == 401
    assert gateway.process.poll() is None
    reloaded = [e for e in log_lines(gateway) if "configuration reloaded" in e["message"]]
    assert len(reloaded) == 1 and reloaded[0]["level"] == "info", reloaded
    assert "gateway_api_keys" in reloaded[0]["message"]
    assert errors_in(gateway) == []
    assert_no_secret_in_logs(gateway)


def test_an_invalid_value_on_hup_changes_nothing_and_keeps_the_stream(
    gateway: Gateway, env_file: Path
) -> None:
    workers = worker_pids(gateway)
    stream = StreamInFlight(gateway, {"Authorization": f"Bearer {OLD_KEY}"}, chunks=12, delay=0.5)

    # A rotated key beside a typo: none of the file may apply, the new key neither.
    env_file.write_text(f"GATEWAY_API_KEYS={NEW_KEY}\nUPSTREAM_READ_TIMEOUT=soon\n")
    gateway.process.send_signal(signal.SIGHUP)
    wait_for(
        lambda: errors_in(gateway) or gateway.process.poll() is not None,
        "the reload to be refused",
    )

    assert gateway.process.poll() is None, gateway.logs()
    [error] = errors_in(gateway)
    assert error["level"] == "error"  # a logged line, not the dying master's stderr
    assert "UPSTREAM_READ_TIMEOUT" in error["message"]
    assert "traceback" not in error and "Traceback" not in gateway.logs()
    # Nothing was restarted: the stream's worker still serves, on the old configuration.
    assert worker_pids(gateway) == workers
    assert status_with(gateway, OLD_KEY) == 200
    assert status_with(gateway, NEW_KEY) == 401

    stream.join(timeout=30)
    assert stream.status == 200
    assert bytes(stream.body) == expected_stream(12)
    assert gateway.process.poll() is None
    assert len(errors_in(gateway)) == 1
    assert_no_secret_in_logs(gateway)


def test_a_stream_open_across_a_hup_finishes_and_the_next_request_is_new(
    gateway: Gateway, env_file: Path
) -> None:
    stream = StreamInFlight(gateway, {"Authorization": f"Bearer {OLD_KEY}"}, chunks=12, delay=0.5)

    env_file.write_text(f"GATEWAY_API_KEYS={NEW_KEY}\n")
    signalled_at = time.monotonic()
    gateway.process.send_signal(signal.SIGHUP)
    wait_for(lambda: status_with(gateway, NEW_KEY) == 200, "the new key to be accepted")
    # The old workers stop taking requests as soon as the new ones serve (the master is
    # woken by their report): the old key is refused within moments, never a reload later.
    refused_at = time.monotonic() + 2
    wait_for(lambda: status_with(gateway, OLD_KEY) == 401, "the old key to be refused")
    assert time.monotonic() < refused_at

    stream.join(timeout=30)
    assert stream.status == 200
    assert bytes(stream.body) == expected_stream(12)
    assert stream.finished_at is not None and stream.finished_at > signalled_at
    assert gateway.process.poll() is None
    assert errors_in(gateway) == []


def test_a_stream_open_across_a_hup_finishes_on_its_route_and_new_requests_take_the_new(
    a: FakeUpstream, b: FakeUpstream, start_gateway: GatewayFactory, tmp_path: Path
) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text(routes_m_to("a", a.url, b.url))
    # No rate limit: the poll below sends as many requests as the reload takes.
    gateway = start_gateway(GATEWAY_CONFIG=str(config), RATE_LIMIT_REQUESTS_PER_MINUTE="0")
    upstreams = {"a": a, "b": b}
    assert received_by(gateway, upstreams) == ["a"]
    stream = StreamInFlight(gateway, {"Authorization": f"Bearer {OLD_KEY}"}, chunks=12, delay=0.5)

    config.write_text(routes_m_to("b", a.url, b.url))
    signalled_at = time.monotonic()
    gateway.process.send_signal(signal.SIGHUP)
    # Until a new worker takes a request, the old one does, on the old route: to a.
    deadline = time.monotonic() + 30
    while (took := received_by(gateway, upstreams)) != ["b"]:
        assert took == ["a"], took
        assert time.monotonic() < deadline, "no request reached b after the reload"
        time.sleep(0.05)

    stream.join(timeout=30)
    assert stream.status == 200
    assert bytes(stream.body) == expected_stream(12, model="m-at-a")
    assert stream.finished_at is not None and stream.finished_at > signalled_at
    # The stream went to a alone: b got nothing but the polls.
    streamed = {
        n: [r for r in u.requests if orjson.loads(r.body).get("stream")]
        for n, u in upstreams.items()
    }
    assert {n: len(found) for n, found in streamed.items()} == {"a": 1, "b": 0}
    assert received_by(gateway, upstreams) == ["b"]
    reloaded = [e for e in log_lines(gateway) if "configuration reloaded" in e["message"]]
    assert len(reloaded) == 1 and "routes" in reloaded[0]["message"], reloaded
    assert gateway.process.poll() is None
    assert errors_in(gateway) == []


def test_an_invalid_gateway_config_file_on_hup_keeps_the_old_route_then_a_fixed_one_applies(
    a: FakeUpstream, b: FakeUpstream, start_gateway: GatewayFactory, tmp_path: Path
) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text(routes_m_to("a", a.url, b.url))
    gateway = start_gateway(GATEWAY_CONFIG=str(config))
    upstreams = {"a": a, "b": b}
    workers = worker_pids(gateway)

    # `m` moved to b, whose URL is broken: none of the file may apply, the new route neither.
    config.write_text(routes_m_to("b", a.url, "not-a-url"))
    gateway.process.send_signal(signal.SIGHUP)
    wait_for(
        lambda: errors_in(gateway) or gateway.process.poll() is not None,
        "the reload to be refused",
    )
    assert gateway.process.poll() is None, gateway.logs()
    [error] = errors_in(gateway)
    assert error["level"] == "error"  # a logged line, not the dying master's stderr
    assert "GATEWAY_CONFIG" in error["message"]
    assert "providers.b.base_url" in error["message"]
    assert "traceback" not in error and "Traceback" not in gateway.logs()
    assert worker_pids(gateway) == workers
    assert received_by(gateway, upstreams) == ["a"]
    assert status_with(gateway, OLD_KEY) == 200

    # Fixed: accepted, the old workers are replaced, and `m` goes to b.
    config.write_text(routes_m_to("b", a.url, b.url))
    gateway.process.send_signal(signal.SIGHUP)
    wait_for(
        lambda: (pids := worker_pids(gateway)) and not pids & workers,
        "the old workers to be replaced",
    )
    reloaded = [e for e in log_lines(gateway) if "configuration reloaded" in e["message"]]
    assert len(reloaded) == 1 and "routes" in reloaded[0]["message"], reloaded
    assert received_by(gateway, upstreams) == ["b"]
    assert len(errors_in(gateway)) == 1


def test_a_sigterm_during_the_drain_of_a_reload_shuts_down_while_the_old_stream_runs(
    gateway: Gateway, env_file: Path
) -> None:
    old_workers = worker_pids(gateway)
    stream = StreamInFlight(gateway, {"Authorization": f"Bearer {OLD_KEY}"}, chunks=20, delay=0.5)

    env_file.write_text(f"GATEWAY_API_KEYS={NEW_KEY}\n")
    gateway.process.send_signal(signal.SIGHUP)
    # The new worker is up: the old one, with the stream, drains.
    wait_for(lambda: worker_pids(gateway) - old_workers, "a new worker")
    gateway.process.send_signal(signal.SIGTERM)

    def handled() -> bool:
        return any(e["message"] == "Handling signal: term" for e in log_lines(gateway))

    wait_for(lambda: handled() or stream.finished_at is not None, "the SIGTERM to be handled")
    # Handled while the old worker still streams, not once its drain is over (gunicorn's
    # reload blocked the master until then, and the shutdown drained all over again).
    assert stream.finished_at is None, "the master waited for the drain to handle SIGTERM"
    assert old_workers <= worker_pids(gateway)
    refused = False
    for _ in range(50):  # the master closed its socket, the new worker closes its own
        try:
            with socket.create_connection(("127.0.0.1", port_of(gateway)), timeout=0.5):
                pass
            time.sleep(0.1)
        except ConnectionRefusedError:
            refused = True
            break
    still_streaming = stream.finished_at is None

    stream.join(timeout=30)
    assert stream.status == 200
    assert bytes(stream.body) == expected_stream(20)  # drained whole, never cut
    assert gateway.process.wait(30) == 0, gateway.logs()
    assert refused and still_streaming
    messages = [e["message"] for e in log_lines(gateway)]
    [old_worker] = old_workers
    assert messages.index("Handling signal: term") < messages.index(
        f"Worker exiting (pid: {old_worker})"
    )
    assert errors_in(gateway) == []
