"""`POST /v1/messages` under real gunicorn, through the official `anthropic` SDK.

One gateway serves the module: `claude-haiku-*` is bridged to a Chat Completions provider
(the chat-mode `FakeDialects`), `claude-sonnet-*` relayed to a provider that speaks Messages
itself (the messages-mode `FakeDialects`), `scripted` to a `FakeUpstream` whose `forced`
script makes it refuse. What each provider received is asserted as well as what the SDK
parsed: no Anthropic-only field or header, and never the gateway's key, reaches a provider.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import anthropic
import pytest
import requests

from tests.constants import GATEWAY_KEY, SECOND_GATEWAY_KEY
from tests.e2e.conftest import Gateway, GatewayFactory
from tests.e2e.test_routing import refusing_url
from tests.e2e.test_streaming import disconnects_of
from tests.fake_dialects import AgentScript, FakeDialects
from tests.fake_dialects import Received as DialectReceived
from tests.fake_upstream import FakeUpstream

pytestmark = pytest.mark.e2e

CHAT_KEY = "sk-chat-provider-e2e-0a1b2c3d4e5f"
NATIVE_KEY = "sk-native-provider-e2e-6a7b8c9d0e1f"
TEAM_KEY = "team-messages-key-0123456789"
LIMITED_KEY = "limited-messages-key-0123456789"
QUOTA_KEY = "quota-messages-key-0123456789"
ENV = {
    "CHAT_KEY": CHAT_KEY,
    "NATIVE_KEY": NATIVE_KEY,
    "TEAM_KEY": TEAM_KEY,
    "LIMITED_KEY": LIMITED_KEY,
    "QUOTA_KEY": QUOTA_KEY,
    "RATE_LIMIT_REQUESTS_PER_MINUTE": "0",
}
BRIDGED = "claude-haiku-4-5"
NATIVE = "claude-sonnet-4-6"
BILLING = "x-anthropic-billing-header: cc_version=2.1.328.abc; cc_entrypoint=cli; cch=1f2e3;"
BASH: Any = {
    "name": "Bash",
    "description": "Runs a shell command",
    "input_schema": {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "type": "object",
        "properties": {"command": {"type": "string"}},
        "required": ["command"],
        "additionalProperties": False,
    },
    "cache_control": {"type": "ephemeral"},
}
SCRIPT = AgentScript(command="echo gateway-ok > result.txt", delay=0.001)
# Everything Claude Code sends that only Anthropic understands.
ANTHROPIC_ONLY: Any = {
    "system": [
        {"type": "text", "text": BILLING},
        {"type": "text", "text": "You are Claude Code.", "cache_control": {"type": "ephemeral"}},
    ],
    "metadata": {"user_id": json.dumps({"device_id": "d" * 64, "session_id": "s"})},
    "extra_body": {
        "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
        "output_config": {"effort": "high"},
    },
    "thinking": {"type": "adaptive"},
    "extra_headers": {
        "anthropic-beta": "claude-code-20250219,interleaved-thinking-2025-05-14",
        "X-Request-ID": "",
    },
}
# Anywhere in the body sent to a chat provider (thinking may only become reasoning_effort).
FORBIDDEN_TEXT = (
    "cache_control",
    "context_management",
    "output_config",
    "x-anthropic-billing-header",
    "device_id",
    "claude-code-20250219",
)
FORBIDDEN_FIELDS = {"thinking", "metadata", "betas", "effort", "top_k", "system", "user"}


def config(chat: str, native: str, scripted: str) -> str:
    return f"""
providers:
  chat:
    base_url: {chat}
    api_key_env: CHAT_KEY
  native:
    base_url: {native}
    api_key_env: NATIVE_KEY
    native: [messages]
  scripted:
    base_url: {scripted}
    api_key_env: CHAT_KEY
models:
  claude-haiku-*:
    - {{provider: chat, model: qwen-plus}}
  claude-sonnet-*:
    - {{provider: native, model: qwen3-coder-plus}}
  scripted:
    - {{provider: scripted, model: qwen-plus}}
keys:
  - name: team
    key_env: TEAM_KEY
    models: [claude-haiku-*]
  - name: limited
    key_env: LIMITED_KEY
    rpm: 1
  - name: quota
    key_env: QUOTA_KEY
    tokens_per_day: 20
"""


@pytest.fixture(scope="module")
def chat_fake() -> Iterator[FakeDialects]:
    with FakeDialects(frozenset({"chat"}), SCRIPT) as fake:
        yield fake


@pytest.fixture(scope="module")
def native_fake() -> Iterator[FakeDialects]:
    with FakeDialects(frozenset({"messages"}), SCRIPT) as fake:
        yield fake


@pytest.fixture(scope="module")
def scripted() -> Iterator[FakeUpstream]:
    upstream = FakeUpstream().start()
    yield upstream
    upstream.stop()


@pytest.fixture(scope="module")
def gw(
    tmp_path_factory: pytest.TempPathFactory,
    chat_fake: FakeDialects,
    native_fake: FakeDialects,
    scripted: FakeUpstream,
) -> Iterator[Gateway]:
    factory = GatewayFactory(tmp_path_factory.mktemp("messages"), scripted.url)
    yield factory(config(chat_fake.url, native_fake.base_url, scripted.url), **ENV)
    factory.stop_all()


@pytest.fixture
def forced(scripted: FakeUpstream) -> Iterator[dict[str, Any]]:
    """What the `scripted` provider answers every request, for one test."""
    yield scripted.forced
    scripted.forced.clear()


def sdk(gateway: Gateway, key: str = GATEWAY_KEY) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gateway.url, api_key=key, max_retries=0, timeout=30)


def ask(text: str) -> list[Any]:
    return [{"role": "user", "content": text}]


def tagged(fake: FakeDialects, path: str, request_id: str) -> DialectReceived:
    """The one request `fake` received at `path` for the gateway's request `request_id`."""
    (found,) = [r for r in fake.received(path) if r.headers.get("x-request-id") == request_id]
    return found


def with_id(options: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    request_id = uuid.uuid4().hex
    headers = {**options.get("extra_headers", {}), "X-Request-ID": request_id}
    return request_id, {**options, "extra_headers": headers}


def assert_clean_for_chat(received: DialectReceived) -> None:
    """Nothing only Anthropic understands, and no gateway key, reached the chat provider."""
    text = received.body.decode()
    for name in FORBIDDEN_TEXT:
        assert name not in text, f"{name} reached the chat provider: {text[:2000]}"
    assert not FORBIDDEN_FIELDS & set(received.json), text[:2000]
    assert not [h for h in received.headers if h.startswith("anthropic-")], received.headers
    assert "x-api-key" not in received.headers
    assert received.headers["authorization"] == f"Bearer {CHAT_KEY}"
    assert GATEWAY_KEY not in str(received.headers) and GATEWAY_KEY not in text


# --- bridged to a Chat Completions provider ----------------------------------------------
def test_create_is_translated_and_strips_anthropic_only_fields(
    gw: Gateway, chat_fake: FakeDialects
) -> None:
    request_id, options = with_id(ANTHROPIC_ONLY)

    message = sdk(gw).messages.create(
        model=BRIDGED, max_tokens=256, messages=ask("say hi"), **options
    )

    assert message.type == "message" and message.id.startswith("msg_")
    assert [b.type for b in message.content][-1] == "text"
    assert message.content[-1].text == "OK"
    assert message.stop_reason == "end_turn"
    assert message.usage.input_tokens > 0 and message.usage.output_tokens == 12
    received = tagged(chat_fake, "/v1/chat/completions", request_id)
    assert_clean_for_chat(received)
    body = received.json
    assert body["model"] == "qwen-plus"
    assert body["messages"][0] == {"role": "system", "content": "You are Claude Code."}
    assert "stream_options" not in body and "stream" not in body
    line = gw.access_line(request_id)
    assert line["status"] == 200 and line["path"] == "/v1/messages"
    assert line["usage"]["prompt_tokens"] == message.usage.input_tokens


def test_stream_reports_input_tokens_first_and_asks_the_provider_for_usage(
    gw: Gateway, chat_fake: FakeDialects
) -> None:
    request_id, options = with_id(ANTHROPIC_ONLY)

    with sdk(gw).messages.stream(
        model=BRIDGED, max_tokens=256, messages=ask("say hi"), **options
    ) as stream:
        events = list(stream)
        message = stream.get_final_message()

    start = events[0]
    assert start.type == "message_start" and start.message.usage.input_tokens > 0
    assert events[-1].type == "message_stop"
    assert message.content[-1].text == "OK"  # type: ignore[union-attr]
    assert message.stop_reason == "end_turn"
    assert message.usage.output_tokens == 12
    body = tagged(chat_fake, "/v1/chat/completions", request_id).json
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert_clean_for_chat(tagged(chat_fake, "/v1/chat/completions", request_id))
    line = gw.access_line(request_id)
    assert line["usage"]["completion_tokens"] == 12 and "usage_estimated" not in line


@pytest.mark.parametrize("streamed", [True, False], ids=["stream", "create"])
def test_a_tool_round_trip_is_translated_both_ways(
    gw: Gateway, chat_fake: FakeDialects, streamed: bool
) -> None:
    client = sdk(gw)
    asked = ask("run it")
    first_id, options = with_id({"tools": [BASH]})
    if streamed:
        with client.messages.stream(
            model=BRIDGED, max_tokens=256, messages=asked, **options
        ) as stream:
            call_message = stream.get_final_message()
    else:
        call_message = client.messages.create(
            model=BRIDGED, max_tokens=256, messages=asked, **options
        )

    (call,) = call_message.content
    assert call.type == "tool_use" and call.id.startswith("toolu_")
    assert call.name == "Bash" and call.input == {"command": SCRIPT.command}
    assert call_message.stop_reason == "tool_use"
    sent_tools = tagged(chat_fake, "/v1/chat/completions", first_id).json["tools"]
    assert sent_tools == [
        {
            "type": "function",
            "function": {
                "name": "Bash",
                "parameters": BASH["input_schema"],
                "description": BASH["description"],
            },
        }
    ]

    result: Any = {"type": "tool_result", "tool_use_id": call.id, "content": "gateway-ok\n"}
    asked += [
        {"role": "assistant", "content": call_message.content},
        {"role": "user", "content": [result]},
    ]
    second_id, options = with_id({"tools": [BASH]})
    final = client.messages.create(model=BRIDGED, max_tokens=256, messages=asked, **options)

    assert final.content[-1].text == "The command printed: gateway-ok"
    sent = tagged(chat_fake, "/v1/chat/completions", second_id).json["messages"]
    assistant, tool = sent[-2:]
    assert assistant["tool_calls"][0]["id"] == call.id
    assert json.loads(assistant["tool_calls"][0]["function"]["arguments"]) == call.input
    assert tool == {"role": "tool", "tool_call_id": call.id, "content": "gateway-ok\n"}


def test_count_tokens_is_estimated_for_a_bridged_provider(
    gw: Gateway, chat_fake: FakeDialects
) -> None:
    before = len(chat_fake.requests)
    counted = sdk(gw).messages.count_tokens(model=BRIDGED, messages=ask("a" * 400), tools=[BASH])
    assert 100 < counted.input_tokens < 400
    assert len(chat_fake.requests) == before  # nothing sent to count


# --- native: a provider that serves Messages itself ----------------------------------------
def test_native_provider_gets_the_request_nearly_as_sent(
    gw: Gateway, native_fake: FakeDialects
) -> None:
    request_id, options = with_id(ANTHROPIC_ONLY)

    with sdk(gw).messages.stream(
        model=NATIVE, max_tokens=256, messages=ask("say hi"), **options
    ) as stream:
        message = stream.get_final_message()

    assert message.content[-1].text == "OK"  # type: ignore[union-attr]
    received = tagged(native_fake, "/v1/messages", request_id)
    body = received.json
    assert body["model"] == "qwen3-coder-plus"  # the alias, rewritten
    assert body["system"] == [ANTHROPIC_ONLY["system"][1]]  # the billing header dropped
    assert body["context_management"] == ANTHROPIC_ONLY["extra_body"]["context_management"]
    assert body["thinking"] == {"type": "adaptive"} and body["stream"] is True
    assert received.headers["x-api-key"] == NATIVE_KEY
    # The client's own version, relayed.
    assert received.headers["anthropic-version"] == sdk(gw).default_headers["anthropic-version"]
    assert "anthropic-beta" not in received.headers  # flags only Anthropic knows
    assert GATEWAY_KEY not in str(received.headers)
    line = gw.access_line(request_id)
    assert line["provider"] == "native" and line["status"] == 200
    assert line["usage"]["prompt_tokens"] == message.usage.input_tokens > 0
    assert line["usage"]["completion_tokens"] == 12


def test_native_create_and_count_tokens_are_relayed(gw: Gateway, native_fake: FakeDialects) -> None:
    client = sdk(gw, SECOND_GATEWAY_KEY)
    request_id, options = with_id({})
    message = client.messages.create(model=NATIVE, max_tokens=64, messages=ask("hi"), **options)
    assert message.id.startswith("msg_fake") and message.usage.output_tokens == 12
    assert tagged(native_fake, "/v1/messages", request_id).headers["x-api-key"] == NATIVE_KEY

    count_id, options = with_id({})
    counted = client.messages.count_tokens(model=NATIVE, messages=ask("hi"), **options)
    relayed = tagged(native_fake, "/v1/messages/count_tokens", count_id)
    assert counted.input_tokens == max(1, len(relayed.body) // 4)  # the fake's own count
    assert relayed.json["model"] == "qwen3-coder-plus"
    assert SECOND_GATEWAY_KEY not in str(relayed.headers)


# --- errors, in Anthropic's shape, as the SDK raises them ---------------------------------
def assert_anthropic_error(error: anthropic.APIStatusError, status: int, kind: str) -> None:
    body: Any = error.body
    assert error.status_code == status
    assert body == {"type": "error", "error": {"type": kind, "message": body["error"]["message"]}}


def test_a_wrong_or_missing_key_is_an_authentication_error(gw: Gateway) -> None:
    with pytest.raises(anthropic.AuthenticationError) as refused:
        sdk(gw, "not-a-gateway-key").messages.create(
            model=BRIDGED, max_tokens=16, messages=ask("hi")
        )
    assert_anthropic_error(refused.value, 401, "authentication_error")

    body: Any = {"model": BRIDGED, "max_tokens": 16, "messages": ask("hi")}
    missing = requests.post(gw.url + "/v1/messages?beta=true", json=body, timeout=10)
    assert missing.status_code == 401
    assert missing.json()["error"]["type"] == "authentication_error"


def test_a_model_outside_the_keys_list_is_a_permission_error(gw: Gateway) -> None:
    with pytest.raises(anthropic.PermissionDeniedError) as refused:
        sdk(gw, TEAM_KEY).messages.create(model=NATIVE, max_tokens=16, messages=ask("hi"))
    assert_anthropic_error(refused.value, 403, "permission_error")
    assert sdk(gw, TEAM_KEY).messages.count_tokens(model=BRIDGED, messages=ask("hi"))
    with pytest.raises(anthropic.PermissionDeniedError):
        sdk(gw, TEAM_KEY).messages.count_tokens(model=NATIVE, messages=ask("hi"))


def test_a_model_without_a_route_is_not_found(gw: Gateway) -> None:
    with pytest.raises(anthropic.NotFoundError) as missing:
        sdk(gw).messages.create(model="claude-opus-9", max_tokens=16, messages=ask("hi"))
    assert_anthropic_error(missing.value, 404, "not_found_error")


def test_a_body_over_the_limit_is_request_too_large(gw: Gateway) -> None:
    with pytest.raises(anthropic.RequestTooLargeError) as large:
        sdk(gw).messages.create(
            model=BRIDGED, max_tokens=16, messages=ask("x" * (10 * 1024 * 1024 + 1))
        )
    assert_anthropic_error(large.value, 413, "request_too_large")


def test_the_keys_rpm_is_a_rate_limit_error_with_retry_after(gw: Gateway) -> None:
    client = sdk(gw, LIMITED_KEY)
    client.messages.create(model=BRIDGED, max_tokens=16, messages=ask("hi"))
    with pytest.raises(anthropic.RateLimitError) as limited:
        client.messages.create(model=BRIDGED, max_tokens=16, messages=ask("hi"))
    assert_anthropic_error(limited.value, 429, "rate_limit_error")
    assert 0 < int(limited.value.response.headers["retry-after"]) <= 60


def test_a_providers_refusal_is_a_bad_request(gw: Gateway, forced: dict[str, Any]) -> None:
    error = {"message": "temperature: out of range", "type": "invalid_request_error"}
    forced.update(status=400, error_body={"error": error})
    with pytest.raises(anthropic.BadRequestError) as refused:
        sdk(gw).messages.create(model="scripted", max_tokens=16, messages=ask("hi"))
    assert_anthropic_error(refused.value, 400, "invalid_request_error")
    assert refused.value.body["error"]["message"] == error["message"]  # type: ignore[index]


@pytest.mark.parametrize("streamed", [False, True], ids=["create", "stream"])
def test_a_context_length_refusal_has_anthropics_wording(
    gw: Gateway, forced: dict[str, Any], streamed: bool
) -> None:
    message = (
        "This model's maximum context length is 8192 tokens. However, you requested 9000 "
        "tokens (5000 in the messages, 4000 in the completion). Please reduce the length."
    )
    forced.update(status=400, error_body={"error": {"message": message, "code": None}})
    with pytest.raises(anthropic.BadRequestError) as refused:
        if streamed:
            with sdk(gw).messages.stream(
                model="scripted", max_tokens=4000, messages=ask("hi")
            ) as stream:
                stream.get_final_message()
        else:
            sdk(gw).messages.create(model="scripted", max_tokens=4000, messages=ask("hi"))
    assert refused.value.body["error"]["message"] == (  # type: ignore[index]
        "input length and `max_tokens` exceed context limit: 5000 + 4000 > 8192"
    )


def test_malformed_json_and_wrong_fields_are_invalid_request_errors(gw: Gateway) -> None:
    headers = {"x-api-key": GATEWAY_KEY, "content-type": "application/json"}
    for body in (b'{"model": "claude-haiku-4-5", "max_tokens": 1', b"[1, 2]"):
        answer = requests.post(gw.url + "/v1/messages", data=body, headers=headers, timeout=10)
        assert answer.status_code == 400, answer.text
        assert answer.json()["type"] == "error"
        assert answer.json()["error"]["type"] == "invalid_request_error"
    with pytest.raises(anthropic.BadRequestError) as wrong:
        sdk(gw).messages.create(model=BRIDGED, max_tokens=0, messages=ask("hi"))
    assert "max_tokens" in wrong.value.body["error"]["message"]  # type: ignore[index]


# --- the pipeline: quotas, fallback, disconnects ----------------------------------------
def test_a_token_quota_is_charged_for_messages(gw: Gateway, chat_fake: FakeDialects) -> None:
    client = sdk(gw, QUOTA_KEY)
    first = client.messages.create(model=BRIDGED, max_tokens=16, messages=ask("hi"))
    assert first.usage.input_tokens + first.usage.output_tokens > 20
    with pytest.raises(anthropic.RateLimitError) as spent:
        client.messages.create(model=BRIDGED, max_tokens=16, messages=ask("hi"))
    assert_anthropic_error(spent.value, 429, "rate_limit_error")


def pipeline_config(down: str, up: str, slow: str, refused: str) -> str:
    return f"""
providers:
  down: {{base_url: {down}, api_key_env: CHAT_KEY}}
  up: {{base_url: {up}, api_key_env: CHAT_KEY}}
  slow: {{base_url: {slow}, api_key_env: CHAT_KEY}}
  refused: {{base_url: {refused}, api_key_env: CHAT_KEY}}
models:
  fallback:
    - {{provider: down, model: m, weight: 1000}}
    - {{provider: up, model: m, weight: 0.001}}
  slow: [{{provider: slow, model: m}}]
  all-down:
    - {{provider: down, model: m, weight: 1000}}
    - {{provider: refused, model: m, weight: 0.001}}
"""


@pytest.fixture(scope="module")
def providers() -> Iterator[dict[str, FakeUpstream]]:
    started = {
        "down": FakeUpstream(forced={"status": 500}).start(),
        "up": FakeUpstream().start(),
        "slow": FakeUpstream(forced={"chunks": 100, "delay": 0.1}).start(),
    }
    yield started
    for upstream in started.values():
        upstream.stop()


@pytest.fixture(scope="module")
def pipeline_gw(
    tmp_path_factory: pytest.TempPathFactory, providers: dict[str, FakeUpstream]
) -> Iterator[Gateway]:
    factory = GatewayFactory(tmp_path_factory.mktemp("pipeline"), providers["up"].url)
    urls = {name: upstream.url for name, upstream in providers.items()}
    text = pipeline_config(urls["down"], urls["up"], urls["slow"], refusing_url())
    yield factory(text, **ENV)
    factory.stop_all()


@pytest.mark.parametrize("streamed", [False, True], ids=["create", "stream"])
def test_a_failing_provider_falls_back_before_the_first_byte(
    pipeline_gw: Gateway, providers: dict[str, FakeUpstream], streamed: bool
) -> None:
    request_id, options = with_id({})
    client = sdk(pipeline_gw)
    if streamed:
        with client.messages.stream(
            model="fallback", max_tokens=16, messages=ask("hi"), **options
        ) as stream:
            message = stream.get_final_message()
        assert message.content[0].text == "tok0 tok1 tok2 "  # type: ignore[union-attr]
    else:
        message = client.messages.create(
            model="fallback", max_tokens=16, messages=ask("hi"), **options
        )
        assert message.content[0].text == "Hello from the fake upstream."
    tried = [
        name
        for name, upstream in providers.items()
        for r in upstream.requests
        if r.headers.get("x-request-id") == request_id
    ]
    assert tried == ["down", "up"]
    line = pipeline_gw.access_line(request_id)
    assert line["provider"] == "up" and line["attempts"] == ["down: server_error"]
    assert line["usage"]["prompt_tokens"] == message.usage.input_tokens


def test_no_provider_left_is_overloaded(pipeline_gw: Gateway) -> None:
    with pytest.raises(anthropic.APIStatusError) as failed:
        sdk(pipeline_gw).messages.create(model="all-down", max_tokens=16, messages=ask("hi"))
    assert_anthropic_error(failed.value, 529, "overloaded_error")
    assert isinstance(failed.value, anthropic.OverloadedError)


def test_a_client_leaving_mid_stream_cancels_the_providers_stream(
    pipeline_gw: Gateway, providers: dict[str, FakeUpstream]
) -> None:
    request_id, options = with_id({})
    with sdk(pipeline_gw).messages.stream(
        model="slow", max_tokens=16, messages=ask("hi"), **options
    ) as stream:
        for number, event in enumerate(stream):
            if event.type == "content_block_delta" or number > 5:
                break
    gone = disconnects_of(providers["slow"], request_id)
    assert gone, "the provider never saw the gateway close the stream"
    assert gone[0].chunks_sent < 100
    assert pipeline_gw.access_line(request_id)["status"] == 200
