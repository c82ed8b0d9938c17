"""Streams through real gunicorn: incremental, byte-identical, cancelled on disconnect."""

from __future__ import annotations

import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import orjson
import pytest
import requests

from tests.e2e.conftest import Gateway, GatewayFactory
from tests.fake_upstream import Disconnect, FakeUpstream, expected_stream


def stream_request(
    gateway: Gateway,
    auth: dict[str, str],
    script: dict,
    request_id: str | None = None,
    **fields: object,
) -> requests.Response:
    headers = dict(auth)
    if request_id:
        headers["X-Request-ID"] = request_id
    body = {"model": "qwen-plus", "stream": True, "messages": [], "fake": script, **fields}
    return requests.post(
        gateway.url + "/v1/chat/completions",
        data=orjson.dumps(body),
        headers=headers,
        stream=True,
        timeout=30,
    )


def disconnects_of(fake_upstream: FakeUpstream, request_id: str) -> list[Disconnect]:
    """The provider's record of the gateway closing `request_id`'s stream (waits, bounded)."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        gone = [d for d in fake_upstream.disconnects if d.request_id == request_id]
        if gone:
            return gone
        time.sleep(0.05)
    return []


def test_stream_headers_and_bytes(gateway: Gateway, auth: dict[str, str]) -> None:
    asked = {"include_usage": True}
    with stream_request(gateway, auth, {"chunks": 4}, stream_options=asked) as response:
        body = response.raw.read()
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/event-stream")
    assert response.headers["Cache-Control"] == "no-cache"
    assert response.headers["X-Accel-Buffering"] == "no"
    assert "Content-Length" not in response.headers
    assert int(response.headers["x-ratelimit-limit-requests"]) > 0
    assert body == expected_stream(4, "qwen-plus", usage=True)


@pytest.mark.parametrize("framing", ["chunked", "close"])
def test_first_chunk_arrives_before_upstream_sends_the_second(
    gateway: Gateway, auth: dict[str, str], fake_upstream: FakeUpstream, framing: str
) -> None:
    # "close": a stream framed by closing the connection must not wait for a full buffer.
    request_id = uuid.uuid4().hex
    script = {"chunks": 3, "delay": 1.0, "framing": framing}
    with stream_request(gateway, auth, script, request_id) as response:
        chunks = response.iter_content(chunk_size=None)
        first = next(chunks)
        first_seen = time.monotonic()
        rest = b"".join(chunks)
    sent = fake_upstream.chunk_times[request_id]
    # Causal, not a timing threshold: the client held chunk 0 before chunk 1 existed.
    assert first_seen < sent[1]
    assert first + rest == expected_stream(3, "qwen-plus")


def test_client_disconnect_closes_the_upstream(
    gateway: Gateway, auth: dict[str, str], fake_upstream: FakeUpstream
) -> None:
    request_id = uuid.uuid4().hex
    response = stream_request(gateway, auth, {"chunks": 100, "delay": 0.1}, request_id)
    chunks = response.iter_content(chunk_size=None)
    next(chunks)
    next(chunks)
    response.close()
    gone = disconnects_of(fake_upstream, request_id)
    assert gone, "the upstream never saw the gateway close the stream"
    assert gone[0].chunks_sent < 100


def test_upstream_dying_mid_stream_ends_with_an_error_event(
    gateway: Gateway, auth: dict[str, str]
) -> None:
    with stream_request(gateway, auth, {"chunks": 5, "die_after": 2}) as response:
        body = response.raw.read()
    events = [e for e in body.split(b"\n\n") if e]
    assert events[:2] == [e for e in expected_stream(5, "qwen-plus").split(b"\n\n") if e][:2]
    error = orjson.loads(events[-1].removeprefix(b"data: "))
    assert error["error"]["code"] == "upstream_unavailable"
    assert len(events) == 3


def test_read_timeout_mid_stream_ends_with_a_timeout_event(
    start_gateway: GatewayFactory, auth: dict[str, str]
) -> None:
    gateway = start_gateway(UPSTREAM_READ_TIMEOUT="0.5")
    with stream_request(gateway, auth, {"chunks": 3, "delay": 3}) as response:
        body = response.raw.read()
    events = [e for e in body.split(b"\n\n") if e]
    error = orjson.loads(events[-1].removeprefix(b"data: "))
    assert error["error"]["code"] == "upstream_timeout"


def test_100_concurrent_streams_are_byte_identical(
    start_gateway: GatewayFactory, auth: dict[str, str]
) -> None:
    gateway = start_gateway(GUNICORN_THREADS="128", RATE_LIMIT_REQUESTS_PER_MINUTE="1000")

    def one(_: int) -> bytes:
        with stream_request(gateway, auth, {"chunks": 20, "delay": 0.02}) as response:
            assert response.status_code == 200
            return response.raw.read()

    with ThreadPoolExecutor(max_workers=100) as pool:
        bodies = list(pool.map(one, range(100), timeout=120))
    expected = expected_stream(20, "qwen-plus")
    assert sum(body == expected for body in bodies) == 100


def test_client_leaving_a_silent_stream_closes_the_upstream_before_its_next_chunk(
    gateway: Gateway, auth: dict[str, str], fake_upstream: FakeUpstream
) -> None:
    # A reasoning model that thinks between chunks: the gateway has nothing to write, so
    # only the disconnect watcher can notice the client leaving.
    request_id = uuid.uuid4().hex
    response = stream_request(gateway, auth, {"chunks": 4, "delay": 3}, request_id)
    next(response.iter_content(chunk_size=None))
    response.close()
    gone = disconnects_of(fake_upstream, request_id)
    assert gone, "the upstream never saw the gateway close the stream"
    # Causal, not timed: the provider saw the close before it wrote its second chunk.
    assert gone[0].chunks_sent == 1
    assert len(fake_upstream.chunk_times[request_id]) == 1


def test_client_leaving_a_silent_close_delimited_stream_closes_the_upstream(
    gateway: Gateway, auth: dict[str, str], fake_upstream: FakeUpstream
) -> None:
    # With "Connection: close" http.client lets go of the socket; the watcher must not.
    request_id = uuid.uuid4().hex
    script = {"chunks": 4, "delay": 3, "framing": "close"}
    response = stream_request(gateway, auth, script, request_id)
    next(response.iter_content(chunk_size=None))
    response.close()
    gone = disconnects_of(fake_upstream, request_id)
    assert gone and gone[0].chunks_sent == 1


def test_a_finished_stream_hands_its_upstream_connection_back_to_the_pool(
    gateway: Gateway, auth: dict[str, str], fake_upstream: FakeUpstream
) -> None:
    # Watched streams keep their connection out of the pool until they end; then it must
    # go back, or every stream would open a new connection (a TLS handshake, remotely).
    peers = []
    for _ in range(2):
        request_id = uuid.uuid4().hex
        with stream_request(gateway, auth, {"chunks": 2}, request_id) as response:
            assert response.raw.read() == expected_stream(2, "qwen-plus")
        peers.append(
            next(
                r.peer
                for r in fake_upstream.requests
                if r.headers.get("x-request-id") == request_id
            )
        )
    assert peers[0] == peers[1]
