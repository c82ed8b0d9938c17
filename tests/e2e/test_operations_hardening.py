"""Operations that stay true under real gunicorn (issue 19 items 1, 2, 4 and 5): a reload
that cannot boot keeps the old workers, a drain ends on time, a revoked key is refused on
kept-alive connections, and a client that leaves behind one unread byte is noticed."""

from __future__ import annotations

import signal
import socket
import threading
import time
import uuid
from pathlib import Path

import orjson
import pytest
import requests

from tests.constants import GATEWAY_KEY
from tests.e2e.conftest import BIN, Gateway, GatewayFactory
from tests.e2e.test_reload import errors_in, log_lines, status_with, wait_for, worker_pids
from tests.e2e.test_shutdown import port_of
from tests.fake_upstream import FakeUpstream

pytestmark = pytest.mark.e2e

OLD_KEY = GATEWAY_KEY
NEW_KEY = "gw-test-key-rotated-5e1d9b7c"
# Address space for the gateway's processes: enough for 32 request threads, far from the
# 4,096 MiB of stacks that 4,096 threads reserve.
ADDRESS_SPACE_KB = 2 * 1024 * 1024


def raw_request(path: str, key: str, body: dict | None = None, request_id: str = "") -> bytes:
    data = orjson.dumps(body) if body is not None else b""
    method = "POST" if body is not None else "GET"
    return (
        f"{method} {path} HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {key}\r\n"
        f"X-Request-ID: {request_id or uuid.uuid4().hex}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
    ).encode() + data


def read_answer(sock: socket.socket) -> tuple[int, bytes]:
    """One whole answer with a Content-Length: its status and head (or 0 on EOF/reset)."""
    data = b""
    try:
        while b"\r\n\r\n" not in data:
            piece = sock.recv(65536)
            if not piece:
                return 0, data
            data += piece
        head, _, body = data.partition(b"\r\n\r\n")
        length = next(
            int(line.split(b":", 1)[1])
            for line in head.lower().split(b"\r\n")
            if line.startswith(b"content-length:")
        )
        while len(body) < length:
            piece = sock.recv(65536)
            if not piece:
                return 0, head
            body += piece
    except (ConnectionResetError, BrokenPipeError):
        return 0, data
    return int(head.split(b" ", 2)[1]), head


def under_address_space_limit(tmp_path: Path, kilobytes: int) -> str:
    """A PATH whose `gunicorn` runs the real one under `ulimit -v` (what a pod limit does)."""
    shim = tmp_path / "bin"
    shim.mkdir()
    script = shim / "gunicorn"
    script.write_text(f'#!/bin/sh\nulimit -v {kilobytes}\nexec "{BIN}/gunicorn" "$@"\n')
    script.chmod(0o755)
    return f"{shim}:{BIN}:/usr/bin:/bin"


def test_a_reload_to_threads_that_cannot_boot_keeps_the_old_workers_serving(
    start_gateway: GatewayFactory, tmp_path: Path
) -> None:
    env_file = tmp_path / "gateway.env"
    env_file.write_text("GUNICORN_THREADS=32\n")
    gateway = start_gateway(
        ENV_FILE=str(env_file),
        GUNICORN_THREADS=None,
        PATH=under_address_space_limit(tmp_path, ADDRESS_SPACE_KB),
    )
    workers = worker_pids(gateway)
    failures: list[str] = []
    stop = threading.Event()

    def probe() -> None:  # /health on new connections all along: no gap
        while not stop.is_set():
            try:
                status = requests.get(gateway.url + "/health", timeout=2).status_code
                if status != 200:
                    failures.append(str(status))
            except requests.RequestException as error:
                failures.append(repr(error))
            time.sleep(0.02)

    prober = threading.Thread(target=probe, daemon=True)
    prober.start()
    env_file.write_text("GUNICORN_THREADS=4096\n")
    gateway.process.send_signal(signal.SIGHUP)
    wait_for(lambda: errors_in(gateway) or gateway.process.poll() is not None, "the refusal")
    time.sleep(2)  # long enough for a new worker to boot, fail, and the old one to drain
    stop.set()
    prober.join(10)

    assert gateway.process.poll() is None, gateway.logs()
    [error] = errors_in(gateway)  # one JSON line, and nothing in plain text
    assert "GUNICORN_THREADS=4096" in error["message"] and "ulimit -v" in error["message"]
    assert worker_pids(gateway) == workers
    assert failures == []
    assert status_with(gateway, OLD_KEY) == 200


def test_a_stream_longer_than_graceful_timeout_ends_on_time_with_an_error_event(
    start_gateway: GatewayFactory,
) -> None:
    gateway = start_gateway(GUNICORN_CMD_ARGS="--graceful-timeout 4")
    body = {"model": "m", "stream": True, "fake": {"chunks": 60, "delay": 0.5}}
    sock = socket.create_connection(("127.0.0.1", port_of(gateway)), timeout=10)
    sock.sendall(raw_request("/v1/chat/completions", OLD_KEY, body))
    received = sock.recv(65536)
    assert received.startswith(b"HTTP/1.1 200"), received

    signalled_at = time.monotonic()
    gateway.process.send_signal(signal.SIGTERM)
    while piece := sock.recv(65536):
        received += piece
        assert time.monotonic() - signalled_at < 10, "the stream was not ended"
    ended_at = time.monotonic()
    sock.close()

    assert gateway.process.wait(10) == 0
    exited_at = time.monotonic()
    assert ended_at - signalled_at < 4 and exited_at - signalled_at < 5
    last_event = received.rstrip(b"\r\n0").rsplit(b"data: ", 1)[1]
    assert b'"error"' in last_event, received[-300:]
    # Said as what it is (the gateway stopping), never as the provider's timeout.
    assert b"shutting down" in last_event and b"did not complete" not in last_event
    lines = log_lines(gateway)
    assert [line for line in lines if line["level"] == "raw"] == []  # JSON only
    assert not any("WORKER TIMEOUT" in line["message"] for line in lines)
    assert any("graceful_timeout (4 s) is ending" in line["message"] for line in lines)


def test_a_key_revoked_by_a_reload_is_refused_on_kept_alive_connections(
    start_gateway: GatewayFactory, tmp_path: Path
) -> None:
    env_file = tmp_path / "gateway.env"
    env_file.write_text(f"GATEWAY_API_KEYS={OLD_KEY},{NEW_KEY}\n")
    gateway = start_gateway(
        ENV_FILE=str(env_file), GATEWAY_API_KEYS=None, RATE_LIMIT_REQUESTS_PER_MINUTE="0"
    )
    kept = [socket.create_connection(("127.0.0.1", port_of(gateway)), timeout=5) for _ in range(8)]
    for sock in kept:
        sock.sendall(raw_request("/v1/models", OLD_KEY))
        assert read_answer(sock)[0] == 200
    old_workers = worker_pids(gateway)

    env_file.write_text(f"GATEWAY_API_KEYS={NEW_KEY}\n")
    gateway.process.send_signal(signal.SIGHUP)
    wait_for(lambda: status_with(gateway, OLD_KEY) == 401, "a new worker on the new keys")
    served_at = time.monotonic()

    def retired() -> bool:  # the old worker was told (gthread's own linger lasts 2 s)
        drained = any(line["message"].startswith("draining:") for line in log_lines(gateway))
        return drained or time.monotonic() - served_at > 1.2

    wait_for(retired, "the old worker to drain")
    answers = []
    for sock in kept:
        try:
            sock.sendall(raw_request("/v1/models", OLD_KEY))
        except OSError:
            answers.append(0)
            continue
        answers.append(read_answer(sock)[0])
        sock.close()
    assert 200 not in answers, answers
    assert worker_pids(gateway).isdisjoint(old_workers) or answers
    assert status_with(gateway, NEW_KEY) == 200


def test_a_client_gone_behind_one_pipelined_byte_is_noticed(
    gateway: Gateway, fake_upstream: FakeUpstream
) -> None:
    request_id = uuid.uuid4().hex
    body = {"model": "m", "stream": True, "fake": {"chunks": 10, "delay": 3.0}}
    sock = socket.create_connection(("127.0.0.1", port_of(gateway)), timeout=10)
    sock.sendall(raw_request("/v1/chat/completions", OLD_KEY, body, request_id))
    first = sock.recv(65536)
    assert first.startswith(b"HTTP/1.1 200") and b"data:" in first + sock.recv(65536)
    sock.sendall(b"x")  # one byte past the request, then gone
    sock.close()
    left_at = time.monotonic()

    deadline = left_at + 10
    while not (gone := [d for d in fake_upstream.disconnects if d.request_id == request_id]):
        assert time.monotonic() < deadline, "the provider never saw the client leave"
        time.sleep(0.05)
    # Noticed at once, not when a write to the closed socket fails (two chunks, 6 s, later).
    assert gone[0].at - left_at < 1.5, gone[0].at - left_at
    assert gone[0].chunks_sent <= 2
