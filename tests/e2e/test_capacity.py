"""Capacity under real gunicorn: probes that never queue, a bounded queue, and no thread held
by a client that is not sending (its head) or not reading (its stream).

Thread counts are tiny (1-2) so that "every thread is busy" is cheap to arrange; the worker
behaves the same with thousands.
"""

from __future__ import annotations

import contextlib
import io
import socket
import threading
import time
import uuid
from collections.abc import Iterator

import orjson
import pytest
import requests

from tests.constants import GATEWAY_KEY
from tests.e2e.conftest import Gateway, GatewayFactory
from tests.e2e.test_streaming import disconnects_of, stream_request
from tests.fake_upstream import FakeUpstream, completion_body, expected_stream

pytestmark = pytest.mark.e2e

LONG_STREAM = {"chunks": 100, "delay": 0.2}  # 20 s: outlasts every check made beside it


def port_of(gateway: Gateway) -> int:
    return int(gateway.url.rsplit(":", 1)[1])


def connect(gateway: Gateway) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port_of(gateway)), timeout=10)


def chat_wire(payload: dict, request_id: str = "", chunked: bool = False) -> bytes:
    """A complete POST /v1/chat/completions as bytes on the wire."""
    body = orjson.dumps(payload)
    head = (
        "POST /v1/chat/completions HTTP/1.1\r\nHost: gateway\r\n"
        f"Authorization: Bearer {GATEWAY_KEY}\r\nContent-Type: application/json\r\n"
        + (f"X-Request-ID: {request_id}\r\n" if request_id else "")
    )
    if chunked:
        framed = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
        return (head + "Transfer-Encoding: chunked\r\n\r\n").encode() + framed
    return (head + f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def get_wire(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: gateway\r\n\r\n".encode()


def read_response(reader: io.BufferedReader) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response (Content-Length or chunked), leaving the next one unread."""
    status = int(reader.readline().split()[1])
    headers: dict[str, str] = {}
    while (line := reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding") == "chunked":
        body = b""
        while size := int(reader.readline(), 16):
            body += reader.read(size)
            reader.readline()
        reader.readline()
        return status, headers, body
    return status, headers, reader.read(int(headers.get("content-length", "0")))


def nothing_received(sock: socket.socket) -> bool:
    """True while the server has neither answered nor closed this connection."""
    previous = sock.gettimeout()
    sock.setblocking(False)  # with a timeout set, recv() would wait for it despite DONTWAIT
    try:
        sock.recv(1, socket.MSG_PEEK)
    except BlockingIOError:
        return True
    finally:
        sock.settimeout(previous)
    return False


def read_until_closed(sock: socket.socket) -> bytes:
    sock.settimeout(15)
    received = b""
    with contextlib.suppress(ConnectionError):
        while chunk := sock.recv(4096):
            received += chunk
    return received


@contextlib.contextmanager
def busy_threads(gateway: Gateway, auth: dict[str, str], count: int) -> Iterator[None]:
    """`count` long streams, each holding a request thread (their first byte has arrived)."""
    streams = [stream_request(gateway, auth, LONG_STREAM) for _ in range(count)]
    try:
        for response in streams:
            assert response.status_code == 200
            # raw.read: a discarded iter_content generator would close the connection.
            assert response.raw.read(1)
        yield
    finally:
        for response in streams:
            response.close()


def test_probes_answer_while_every_thread_streams(
    start_gateway: GatewayFactory, auth: dict[str, str]
) -> None:
    gateway = start_gateway(GUNICORN_THREADS="2", QUEUE_TIMEOUT="60")
    with busy_threads(gateway, auth, 2):
        # Two more streams than threads: they wait for a thread, the probes must not.
        queued = [connect(gateway) for _ in range(2)]
        for sock in queued:
            sock.sendall(chat_wire({"model": "m", "stream": True, "fake": LONG_STREAM}))
        try:
            for path, status in (("/health", "healthy"), ("/ready", "ready")):
                started = time.monotonic()
                response = requests.get(gateway.url + path, timeout=10)
                elapsed = time.monotonic() - started
                assert response.status_code == 200, response.text
                assert response.json()["status"] == status
                # Generous: a probe queued behind these streams would wait ~20 s.
                assert elapsed < 2, f"{path} took {elapsed:.2f} s"
            assert requests.get(gateway.url + "/ready", timeout=10).json()["checks"] == {
                "config": "ok",
                "rate_limit_storage": "ok",
                "shutdown": "no",
            }
            # The pool really was full: the extra streams are still waiting for a thread.
            assert all(nothing_received(sock) for sock in queued)
        finally:
            for sock in queued:
                sock.close()


def test_request_beyond_capacity_gets_503_after_the_queue_timeout(
    start_gateway: GatewayFactory, auth: dict[str, str]
) -> None:
    gateway = start_gateway(GUNICORN_THREADS="2", QUEUE_TIMEOUT="1")
    url = gateway.url + "/v1/chat/completions"
    with busy_threads(gateway, auth, 2):
        started = time.monotonic()
        refused = requests.post(url, json={"model": "m"}, headers=auth, timeout=30)
        waited = time.monotonic() - started
    assert refused.status_code == 503
    assert refused.json()["error"]["type"] == "server_error"
    assert refused.json()["error"]["code"] == "service_unavailable"
    assert refused.headers["Retry-After"] == "1"
    assert refused.headers["Connection"] == "close"
    assert waited >= 0.9, "answered before the queue timeout: it never waited for a thread"
    # Logged by the main loop after it wrote the answer: give the line a moment.
    logged = time.monotonic() + 10
    while "no free thread" not in gateway.logs() and time.monotonic() < logged:
        time.sleep(0.05)
    assert "no free thread" in gateway.logs()

    # Once the streams are gone, capacity is back.
    # (A Response is falsy for a 503: the retry condition tests the status itself.)
    deadline = time.monotonic() + 20
    status = requests.post(url, json={"model": "m"}, headers=auth, timeout=30)
    while status.status_code == 503 and time.monotonic() < deadline:
        time.sleep(0.2)
        status = requests.post(url, json={"model": "m"}, headers=auth, timeout=30)
    assert status.status_code == 200
    assert status.json() == completion_body("m")


def test_queued_request_is_served_when_a_thread_frees_in_time(
    start_gateway: GatewayFactory, auth: dict[str, str]
) -> None:
    gateway = start_gateway(GUNICORN_THREADS="1", QUEUE_TIMEOUT="30")
    stream = stream_request(gateway, auth, {"chunks": 5, "delay": 0.2})
    first = stream.raw.read(1)  # the only thread now streams
    answer = requests.post(
        gateway.url + "/v1/chat/completions", json={"model": "m"}, headers=auth, timeout=30
    )
    rest = stream.raw.read()
    assert answer.status_code == 200
    assert answer.json() == completion_body("m")
    assert first + rest == expected_stream(5, "qwen-plus")


def drip(sockets: list[socket.socket], stop: threading.Event, byte: bytes) -> None:
    """Send one more header byte on each socket every 0.2 s (bounded: 60 s)."""
    deadline = time.monotonic() + 60
    while not stop.wait(0.2) and time.monotonic() < deadline:
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.send(byte)


def test_idle_and_slow_header_connections_hold_no_thread(
    start_gateway: GatewayFactory, auth: dict[str, str]
) -> None:
    gateway = start_gateway(GUNICORN_THREADS="2", CLIENT_HEADER_TIMEOUT="60")
    idle = [connect(gateway) for _ in range(300)]
    drippers = [connect(gateway) for _ in range(20)]
    for sock in drippers:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: gateway\r\nX-Slow: ")
    stop = threading.Event()
    dripping = threading.Thread(target=drip, args=(drippers, stop, b"a"), daemon=True)
    dripping.start()
    try:
        started = time.monotonic()
        health = requests.get(gateway.url + "/health", timeout=10)
        assert health.status_code == 200
        assert time.monotonic() - started < 2
        answer = requests.post(
            gateway.url + "/v1/chat/completions", json={"model": "m"}, headers=auth, timeout=10
        )
        assert answer.status_code == 200
        assert answer.json() == completion_body("m")
        with stream_request(gateway, auth, {"chunks": 3}) as streamed:
            assert streamed.raw.read() == expected_stream(3, "qwen-plus")
        # Served beside them, not after they were dropped: all are still open.
        assert all(nothing_received(sock) for sock in idle + drippers)
    finally:
        stop.set()
        dripping.join(5)
        for sock in idle + drippers:
            sock.close()


def test_a_head_must_arrive_within_the_header_timeout(start_gateway: GatewayFactory) -> None:
    gateway = start_gateway(CLIENT_HEADER_TIMEOUT="1")
    idle, partial, dripper = (connect(gateway) for _ in range(3))
    partial.sendall(b"GET /health HTTP/1.1\r\nHost: gateway\r\n")
    dripper.sendall(b"GET /health HTTP/1.1\r\nHost: gateway\r\n")
    stop = threading.Event()
    # Still sending when the deadline passes: the deadline is for the whole head.
    dripping = threading.Thread(target=drip, args=([dripper], stop, b"X"), daemon=True)
    dripping.start()
    try:
        assert read_until_closed(idle) == b""  # nothing sent, so nothing to answer
        for sock in (partial, dripper):
            head, _, body = read_until_closed(sock).partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 408")
            assert b"Connection: close" in head
            assert "did not arrive within 1 s" in orjson.loads(body)["error"]["message"]

    finally:
        stop.set()
        dripping.join(5)
        for sock in (idle, partial, dripper):
            sock.close()

    # Between requests, a kept-alive connection may idle longer than that (up to keepalive).
    with connect(gateway) as kept_alive:
        reader = kept_alive.makefile("rb")
        kept_alive.sendall(get_wire("/health"))
        assert read_response(reader)[0] == 200
        time.sleep(2)
        kept_alive.sendall(get_wire("/health"))
        assert read_response(reader)[0] == 200


def test_pipelined_requests_with_bodies_are_answered_in_order(gateway: Gateway) -> None:
    payload = {"model": "qwen-plus", "messages": []}
    wire = (
        get_wire("/health")
        + chat_wire(payload)
        + chat_wire(payload, chunked=True)
        + get_wire("/ready?verbose=1")
        + chat_wire({**payload, "stream": True, "fake": {"chunks": 2}})
    )
    with connect(gateway) as sock:
        sock.sendall(wire)  # one write: the heads and bodies arrive together
        reader = sock.makefile("rb")
        answers = [read_response(reader) for _ in range(5)]
    assert [status for status, _, _ in answers] == [200] * 5
    assert orjson.loads(answers[0][2])["status"] == "healthy"
    assert orjson.loads(answers[1][2]) == completion_body("qwen-plus")
    assert orjson.loads(answers[2][2]) == completion_body("qwen-plus")
    assert orjson.loads(answers[3][2])["status"] == "ready"
    assert answers[4][2] == expected_stream(2, "qwen-plus")


def test_stream_client_that_stops_reading_is_dropped_and_its_upstream_closed(
    start_gateway: GatewayFactory, auth: dict[str, str], fake_upstream: FakeUpstream
) -> None:
    gateway = start_gateway(GUNICORN_THREADS="1", CLIENT_WRITE_TIMEOUT="2", QUEUE_TIMEOUT="60")
    request_id = uuid.uuid4().hex
    stalled = socket.socket()
    # A small receive window: the gateway's writes block after a few hundred KiB at most.
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stalled.settimeout(10)
    stalled.connect(("127.0.0.1", port_of(gateway)))
    try:
        # ~7 MB of stream that this client never reads.
        script = {"chunks": 50000, "delay": 0}
        stalled.sendall(chat_wire({"model": "m", "stream": True, "fake": script}, request_id))
        gone = disconnects_of(fake_upstream, request_id)
        assert gone, "the provider connection stayed open"
        assert gone[0].chunks_sent < 50000
        # Its only thread is free again.
        answer = requests.post(
            gateway.url + "/v1/chat/completions", json={"model": "m"}, headers=auth, timeout=30
        )
        assert answer.status_code == 200
        assert "stopped reading" in gateway.logs()
    finally:
        stalled.close()
