"""`/v1/messages` bridged to a provider that misbehaves, and sent hostile bodies.

The provider is a `RawUpstream` writing its answers byte for byte; the marker in the
client's last message picks the misbehaviour. Whatever the provider does, the SDK gets a
message or an Anthropic error, never a hang, and the gateway's memory stays bounded.
"""

from __future__ import annotations

import json
import socket
import time
import uuid
from collections.abc import Iterator
from typing import Any

import anthropic
import orjson
import pytest
import requests

from bench.procs import PeakRss
from tests.constants import GATEWAY_KEY
from tests.e2e.conftest import Gateway, GatewayFactory
from tests.raw_upstream import RawRequest, RawUpstream, json_answer

pytestmark = pytest.mark.e2e

MB = 1024 * 1024
HEADERS = {"x-api-key": GATEWAY_KEY, "content-type": "application/json"}
BASH: Any = {
    "name": "Bash",
    "input_schema": {"type": "object", "properties": {"command": {"type": "string"}}},
}
BIG_COMMAND = "echo " + "x" * MB


def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
    choice = {"index": 0, "delta": delta, "finish_reason": finish}
    body = {"id": "c", "object": "chat.completion.chunk", "model": "m", "choices": [choice]}
    return b"data: " + orjson.dumps(body) + b"\n\n"


def tool_call_pieces() -> Iterator[bytes]:
    """A call whose 1 MB of arguments arrives in 64 KiB pieces."""
    opened = {"index": 0, "id": "call_big", "type": "function"}
    yield chunk({"role": "assistant", "tool_calls": [{**opened, "function": {"name": "Bash"}}]})
    arguments = json.dumps({"command": BIG_COMMAND})
    for start in range(0, len(arguments), 64 * 1024):
        piece = arguments[start : start + 64 * 1024]
        yield chunk({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]})
    yield chunk({}, "tool_calls")


def send_stream(conn: socket.socket, parts: Iterator[bytes], *, end: bool = True) -> None:
    conn.sendall(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    for part in parts:
        conn.sendall(b"%x\r\n%s\r\n" % (len(part), part))
    if end:
        conn.sendall(b"0\r\n\r\n")


def answer(request: RawRequest, conn: socket.socket) -> bool:
    marker = orjson.loads(request.body)["messages"][-1]["content"]
    if marker == "garbage":
        garbage = [b"data: {not json\n\n", b"data: \xff\xfe\x00\n\n", b"event: x\n\n"]
        text = [chunk({"role": "assistant", "content": "still "}), chunk({"content": "here"})]
        send_stream(conn, iter([*garbage, *text, chunk({}, "stop"), b"data: [DONE]\n\n"]))
    elif marker == "big tool call":
        send_stream(conn, iter([*tool_call_pieces(), b"data: [DONE]\n\n"]))
    elif marker == "no usage":
        parts = [chunk({"role": "assistant", "content": "fine"}), chunk({}, "stop")]
        send_stream(conn, iter([*parts, b"data: [DONE]\n\n"]))  # include_usage ignored
    elif marker == "cut":
        send_stream(conn, iter([chunk({"role": "assistant", "content": "half"})]), end=False)
        return False  # the connection closes mid-body
    else:
        message = {"role": "assistant", "content": f"{len(marker)} characters"}
        choice = {"index": 0, "message": message, "finish_reason": "stop"}
        usage = {"prompt_tokens": len(request.body) // 4, "completion_tokens": 2}
        body = {"id": "c", "object": "chat.completion", "choices": [choice], "usage": usage}
        conn.sendall(json_answer(orjson.dumps(body)))
    return True


@pytest.fixture(scope="module")
def raw() -> Iterator[RawUpstream]:
    upstream = RawUpstream(answer).start()
    yield upstream
    upstream.stop()


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, raw: RawUpstream) -> Iterator[Gateway]:
    factory = GatewayFactory(tmp_path_factory.mktemp("hostile"), raw.url)
    yield factory(RATE_LIMIT_REQUESTS_PER_MINUTE="0")
    factory.stop_all()


def sdk(gateway: Gateway) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gateway.url, api_key=GATEWAY_KEY, max_retries=0, timeout=30)


def streamed(gateway: Gateway, marker: str, **options: Any) -> anthropic.types.Message:
    with sdk(gateway).messages.stream(
        model="qwen-plus", max_tokens=64, messages=[{"role": "user", "content": marker}], **options
    ) as stream:
        return stream.get_final_message()


def assert_up(gateway: Gateway) -> None:
    assert gateway.process.poll() is None
    assert requests.get(gateway.url + "/health", timeout=5).status_code == 200


def test_garbage_chunks_are_skipped_without_a_hang(gw: Gateway) -> None:
    started = time.monotonic()
    message = streamed(gw, "garbage")
    assert message.content[-1].text == "still here"  # type: ignore[union-attr]
    assert message.stop_reason == "end_turn"
    assert time.monotonic() - started < 10
    assert_up(gw)


def test_a_tool_call_with_1_mb_of_arguments_arrives_whole(gw: Gateway) -> None:
    with PeakRss(gw.process.pid, interval=0.02) as rss:
        message = streamed(gw, "big tool call", tools=[BASH])
    (call,) = message.content
    assert call.type == "tool_use" and call.input == {"command": BIG_COMMAND}
    assert message.stop_reason == "tool_use"
    assert rss.peak < 300 * MB, f"peak {rss.peak / MB:.0f} MB"


def test_a_stream_without_usage_is_estimated(gw: Gateway) -> None:
    request_id = uuid.uuid4().hex
    message = streamed(gw, "no usage", extra_headers={"X-Request-ID": request_id})
    assert message.content[-1].text == "fine"  # type: ignore[union-attr]
    assert message.usage.input_tokens > 0 and message.usage.output_tokens > 0
    line = gw.access_line(request_id)
    assert line["usage_estimated"] is True and line["usage"]["prompt_tokens"] > 0


def test_a_stream_cut_after_its_first_byte_ends_with_an_error_event(gw: Gateway) -> None:
    started = time.monotonic()
    with pytest.raises(anthropic.APIStatusError) as failed:
        streamed(gw, "cut")
    assert failed.value.body["type"] == "error"  # type: ignore[index]
    assert failed.value.body["error"]["type"] == "api_error"  # type: ignore[index]
    assert time.monotonic() - started < 10
    assert_up(gw)


def tiny_blocks_body(size: int) -> bytes:
    """A Messages body of about `size` bytes: one user turn of tiny text blocks."""
    head = b'{"model":"qwen-plus","max_tokens":16,"messages":[{"role":"user","content":['
    tail = b"]}]}"
    block = b'{"type":"text","text":"a"}'
    count = (size - len(head) - len(tail)) // (len(block) + 1)
    return head + b",".join([block] * count) + tail


def test_ten_megabytes_of_tiny_blocks_keep_memory_bounded(gw: Gateway, raw: RawUpstream) -> None:
    body = tiny_blocks_body(10 * MB - 1024)
    with PeakRss(gw.process.pid, interval=0.02) as rss:
        answer = requests.post(gw.url + "/v1/messages", data=body, headers=HEADERS, timeout=60)
    assert answer.status_code == 200, answer.text[:500]
    # The blocks reached the provider as one user message.
    blocks = body.count(b'"text":"a"')
    assert answer.json()["content"][0]["text"] == f"{3 * blocks - 2} characters"
    assert rss.peak < 300 * MB, f"peak {rss.peak / MB:.0f} MB"
    assert_up(gw)


def test_deep_nesting_is_a_400_in_anthropics_shape(gw: Gateway) -> None:
    depth = 100_000
    schema = b'{"a":' * depth + b"1" + b"}" * depth
    body = (
        b'{"model":"qwen-plus","max_tokens":16,"messages":[{"role":"user","content":"hi"}],'
        b'"tools":[{"name":"t","input_schema":' + schema + b"}]}"
    )
    nested = b'{"model":"qwen-plus","max_tokens":16,"messages":' + b"[" * depth + b"]" * depth
    for sent in (body, nested + b"}"):
        answer = requests.post(gw.url + "/v1/messages", data=sent, headers=HEADERS, timeout=30)
        assert answer.status_code == 400, answer.text[:500]
        assert answer.json()["type"] == "error"
        assert answer.json()["error"]["type"] == "invalid_request_error"
    assert_up(gw)


def test_tool_choice_naming_a_missing_tool_is_a_400(gw: Gateway, raw: RawUpstream) -> None:
    before = len(raw.requests)
    with pytest.raises(anthropic.BadRequestError) as refused:
        sdk(gw).messages.create(
            model="qwen-plus",
            max_tokens=16,
            messages=[{"role": "user", "content": "hi"}],
            tools=[BASH],
            tool_choice={"type": "tool", "name": "Missing"},
        )
    assert refused.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
    assert "Missing" in refused.value.body["error"]["message"]  # type: ignore[index]
    assert len(raw.requests) == before  # refused before any provider was asked
