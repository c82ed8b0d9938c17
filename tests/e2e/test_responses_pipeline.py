"""/v1/responses through the chat pipeline under real gunicorn: limits, quotas, fallback,
disconnect-cancel, and providers or clients that misbehave.

Bridged requests carry no `fake` script (the bridge sends only chat fields), so each test
scripts its provider with `FakeUpstream.forced`, or writes its bytes with `RawUpstream`.
"""

from __future__ import annotations

import socket
import time
import uuid
from collections.abc import Iterator
from typing import Any

import openai
import orjson
import pytest

from tests.constants import GATEWAY_KEY
from tests.e2e.conftest import Gateway, GatewayFactory
from tests.e2e.test_keys import KEYS_ENV, TEAM_KEY
from tests.e2e.test_keys import config as keys_config
from tests.e2e.test_responses import SHELL, post, sdk, sse_events
from tests.e2e.test_routing import KEYS as ROUTING_KEYS
from tests.e2e.test_routing import config as routing_config
from tests.e2e.test_streaming import disconnects_of
from tests.fake_upstream import FakeUpstream
from tests.raw_upstream import RawRequest, RawUpstream

pytestmark = pytest.mark.e2e

ERROR_KEYS = {"message", "type", "param", "code"}


def stream_events(gateway: Gateway, body: dict[str, Any], timeout: float = 30) -> list[Any]:
    answer = post(gateway, {**body, "stream": True}, timeout=timeout)
    assert answer.status_code == 200, answer.text
    return sse_events(answer.content)


# --- every 429 carries Retry-After ------------------------------------------------------
def test_the_gateways_own_429_carries_retry_after(start_gateway: GatewayFactory) -> None:
    gateway = start_gateway(RATE_LIMIT_REQUESTS_PER_MINUTE="1")
    assert post(gateway, {"model": "qwen-plus", "input": "hi"}).status_code == 200

    refused = post(gateway, {"model": "qwen-plus", "input": "hi", "stream": True})

    assert refused.status_code == 429
    assert int(refused.headers["Retry-After"]) >= 1
    assert refused.json()["error"].keys() == ERROR_KEYS


def test_a_providers_429_without_retry_after_gets_one(
    start_gateway: GatewayFactory, a: FakeUpstream
) -> None:
    a.forced = {"status": 429}
    gateway = start_gateway(TARGET_API_URL=a.url, RATE_LIMIT_REQUESTS_PER_MINUTE="0")

    for stream in (False, True):
        refused = post(gateway, {"model": "qwen-plus", "input": "hi", "stream": stream})
        assert refused.status_code == 429
        assert int(refused.headers["Retry-After"]) >= 1
        assert refused.json()["error"]["message"]
    with pytest.raises(openai.RateLimitError) as raised:
        sdk(gateway).responses.create(model="qwen-plus", input="hi")
    assert raised.value.response.headers["retry-after"]


# --- the pipeline: quotas, fallback, disconnect-cancel ------------------------------------
def test_a_token_quota_is_charged_for_responses(start_gateway: GatewayFactory) -> None:
    gateway = start_gateway(keys_config(tokens_per_day=20), **KEYS_ENV)
    client = sdk(gateway, TEAM_KEY)
    first = client.responses.create(model="qwen-plus", input="hi")
    assert first.usage is not None and first.usage.total_tokens == 11  # the fake's 5 + 6
    with client.responses.stream(model="qwen-plus", input="hi") as stream:
        second = stream.get_final_response()  # 11 used: still admitted
    assert second.usage is not None and second.usage.total_tokens == 18  # the stream's 11 + 7

    with pytest.raises(openai.RateLimitError) as spent:
        client.responses.create(model="qwen-plus", input="hi")

    assert spent.value.code == "insufficient_quota"
    assert "29 of 20" in spent.value.message
    assert spent.value.response.headers["retry-after"]


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_a_failing_provider_falls_back_before_the_first_byte(
    start_gateway: GatewayFactory, a: FakeUpstream, b: FakeUpstream, stream: bool
) -> None:
    a.forced = {"status": 500}
    gateway = start_gateway(routing_config(a.url, b.url), **ROUTING_KEYS)

    answer = post(gateway, {"model": "gpt-4o-mini", "input": "hi", "stream": stream})

    assert answer.status_code == 200, answer.text
    assert len(a.requests) == 1 and len(b.requests) == 1
    assert orjson.loads(b.requests[0].body)["model"] == "qwen-plus-intl"
    if stream:
        events = sse_events(answer.content)
        assert [e["type"] for e in events].count("response.created") == 1
        assert events[-1]["type"] == "response.completed"
        assert events[-1]["response"]["model"] == "gpt-4o-mini"
    else:
        assert answer.json()["status"] == "completed"


def test_a_client_leaving_a_stream_cancels_the_providers(
    start_gateway: GatewayFactory, a: FakeUpstream
) -> None:
    a.forced = {"chunks": 100, "delay": 0.1}
    gateway = start_gateway(TARGET_API_URL=a.url, RATE_LIMIT_REQUESTS_PER_MINUTE="0")
    request_id = uuid.uuid4().hex
    body = {"model": "qwen-plus", "input": "hi", "stream": True}
    answer = post(gateway, body, headers={"X-Request-ID": request_id}, stream=True)
    chunks = answer.iter_content(chunk_size=None)
    seen = b""
    while b"response.output_text.delta" not in seen:
        seen += next(chunks)

    answer.close()

    gone = disconnects_of(a, request_id)
    assert gone, "the provider never saw the gateway close the stream"
    assert gone[0].chunks_sent < 100


# --- hostile clients ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_gateway(
    tmp_path_factory: pytest.TempPathFactory, fake_upstream: FakeUpstream
) -> Iterator[Gateway]:
    """A gateway with a 1 MiB body limit."""
    factory = GatewayFactory(tmp_path_factory.mktemp("small"), fake_upstream.url)
    yield factory(RATE_LIMIT_REQUESTS_PER_MINUTE="0", MAX_REQUEST_BODY_BYTES=str(1 << 20))
    factory.stop_all()


def tiny_items(count: int) -> bytes:
    item = b'{"role":"user","content":"x"},'
    return b'{"model":"qwen-plus","input":[' + item * (count - 1) + item[:-1] + b"]}"


def test_a_huge_input_array_is_answered_under_the_limit_and_413_over_it(
    small_gateway: Gateway, fake_upstream: FakeUpstream
) -> None:
    under = tiny_items(30_000)  # 900 kB: 30 000 messages
    assert len(under) < 1 << 20
    started = time.monotonic()
    answered = post(small_gateway, under)
    assert answered.status_code == 200, answered.text
    assert time.monotonic() - started < 10
    sent = orjson.loads(fake_upstream.requests[-1].body)
    assert len(sent["messages"]) == 30_000

    refused = post(small_gateway, tiny_items(40_000))

    assert refused.status_code == 413
    assert refused.json()["error"].keys() == ERROR_KEYS


@pytest.mark.parametrize(
    "body",
    [
        b'{"model":"qwen-plus","input":' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        b'{"model":"qwen-plus","input":[{"role":"user","content":"x","extra":'
        + b'{"a":' * 5_000
        + b"1"
        + b"}" * 5_000
        + b"}]}",
    ],
    ids=["deep-input", "deep-unknown-field"],
)
def test_deep_nesting_is_a_400_in_openais_shape(small_gateway: Gateway, body: bytes) -> None:
    refused = post(small_gateway, body)
    assert refused.status_code == 400, refused.text
    assert refused.json()["error"].keys() == ERROR_KEYS


def test_a_deep_tool_schema_is_a_400_naming_it(small_gateway: Gateway) -> None:
    schema: dict[str, Any] = {"type": "object"}
    for _ in range(100):
        schema = {"type": "object", "properties": {"x": schema}}
    tool = {**SHELL, "parameters": schema}

    refused = post(small_gateway, {"model": "qwen-plus", "input": "x", "tools": [tool]})

    assert refused.status_code == 400
    assert refused.json()["error"]["param"] == "tools[0].parameters"


# --- hostile providers -------------------------------------------------------------------
def test_a_provider_stream_cut_mid_way_ends_with_response_failed(
    start_gateway: GatewayFactory, a: FakeUpstream
) -> None:
    gateway = start_gateway(TARGET_API_URL=a.url, RATE_LIMIT_REQUESTS_PER_MINUTE="0")
    for cut in ({"chunks": 5, "die_after": 3}, {"chunks": 5, "close_after": 3}):
        a.forced = cut

        events = stream_events(gateway, {"model": "qwen-plus", "input": "hi"})

        types = [e["type"] for e in events]
        assert types[0] == "response.created" and types[-1] == "response.failed", types
        assert "response.completed" not in types
        failed = events[-1]["response"]
        assert failed["status"] == "failed" and failed["error"]["message"]
        # What was said before the cut is kept, as an incomplete message.
        assert failed["output"][0]["content"][0]["text"].startswith("tok0 ")
        numbers = [e["sequence_number"] for e in events]
        assert numbers == sorted(set(numbers))


def sse(*payloads: bytes) -> bytes:
    return b"".join(b"data: " + p + b"\n\n" for p in payloads)


def stream_head() -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n"


def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
    choice = {"index": 0, "delta": delta, "finish_reason": finish}
    return orjson.dumps({"id": "c", "object": "chat.completion.chunk", "choices": [choice]})


TOOL_OPENED = chunk(
    {
        "role": "assistant",
        "tool_calls": [
            {"index": 0, "id": "call_1", "type": "function", "function": {"name": "shell"}}
        ],
    }
)
TOOL_PIECE = chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"comm'}}]})


@pytest.fixture
def raw() -> Iterator[RawUpstream]:
    upstream = RawUpstream(lambda request, conn: False).start()
    yield upstream
    upstream.stop()


@pytest.mark.parametrize("ending", ["closed", "silent"])
def test_a_tool_call_that_never_finishes_ends_with_response_failed(
    start_gateway: GatewayFactory, raw: RawUpstream, ending: str
) -> None:
    def answer(request: RawRequest, conn: socket.socket) -> bool:
        conn.sendall(stream_head() + sse(TOOL_OPENED, TOOL_PIECE))
        if ending == "silent":  # nothing more, the connection held open
            raw.wait_closed(conn, 20)
        return False

    raw.answer = answer
    gateway = start_gateway(
        TARGET_API_URL=raw.url, RATE_LIMIT_REQUESTS_PER_MINUTE="0", UPSTREAM_READ_TIMEOUT="2"
    )
    started = time.monotonic()

    events = stream_events(gateway, {"model": "qwen-plus", "input": "run", "tools": [SHELL]})

    assert time.monotonic() - started < 15
    types = [e["type"] for e in events]
    assert types[-1] == "response.failed", types
    assert "response.function_call_arguments.done" not in types
    (call,) = events[-1]["response"]["output"]
    assert call["type"] == "function_call" and call["status"] == "incomplete"
    assert call["arguments"] == '{"comm'


def test_garbage_chunks_are_skipped_and_the_answer_completes(
    start_gateway: GatewayFactory, raw: RawUpstream
) -> None:
    def answer(request: RawRequest, conn: socket.socket) -> bool:
        body = (
            b": keep-alive\n\n"
            + sse(chunk({"role": "assistant", "content": "Hel"}))
            + b"data: {not json\n\n"
            + b"data: \xff\xfe\x00garbage\n\n"
            + b"data: "
            + b"[" * 10_000
            + b"\n\n"
            + b"event: ping\ndata: 12\n\n"
            + sse(chunk({"content": "lo"}), chunk({}, "stop"), b"[DONE]")
        )
        conn.sendall(stream_head() + body)
        return False

    raw.answer = answer
    gateway = start_gateway(TARGET_API_URL=raw.url, RATE_LIMIT_REQUESTS_PER_MINUTE="0")

    with sdk(gateway).responses.stream(model="qwen-plus", input="hi") as stream:
        final = stream.get_final_response()

    assert final.status == "completed" and final.output_text == "Hello"


def test_a_provider_answering_garbage_json_is_a_502(
    start_gateway: GatewayFactory, raw: RawUpstream
) -> None:
    def answer(request: RawRequest, conn: socket.socket) -> bool:
        body = b'{"choices": [{"message": {"content": 12}}]' + b"}" * 3
        head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
        conn.sendall(head + b"Content-Length: %d\r\n\r\n" % len(body) + body)
        return False

    raw.answer = answer
    gateway = start_gateway(TARGET_API_URL=raw.url, RATE_LIMIT_REQUESTS_PER_MINUTE="0")

    refused = post(gateway, {"model": "qwen-plus", "input": "hi"})

    assert refused.status_code == 502, refused.text
    assert refused.json()["error"].keys() == ERROR_KEYS
    assert GATEWAY_KEY not in refused.text
