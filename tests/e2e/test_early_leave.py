"""Leaving early is not free: a client that hangs up after the answer is charged the usage.

Under real gunicorn, against a provider written byte for byte: once a stream's
finish_reason has come, the provider has nothing left to generate, so a client leaving
does not cut it; the gateway reads on (bounded) for the usage the provider bills. A client
leaving mid-answer still cuts the provider at once (test_streaming proves it too).
"""

from __future__ import annotations

import hashlib
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
import requests

from tests.e2e.conftest import Gateway, GatewayFactory
from tests.raw_upstream import RawRequest, RawUpstream

TEAM_KEY = "h16d-team-key-0123456789"
ADMIN_KEY = "h16d-admin-key-012345678"
BILLED = {"prompt_tokens": 50_100, "completion_tokens": 120, "total_tokens": 50_220}
STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
)


def chunk(payload: dict[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else orjson.dumps(payload).decode()
    event = f"data: {data}\n\n".encode()
    return b"%x\r\n%s\r\n" % (len(event), event)


def delta(text: str, finish: str | None = None) -> bytes:
    choice = {"index": 0, "delta": {"content": text}, "finish_reason": finish}
    return chunk({"id": "c", "object": "chat.completion.chunk", "choices": [choice]})


USAGE = chunk({"id": "c", "object": "chat.completion.chunk", "choices": [], "usage": BILLED})


@pytest.fixture
def raw_upstream() -> Iterator[RawUpstream]:
    upstream = RawUpstream(lambda request, conn: False).start()
    yield upstream
    upstream.stop()


def gateway_with_keys(start_gateway: GatewayFactory, upstream: RawUpstream) -> Gateway:
    digest = hashlib.sha256(TEAM_KEY.encode()).hexdigest()
    config = f"keys:\n  - name: team-a\n    key: sha256:{digest}\n"
    return start_gateway(config, TARGET_API_URL=upstream.url, GATEWAY_ADMIN_KEY=ADMIN_KEY)


def ask(gateway: Gateway, request_id: str) -> requests.Response:
    body = {"model": "qwen-plus", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    return requests.post(
        gateway.url + "/v1/chat/completions",
        data=orjson.dumps(body),
        headers={"Authorization": f"Bearer {TEAM_KEY}", "X-Request-ID": request_id},
        stream=True,
        timeout=30,
    )


def leave_after(response: requests.Response, marker: bytes) -> float:
    """Read until `marker` has arrived, then hang up; return when (bounded by the timeout)."""
    seen = b""
    for piece in response.iter_content(chunk_size=None):
        seen += piece
        if marker in seen:
            break
    assert marker in seen, seen
    response.close()
    return time.monotonic()


def day_tokens(gateway: Gateway) -> int:
    report = requests.get(
        gateway.url + "/v1/usage", headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=5
    ).json()
    return next(row for row in report["keys"] if row["name"] == "team-a")["day"]["tokens"]


def test_a_client_leaving_after_finish_reason_is_charged_the_providers_usage(
    start_gateway: GatewayFactory, raw_upstream: RawUpstream
) -> None:
    left = threading.Event()
    usage_sent: list[float] = []

    def answer(request: RawRequest, conn: socket.socket) -> bool:
        conn.sendall(STREAM_HEAD + delta("The whole ") + delta("answer.", finish="stop"))
        left.wait(10)
        time.sleep(1.0)  # the usage comes a second after the client has gone
        conn.sendall(USAGE + chunk("[DONE]") + b"0\r\n\r\n")
        usage_sent.append(time.monotonic())
        return True

    raw_upstream.answer = answer
    gateway = gateway_with_keys(start_gateway, raw_upstream)
    request_id = uuid.uuid4().hex
    leave_after(ask(gateway, request_id), b'"finish_reason":"stop"')
    left.set()

    entry = gateway.access_line(request_id)
    assert usage_sent, "the provider never sent its usage"
    assert entry["usage"] == BILLED
    assert "usage_estimated" not in entry
    assert entry["client_disconnected"] is True
    assert day_tokens(gateway) == BILLED["total_tokens"]


def test_a_provider_that_sends_no_usage_is_read_on_for_five_seconds_at_most(
    start_gateway: GatewayFactory, raw_upstream: RawUpstream
) -> None:
    def answer(request: RawRequest, conn: socket.socket) -> bool:
        conn.sendall(STREAM_HEAD + delta("All of it.", finish="stop"))
        raw_upstream.wait_closed(conn, 30)  # never anything more
        return False

    raw_upstream.answer = answer
    gateway = gateway_with_keys(start_gateway, raw_upstream)
    request_id = uuid.uuid4().hex
    left_at = leave_after(ask(gateway, request_id), b'"finish_reason":"stop"')

    entry = gateway.access_line(request_id)
    assert raw_upstream.closed_at, "the gateway never let go of the provider"
    waited = raw_upstream.closed_at[0] - left_at
    assert 3.0 < waited < 8.0  # READ_ON_SECONDS (5 s), then let go
    assert entry["usage_estimated"] is True
    assert entry["client_disconnected"] is True


def test_a_client_leaving_mid_answer_still_cuts_the_provider_at_once(
    start_gateway: GatewayFactory, raw_upstream: RawUpstream
) -> None:
    def answer(request: RawRequest, conn: socket.socket) -> bool:
        conn.sendall(STREAM_HEAD + delta("Once "))
        for _ in range(100):  # 20 s of answer, unless the gateway hangs up
            if raw_upstream.wait_closed(conn, 0.2):
                return False
            conn.sendall(delta("more "))
        return False

    raw_upstream.answer = answer
    gateway = gateway_with_keys(start_gateway, raw_upstream)
    request_id = uuid.uuid4().hex
    left_at = leave_after(ask(gateway, request_id), b"more ")

    entry = gateway.access_line(request_id)
    assert raw_upstream.closed_at, "the provider was never cut"
    assert raw_upstream.closed_at[0] - left_at < 2.0
    assert entry["usage_estimated"] is True
    assert entry["client_disconnected"] is True
    assert day_tokens(gateway) == entry["usage"]["total_tokens"] > 0
