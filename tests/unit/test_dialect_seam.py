"""The seam every dialect rides: legs per provider, SSE framing, usage names, error shapes,
the caller's key as x-api-key. The dialects' own mappings are in test_protocol_*."""

from __future__ import annotations

import json

import orjson
import pytest
import responses
from flask.testing import FlaskClient

from gateway.config import Provider
from gateway.record import RequestRecord
from gateway.upstream.sse import (
    MAX_TRANSLATED_EVENT_BYTES,
    EventTooLargeError,
    SseData,
    UsageChunks,
)
from tests.constants import GATEWAY_KEY, UNIT_UPSTREAM, UPSTREAM_KEY

MESSAGES = {"model": "m", "max_tokens": 50, "messages": [{"role": "user", "content": "hi"}]}
CHAT_ANSWER = {
    "id": "c1",
    "object": "chat.completion",
    "model": "m",
    "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "hello"}, "finish_reason": "stop"}
    ],
    "usage": {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11},
}
STREAM = (
    b'data: {"choices":[{"index":0,"delta":{"role":"assistant","content":"he"}}]}\n\n'
    b'data: {"choices":[{"index":0,"delta":{"content":"llo"},"finish_reason":null}]}\r\n\r\n'
    b'event: x\ndata: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n'
    b": keep-alive\n\n"
    b'data: {"choices":[],"usage":{"prompt_tokens":9,"completion_tokens":2}}\n\n'
    b"data: [DONE]\n\n"
)


@pytest.mark.parametrize("cut", range(1, len(STREAM)))
def test_sse_data_gives_the_same_payloads_whatever_the_cut(cut: int) -> None:
    whole = SseData().feed(STREAM)
    events = SseData()
    split = events.feed(STREAM[:cut]) + events.feed(STREAM[cut:]) + events.flush()
    assert split == whole
    assert len(whole) == 5
    assert whole[-1] == b"[DONE]"
    assert whole[2].startswith(b'{"choices"')  # the event: line is not part of the data


def test_sse_data_keeps_an_unterminated_last_event_and_joins_data_lines() -> None:
    events = SseData()
    assert events.feed(b"data: a\ndata: b\n\ndata: tail") == [b"a\nb"]
    assert events.flush() == [b"tail"]


def test_usage_of_a_messages_stream_adds_up_across_events() -> None:
    record = RequestRecord("r", "POST", "/v1/messages", "/v1/messages")
    record.note_usage(
        b'{"type":"message_start","message":{"usage":{"input_tokens":120,"output_tokens":1}}}'
    )
    record.note_usage(b'{"type":"message_delta","usage":{"output_tokens":37}}')
    assert record.usage == {"prompt_tokens": 120, "completion_tokens": 37}


def test_usage_of_a_responses_answer_reads_its_counts_not_its_details() -> None:
    record = RequestRecord("r", "POST", "/v1/responses", "/v1/responses")
    record.note_usage(
        b'{"usage":{"input_tokens":40,"input_tokens_details":{"cached_tokens":8},'
        b'"output_tokens":12,"output_tokens_details":{"reasoning_tokens":5},"total_tokens":52}}'
    )
    # The cached part is kept beside the counts (priced at cached_input), never added to them.
    assert record.usage == {
        "prompt_tokens": 40,
        "completion_tokens": 12,
        "total_tokens": 52,
        "cached_tokens": 8,
    }


@pytest.mark.parametrize(
    ("fields", "messages", "responses_", "anthropic_base"),
    [
        (
            {"preset": "dashscope-beijing"},
            True,
            True,
            "https://dashscope.aliyuncs.com/apps/anthropic",
        ),
        (
            {"preset": "dashscope-singapore"},
            True,
            True,
            "https://dashscope-intl.aliyuncs.com/apps/anthropic",
        ),
        ({"preset": "openai"}, False, True, "https://api.openai.com"),
        ({"preset": "anthropic"}, True, False, "https://api.anthropic.com"),
        ({"base_url": "http://127.0.0.1:8000/v1"}, False, False, "http://127.0.0.1:8000"),
        (
            {"base_url": "http://127.0.0.1:8000/v1", "native": ["messages"]},
            True,
            False,
            "http://127.0.0.1:8000",
        ),
        (
            {"preset": "dashscope", "native": []},
            False,
            False,
            "https://dashscope.aliyuncs.com/apps/anthropic",
        ),
        (
            {"base_url": "http://h/v1", "anthropic_base_url": "http://h/anthropic/"},
            False,
            False,
            "http://h/anthropic",
        ),
    ],
)
def test_what_a_provider_serves_natively(
    fields: dict[str, object], messages: bool, responses_: bool, anthropic_base: str
) -> None:
    provider = Provider.model_validate({"name": "p", **fields})
    assert provider.serves("messages") is messages
    assert provider.serves("responses") is responses_
    assert provider.anthropic_base_url == anthropic_base


def test_a_dialect_the_gateway_does_not_know_is_refused() -> None:
    with pytest.raises(ValueError, match="native"):
        Provider.model_validate({"name": "p", "preset": "openai", "native": ["gemini"]})


def test_x_api_key_is_a_gateway_key_and_never_leaves(
    client: FlaskClient, upstream: responses.RequestsMock
) -> None:
    upstream.post(f"{UNIT_UPSTREAM}/chat/completions", json=CHAT_ANSWER)
    answer = client.post("/v1/messages", json=MESSAGES, headers={"x-api-key": GATEWAY_KEY})
    assert answer.status_code == 200, answer.data
    assert answer.get_json()["content"] == [{"type": "text", "text": "hello"}]
    sent = upstream.calls[0].request
    assert sent.headers["Authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert "x-api-key" not in {name.lower() for name in sent.headers}
    assert GATEWAY_KEY.encode() not in (sent.body or b"")


def test_x_api_key_works_on_chat_too_and_a_wrong_bearer_is_not_rescued(
    client: FlaskClient, upstream: responses.RequestsMock
) -> None:
    upstream.post(f"{UNIT_UPSTREAM}/chat/completions", json=CHAT_ANSWER)
    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    assert (
        client.post(
            "/v1/chat/completions", json=chat, headers={"x-api-key": GATEWAY_KEY}
        ).status_code
        == 200
    )
    both = {"x-api-key": GATEWAY_KEY, "Authorization": "Bearer wrong-key-0000000"}
    refused = client.post("/v1/chat/completions", json=chat, headers=both)
    assert refused.status_code == 401


def test_anthropic_headers_reach_no_chat_provider(
    client: FlaskClient, upstream: responses.RequestsMock
) -> None:
    upstream.post(f"{UNIT_UPSTREAM}/chat/completions", json=CHAT_ANSWER)
    headers = {
        "x-api-key": GATEWAY_KEY,
        "anthropic-version": "2023-06-01",
        "anthropic-beta": "claude-code-20250219,interleaved-thinking-2025-05-14",
    }
    assert client.post("/v1/messages?beta=true", json=MESSAGES, headers=headers).status_code == 200
    sent = upstream.calls[0].request
    assert not [name for name in sent.headers if name.lower().startswith("anthropic-")]
    assert sent.url == f"{UNIT_UPSTREAM}/chat/completions"  # ?beta=true is the client's own


@pytest.mark.parametrize(
    ("headers", "body", "status", "kind"),
    [
        ({}, MESSAGES, 401, "authentication_error"),
        ({"x-api-key": "not-a-key-at-all"}, MESSAGES, 401, "authentication_error"),
        ({"x-api-key": GATEWAY_KEY}, b"{not json", 400, "invalid_request_error"),
        ({"x-api-key": GATEWAY_KEY}, {"model": "m"}, 400, "invalid_request_error"),
    ],
)
def test_the_gateway_answers_messages_routes_in_anthropic_shape(
    client: FlaskClient, headers: dict[str, str], body: object, status: int, kind: str
) -> None:
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    headers = {**headers, "Content-Type": "application/json"}
    answer = client.post("/v1/messages", data=data, headers=headers)
    assert answer.status_code == status
    error = answer.get_json()
    assert error["type"] == "error"
    assert error["error"]["type"] == kind
    assert error["error"]["message"]
    assert set(error) == {"type", "error"}


def test_a_provider_error_on_a_translated_leg_comes_back_in_anthropic_shape(
    client: FlaskClient, upstream: responses.RequestsMock
) -> None:
    refusal = {
        "error": {"message": "Invalid value for temperature", "type": "invalid_request_error"}
    }
    upstream.post(f"{UNIT_UPSTREAM}/chat/completions", json=refusal, status=400)
    answer = client.post("/v1/messages", json=MESSAGES, headers={"x-api-key": GATEWAY_KEY})
    assert answer.status_code == 400
    body = answer.get_json()
    assert body["type"] == "error"
    assert body["error"]["type"] == "invalid_request_error"
    assert "temperature" in body["error"]["message"]


def test_a_body_chat_cannot_carry_is_a_400_and_holds_no_provider_slot(
    client: FlaskClient, upstream: responses.RequestsMock
) -> None:
    server_tool = {**MESSAGES, "tools": [{"type": "web_search_20250305", "name": "web_search"}]}
    answer = client.post("/v1/messages", json=server_tool, headers={"x-api-key": GATEWAY_KEY})
    assert answer.status_code == 400, answer.data
    assert answer.get_json()["error"]["type"] == "invalid_request_error"
    assert not upstream.calls
    router = client.application.extensions["gateway.upstream"].router
    assert sum(router._provider_in_flight.values()) == 0


def test_openai_routes_keep_openai_errors(client: FlaskClient) -> None:
    answer = client.post(
        "/v1/responses", data=b"{", headers={"Authorization": f"Bearer {GATEWAY_KEY}"}
    )
    assert answer.status_code == 400
    assert set(answer.get_json()) == {"error"}


def test_translated_answer_is_json_whatever_the_provider_labelled_it(
    client: FlaskClient, upstream: responses.RequestsMock
) -> None:
    upstream.post(
        f"{UNIT_UPSTREAM}/chat/completions",
        body=json.dumps(CHAT_ANSWER),
        content_type="text/plain",
    )
    answer = client.post("/v1/messages", json=MESSAGES, headers={"x-api-key": GATEWAY_KEY})
    assert answer.status_code == 200
    assert answer.mimetype == "application/json"
    assert answer.get_json()["usage"]["output_tokens"] == 2


def test_an_event_that_never_ends_is_cut_without_copying_per_piece() -> None:
    events = SseData()
    piece = b"x" * 65536
    events.feed(b"data: ")
    with pytest.raises(EventTooLargeError):
        for _ in range(MAX_TRANSLATED_EVENT_BYTES // len(piece) + 2):
            assert events.feed(piece) == []
    # What follows is read afresh.
    assert events.feed(b"\n\ndata: ok\n\n") == [b"ok"]


@pytest.mark.parametrize("piece", [1000, 65536, 300_000])
def test_the_usage_of_a_long_response_completed_event_is_counted(piece: int) -> None:
    record = RequestRecord("r", "POST", "/v1/responses", "/v1/responses")
    text = "y" * 200_000
    completed = orjson.dumps(
        {
            "type": "response.completed",
            "response": {
                "output": [{"type": "message", "content": [{"type": "output_text", "text": text}]}],
                "usage": {"input_tokens": 31, "output_tokens": 50_000, "total_tokens": 50_031},
                "metadata": {},
            },
        }
    )
    stream = b"event: response.completed\ndata: " + completed + b"\n\n"
    chunks = UsageChunks(record, remove=False)
    relayed = b"".join(chunks.feed(stream[i : i + piece]) for i in range(0, len(stream), piece))
    assert relayed == stream
    assert record.usage == {
        "prompt_tokens": 31,
        "completion_tokens": 50_000,
        "total_tokens": 50_031,
    }
