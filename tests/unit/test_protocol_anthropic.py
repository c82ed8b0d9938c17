"""gateway.protocols.anthropic: Messages <-> Chat Completions, pure (no Flask, no sockets).

Translated answers and streams are checked with the official SDK's own types and stream
accumulator, so "valid" means what Anthropic's clients accept.
"""

from __future__ import annotations

import tracemalloc
from typing import Any

import orjson
import pydantic
import pytest
from anthropic.lib.streaming._messages import accumulate_event
from anthropic.types import Message, RawMessageStreamEvent

from gateway.protocols import anthropic
from gateway.protocols.anthropic import ProtocolError, Reply, StreamTranslator

EVENT = pydantic.TypeAdapter(RawMessageStreamEvent)
REPLY = Reply(model="claude-sonnet-4-5", input_estimate=1234)
BILLING = {"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1.3.abc; cch=ff01;"}


def body(**fields: Any) -> bytes:
    base: dict[str, Any] = {
        "model": "claude-sonnet-4-5",
        "max_tokens": 32000,
        "messages": [{"role": "user", "content": "hi"}],
    }
    return orjson.dumps(base | fields)


def chat(kind: str = "openai", include_usage: bool = False, **fields: Any) -> dict[str, Any]:
    req = anthropic.parse(body(**fields))
    out = anthropic.to_chat(req, model="qwen3", provider_kind=kind, include_usage=include_usage)
    return orjson.loads(out)


def tool(name: str = "Read") -> dict[str, Any]:
    return {"name": name, "description": "d", "input_schema": {"type": "object"}}


# ---------------------------------------------------------------- parse


def test_parse_keeps_the_whitelist_and_ignores_the_rest() -> None:
    req = anthropic.parse(body(context_management={"edits": []}, betas=["x"], stream=True))
    assert (req.model, req.max_tokens, req.stream) == ("claude-sonnet-4-5", 32000, True)
    assert not hasattr(req, "context_management")


@pytest.mark.parametrize(
    ("raw", "message", "param"),
    [
        (b"{nope", "not valid JSON", None),
        (b"[1]", "must be a JSON object", None),
        (b'{"max_tokens": 1, "messages": []}', "model: Field required", "model"),
        (b'{"model": "m", "messages": []}', "max_tokens: Field required", "max_tokens"),
        (b'{"model": "m", "max_tokens": 1}', "messages: Field required", "messages"),
        (b'{"model": "m", "max_tokens": 0, "messages": []}', "max_tokens: Expected", "max_tokens"),
        (b'{"model": "m", "max_tokens": 1, "messages": []}', "at least one message", "messages"),
    ],
)
def test_parse_refuses_with_a_clear_message(raw: bytes, message: str, param: str | None) -> None:
    with pytest.raises(ProtocolError) as caught:
        anthropic.parse(raw)
    assert message in caught.value.message
    assert caught.value.param == param
    assert "Traceback" not in caught.value.message


def test_parse_names_the_nested_field_in_anthropic_style() -> None:
    messages: list[dict[str, Any]] = [{"role": "user", "content": "a"}] * 3
    messages.append({"role": "user", "content": [{"type": "text", "text": 5}]})
    with pytest.raises(ProtocolError) as caught:
        anthropic.parse(body(messages=messages))
    assert caught.value.message == "messages.3.content.0.text: Expected `str | null`, got `int`"
    assert caught.value.param == "messages.3.content.0.text"


def test_parse_refuses_a_tool_choice_naming_a_tool_not_in_tools() -> None:
    with pytest.raises(ProtocolError) as caught:
        anthropic.parse(body(tools=[tool("Read")], tool_choice={"type": "tool", "name": "Bash"}))
    assert caught.value.param == "tool_choice.name"
    assert "'Bash' is not in `tools`" in caught.value.message
    with pytest.raises(ProtocolError, match="needs `tools`"):
        anthropic.parse(body(tool_choice={"type": "any"}))


@pytest.mark.parametrize(
    ("block", "param"),
    [
        ({"type": "tool_use", "id": "t", "name": "n", "input": [1]}, "messages.0.content.0.input"),
        ({"type": "tool_use", "name": "n", "input": {}}, "messages.0.content.0"),
        ({"type": "tool_result", "content": "x"}, "messages.0.content.0.tool_use_id"),
        ({"type": "image", "source": {"type": "base64"}}, "messages.0.content.0.source"),
    ],
)
def test_parse_checks_each_block_kind(block: dict[str, Any], param: str) -> None:
    with pytest.raises(ProtocolError) as caught:
        anthropic.parse(body(messages=[{"role": "user", "content": [block]}]))
    assert caught.value.param == param


def test_count_tokens_bodies_need_no_max_tokens() -> None:
    raw = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    assert anthropic.parse(raw, counting=True).model == "m"
    with pytest.raises(ProtocolError, match="max_tokens"):
        anthropic.parse(raw)


@pytest.mark.parametrize("where", ["content", "input"])
def test_deep_nesting_is_a_protocol_error(where: str) -> None:
    deep = b"[" * 200_000 + b"]" * 200_000
    if where == "content":
        raw = b'{"model":"m","max_tokens":1,"messages":' + deep + b"}"
    else:
        raw = (
            b'{"model":"m","max_tokens":1,"messages":[{"role":"assistant","content":[{"type":'
            b'"tool_use","id":"t","name":"n","input":' + deep + b"}]}]}"
        )
    with pytest.raises(ProtocolError):
        anthropic.parse(raw)


def test_ten_megabytes_of_tiny_blocks_stay_small_in_memory() -> None:
    blocks = b",".join([b'{"type":"text","text":"a"}'] * 380_000)
    raw = b'{"model":"m","max_tokens":1,"messages":[{"role":"user","content":[' + blocks + b"]}]}"
    assert len(raw) > 10_000_000
    tracemalloc.start()
    try:
        req = anthropic.parse(raw)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(req.messages[0].content) == 380_000
    assert peak < 10 * len(raw)  # measured 8x; orjson.loads peaks at 23x


def test_count_tokens_estimates_everything_but_the_billing_header() -> None:
    small = anthropic.count_tokens(anthropic.parse(body()))
    assert small >= 1
    big = anthropic.parse(
        body(
            system=[BILLING, {"type": "text", "text": "s" * 400}],
            tools=[tool()],
            messages=[{"role": "user", "content": [{"type": "text", "text": "x" * 4000}]}],
        )
    )
    assert 1100 <= anthropic.count_tokens(big) <= 1120
    image = {"type": "image", "source": {"type": "url", "url": "https://x/y.png"}}
    with_image = anthropic.parse(body(messages=[{"role": "user", "content": [image]}]))
    assert anthropic.count_tokens(with_image) == 1600


# ---------------------------------------------------------------- to_chat


def test_system_blocks_become_one_message_without_the_billing_header() -> None:
    system = [
        BILLING,
        {"type": "text", "text": "You are Claude Code."},
        {"type": "text", "text": "Be brief."},
    ]
    out = chat(system=system)
    assert out["messages"][0] == {"role": "system", "content": "You are Claude Code.\n\nBe brief."}
    assert "billing" not in orjson.dumps(out).decode()
    assert chat(system="plain")["messages"][0] == {"role": "system", "content": "plain"}


def test_images_become_image_urls() -> None:
    content = [
        {"type": "text", "text": "what?"},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBO"}},
        {"type": "image", "source": {"type": "url", "url": "https://e.com/a.png"}},
    ]
    user = chat(messages=[{"role": "user", "content": content}])["messages"][0]
    assert user["content"] == [
        {"type": "text", "text": "what?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBO"}},
        {"type": "image_url", "image_url": {"url": "https://e.com/a.png"}},
    ]


def test_text_only_user_blocks_become_one_string() -> None:
    content = [{"type": "text", "text": "<reminder/>"}, {"type": "text", "text": "go"}]
    user = chat(messages=[{"role": "user", "content": content}])["messages"][0]
    assert user == {"role": "user", "content": "<reminder/>\n\ngo"}


TOOL_ROUND: list[dict[str, Any]] = [
    {"role": "user", "content": "read it"},
    {
        "role": "assistant",
        "content": [
            {"type": "thinking", "thinking": "need the file", "signature": "sig"},
            {"type": "redacted_thinking", "data": "opaque"},
            {"type": "text", "text": "Reading."},
            {
                "type": "tool_use",
                "id": "toolu_1",
                "name": "Read",
                "input": {"path": "/a", "n": [1]},
            },
            {"type": "tool_use", "id": "toolu_2", "name": "Bash", "input": {}},
        ],
    },
    {
        "role": "user",
        "content": [
            {"type": "tool_result", "tool_use_id": "toolu_1", "content": "file text"},
            {"type": "text", "text": "and?"},
            {
                "type": "tool_result",
                "tool_use_id": "toolu_2",
                "is_error": True,
                "content": [
                    {"type": "text", "text": "command not found"},
                    {"type": "image", "source": {"type": "url", "url": "https://e/s.png"}},
                ],
            },
        ],
    },
]


def test_a_tool_round_trip_becomes_tool_calls_then_tool_messages_then_the_rest() -> None:
    messages = chat(messages=TOOL_ROUND)["messages"]
    assistant = messages[1]
    assert assistant["content"] == "Reading."
    assert "reasoning_content" not in assistant  # openai: replayed thinking dropped
    assert [c["id"] for c in assistant["tool_calls"]] == ["toolu_1", "toolu_2"]
    call = assistant["tool_calls"][0]
    assert call["type"] == "function" and call["function"]["name"] == "Read"
    assert orjson.loads(call["function"]["arguments"]) == {"path": "/a", "n": [1]}
    assert messages[2] == {"role": "tool", "tool_call_id": "toolu_1", "content": "file text"}
    assert messages[3] == {
        "role": "tool",
        "tool_call_id": "toolu_2",
        "content": "Error: command not found",
    }
    assert messages[4]["role"] == "user"
    assert messages[4]["content"] == [
        {"type": "image_url", "image_url": {"url": "https://e/s.png"}},
        {"type": "text", "text": "and?"},
    ]
    assert len(messages) == 5


@pytest.mark.parametrize(
    ("kind", "kept"), [("dashscope", True), ("deepseek", True), ("vllm", False)]
)
def test_replayed_thinking_goes_back_only_where_accepted(kind: str, kept: bool) -> None:
    assistant = chat(kind, messages=TOOL_ROUND)["messages"][1]
    assert ("reasoning_content" in assistant) is kept
    if kept:
        assert assistant["reasoning_content"] == "need the file"
    assert "opaque" not in orjson.dumps(assistant).decode()


def test_an_assistant_turn_of_only_tool_calls_has_null_content() -> None:
    turn = {"role": "assistant", "content": [TOOL_ROUND[1]["content"][3]]}
    tail = {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1"}]}
    messages = chat(messages=[TOOL_ROUND[0], turn, tail])["messages"]
    assert messages[1]["content"] is None and len(messages[1]["tool_calls"]) == 1
    assert messages[2] == {"role": "tool", "tool_call_id": "toolu_1", "content": ""}


def test_tools_become_functions_with_the_schema_passed_on() -> None:
    schema = {"type": "object", "$defs": {"p": {"prefixItems": [{"const": 1}]}}, "x-y": None}
    out = chat(tools=[{"name": "Read", "description": "reads", "input_schema": schema}])
    assert out["tools"] == [
        {
            "type": "function",
            "function": {"name": "Read", "description": "reads", "parameters": schema},
        }
    ]
    assert "strict" not in orjson.dumps(out).decode()
    assert "tool_choice" not in out and "parallel_tool_calls" not in out


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        ({"type": "auto"}, "auto"),
        ({"type": "any"}, "required"),
        ({"type": "none"}, "none"),
        ({"type": "tool", "name": "Read"}, {"type": "function", "function": {"name": "Read"}}),
    ],
)
def test_tool_choice_maps(choice: dict[str, Any], expected: object) -> None:
    out = chat(tools=[tool()], tool_choice=choice | {"disable_parallel_tool_use": True})
    assert out["tool_choice"] == expected
    assert out.get("parallel_tool_calls") is (None if choice["type"] == "none" else False)


def test_tool_choice_is_not_sent_without_tools() -> None:
    assert "tool_choice" not in chat(tool_choice={"type": "auto"})


def test_content_chat_cannot_carry_is_refused_clearly() -> None:
    server = {"type": "web_search_20250305", "name": "web_search"}
    with pytest.raises(ProtocolError, match=r"tools\.0: server tool 'web_search_20250305'"):
        chat(tools=[server])
    pdf = {
        "type": "document",
        "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBE"},
    }
    with pytest.raises(ProtocolError) as caught:
        chat(messages=[{"role": "user", "content": [pdf]}])
    assert caught.value.param == "messages.0.content.0"
    text_doc = {
        "type": "document",
        "source": {"type": "text", "media_type": "text/plain", "data": "doc"},
    }
    assert (
        chat(messages=[{"role": "user", "content": [text_doc]}])["messages"][0]["content"] == "doc"
    )


@pytest.mark.parametrize(
    ("kind", "has_top_k"),
    [
        ("dashscope", True),
        ("vllm", True),
        ("ollama", True),
        ("openai", False),
        ("deepseek", False),
        ("openai-compatible", False),
    ],
)
def test_sampling_parameters(kind: str, has_top_k: bool) -> None:
    out = chat(kind, stop_sequences=["</x>"], temperature=0.2, top_p=0.9, top_k=40)
    assert (out["stop"], out["temperature"], out["top_p"]) == (["</x>"], 0.2, 0.9)
    assert ("top_k" in out) is has_top_k


def test_max_tokens_is_clamped_and_named_for_openai() -> None:
    req = anthropic.parse(body(max_tokens=64000))
    vllm = orjson.loads(
        anthropic.to_chat(req, model="m", provider_kind="vllm", include_usage=False)
    )
    assert vllm["max_tokens"] == 64000
    out = anthropic.to_chat(
        req, model="m", provider_kind="openai", include_usage=False, max_tokens_cap=8192
    )
    assert orjson.loads(out)["max_completion_tokens"] == 8192
    assert b'"max_tokens"' not in out


@pytest.mark.parametrize(
    ("thinking", "expected"),
    [
        (
            {"type": "enabled", "budget_tokens": 10000},
            {"enable_thinking": True, "thinking_budget": 10000},
        ),
        ({"type": "adaptive"}, {"enable_thinking": True}),
        ({"type": "disabled"}, {"enable_thinking": False}),
        (None, {"enable_thinking": False}),
    ],
)
def test_thinking_on_dashscope(thinking: dict[str, Any] | None, expected: dict[str, Any]) -> None:
    fields: dict[str, Any] = {"thinking": thinking} if thinking else {}
    out = chat("dashscope", **fields)
    assert {k: out[k] for k in ("enable_thinking", "thinking_budget") if k in out} == expected
    assert "reasoning_effort" not in out


@pytest.mark.parametrize(
    ("fields", "effort"),
    [
        ({"thinking": {"type": "enabled", "budget_tokens": 4000}}, "low"),
        ({"thinking": {"type": "enabled", "budget_tokens": 10000}}, "medium"),
        ({"thinking": {"type": "enabled", "budget_tokens": 31999}}, "high"),
        ({"thinking": {"type": "adaptive"}, "output_config": {"effort": "low"}}, "low"),
        ({"thinking": {"type": "adaptive"}, "output_config": {"effort": "max"}}, "high"),
        ({"thinking": {"type": "adaptive"}}, None),
        ({"thinking": {"type": "disabled"}, "output_config": {"effort": "high"}}, None),
    ],
)
def test_thinking_elsewhere_is_a_reasoning_effort(
    fields: dict[str, Any], effort: str | None
) -> None:
    out = chat("deepseek", **fields)
    assert out.get("reasoning_effort") == effort
    assert "enable_thinking" not in out and "thinking" not in out


def test_structured_output_becomes_response_format() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    out = chat(output_config={"effort": "low", "format": {"type": "json_schema", "schema": schema}})
    assert out["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "output", "schema": schema},
    }


def test_anthropic_only_fields_never_reach_the_chat_body() -> None:
    cached = {"type": "text", "text": "x", "cache_control": {"type": "ephemeral", "ttl": "1h"}}
    out = anthropic.to_chat(
        anthropic.parse(
            body(
                system=[BILLING, cached],
                messages=[{"role": "user", "content": [cached]}],
                tools=[tool() | {"cache_control": {"type": "ephemeral"}}],
                context_management={"edits": [{"type": "clear_tool_uses_20250919"}]},
                metadata={"user_id": '{"device_id":"abc","session_id":"s"}'},
                output_config={"effort": "high"},
                betas=["context-1m-2025-08-07"],
                container="c",
                mcp_servers=[{"name": "m"}],
                service_tier="auto",
            )
        ),
        model="m",
        provider_kind="openai-compatible",
        include_usage=False,
    )
    for word in (b"cache_control", b"context_management", b"metadata", b"effort", b"betas",
                 b"container", b"mcp_servers", b"service_tier", b"output_config", b"user",
                 b"device_id", b"x-anthropic"):  # fmt: skip
        assert word not in out.replace(b'"role":"user"', b"")


@pytest.mark.parametrize(
    ("user_id", "sent"), [("alice", True), ("u" * 65, False), ('{"a":1}', False)]
)
def test_metadata_user_id_becomes_user_only_when_short(user_id: str, sent: bool) -> None:
    assert ("user" in chat(metadata={"user_id": user_id})) is sent


@pytest.mark.parametrize(("stream", "usage"), [(True, True), (True, False), (False, True)])
def test_stream_and_usage(stream: bool, usage: bool) -> None:
    out = chat(include_usage=usage, stream=stream)
    assert out.get("stream") is (True if stream else None)
    assert out.get("stream_options") == ({"include_usage": True} if stream and usage else None)


# ---------------------------------------------------------------- native_body, known_betas


def test_native_body_unchanged_keeps_its_bytes() -> None:
    raw = body(system="You are Claude Code.")
    assert anthropic.native_body(raw, model=None) == raw
    assert anthropic.native_body(raw, model="claude-sonnet-4-5") == raw


def test_native_body_sends_a_member_given_twice_once_as_the_gateway_read_it() -> None:
    raw = (
        b'{"model": "denied", "max_tokens": 5, '
        b'"messages": [{"role": "user", "content": "x"}], "model": "allowed"}'
    )
    assert anthropic.parse(raw).model == "allowed"
    sent = anthropic.native_body(raw, model=None)
    assert sent.count(b'"model"') == 1
    assert orjson.loads(sent)["model"] == "allowed"


def test_native_body_rewrites_only_the_model_and_the_billing_header() -> None:
    raw = (
        b'{"model": "claude-x", "max_tokens":1.0e3, "system": [' + orjson.dumps(BILLING)
        + b', {"type":"text",  "text":"keep"}], "messages":[{"role":"user","content":"hi"}]}'
    )  # fmt: skip
    out = anthropic.native_body(raw, model="qwen3-coder-plus")
    assert out == (
        b'{"model":"qwen3-coder-plus","max_tokens":1.0e3,'
        b'"system":[{"type":"text",  "text":"keep"}],'
        b'"messages":[{"role":"user","content":"hi"}]}'
    )
    only = orjson.dumps({"model": "m", "system": [BILLING], "messages": []})
    assert orjson.loads(anthropic.native_body(only, model=None)) == {"model": "m", "messages": []}
    with pytest.raises(ProtocolError):
        anthropic.native_body(b"x-anthropic-billing-header: not json", model=None)


def test_known_betas() -> None:
    flags = "claude-code-20250219,interleaved-thinking-2025-05-14,context-1m-2025-08-07"
    assert anthropic.known_betas(flags, "dashscope") is None
    assert anthropic.known_betas(None, "vllm") is None
    assert anthropic.known_betas(flags, "anthropic") == flags


# ---------------------------------------------------------------- from_chat


def completion(message: dict[str, Any], finish: str | None = "stop", **extra: Any) -> bytes:
    choice = {"index": 0, "message": {"role": "assistant"} | message, "finish_reason": finish}
    answer: dict[str, Any] = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": "qwen3",
        "choices": [choice],
    }
    answer["usage"] = {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120}
    return orjson.dumps(answer | extra)


def messages_answer(raw: bytes) -> Message:
    return Message.model_validate(orjson.loads(anthropic.from_chat(raw, REPLY)))


def test_from_chat_blocks_in_order_validated_by_the_sdk() -> None:
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "Read", "arguments": '{"path": "/a"}'},
    }
    answer = messages_answer(
        completion(
            {"reasoning_content": "hmm", "content": "ok", "tool_calls": [call]}, "tool_calls"
        )
    )
    assert answer.id.startswith("msg_") and answer.model == "claude-sonnet-4-5"
    assert [b.type for b in answer.content] == ["thinking", "text", "tool_use"]
    thinking, text, tool_use = answer.content
    assert thinking.type == "thinking" and thinking.thinking == "hmm" and thinking.signature
    assert text.type == "text" and text.text == "ok"
    assert tool_use.type == "tool_use" and tool_use.id.startswith("toolu_")
    assert (tool_use.name, tool_use.input) == ("Read", {"path": "/a"})
    assert answer.stop_reason == "tool_use"
    assert (answer.usage.input_tokens, answer.usage.output_tokens) == (100, 20)


@pytest.mark.parametrize("arguments", ["", "   ", "{broken", "null", "[1]", '"str"', None])
def test_unusable_arguments_become_an_empty_input(arguments: str | None) -> None:
    call = {"id": "c", "type": "function", "function": {"name": "Bash", "arguments": arguments}}
    answer = messages_answer(completion({"content": None, "tool_calls": [call]}, "tool_calls"))
    assert answer.content[0].type == "tool_use" and answer.content[0].input == {}


def test_arguments_sent_as_an_object_are_taken() -> None:
    call = {"id": "c", "function": {"name": "Bash", "arguments": {"cmd": "ls"}}}
    answer = messages_answer(completion({"tool_calls": [call]}, "stop"))
    assert answer.content[0].type == "tool_use" and answer.content[0].input == {"cmd": "ls"}
    assert answer.stop_reason == "tool_use"  # Ollama says "stop" with tool calls


@pytest.mark.parametrize(
    ("finish", "extra", "stop_reason", "stop_sequence"),
    [
        ("stop", {}, "end_turn", None),
        ("length", {}, "max_tokens", None),
        ("content_filter", {}, "refusal", None),
        (None, {}, "end_turn", None),
        ("stop", {"stop_reason": "</x>"}, "stop_sequence", "</x>"),  # vLLM names the match
        ("stop", {"stop_reason": 151645}, "end_turn", None),  # a token id: the model's own EOS
    ],
)
def test_stop_reasons(
    finish: str | None, extra: dict[str, Any], stop_reason: str, stop_sequence: str | None
) -> None:
    raw = orjson.loads(completion({"content": "x"}, finish))
    raw["choices"][0] |= extra
    answer = messages_answer(orjson.dumps(raw))
    assert (answer.stop_reason, answer.stop_sequence) == (stop_reason, stop_sequence)


def test_cached_tokens_move_from_input_to_cache_read() -> None:
    usage = {
        "prompt_tokens": 100,
        "completion_tokens": 5,
        "prompt_tokens_details": {"cached_tokens": 60},
    }
    answer = messages_answer(completion({"content": "x"}, usage=usage))
    assert (answer.usage.input_tokens, answer.usage.cache_read_input_tokens) == (40, 60)
    assert answer.usage.cache_creation_input_tokens == 0
    deepseek = {"prompt_tokens": 100, "completion_tokens": 5, "prompt_cache_hit_tokens": 30}
    assert messages_answer(completion({"content": "x"}, usage=deepseek)).usage.input_tokens == 70


def test_without_usage_the_estimate_is_reported() -> None:
    raw = orjson.loads(completion({"content": "x" * 400}))
    del raw["usage"]
    answer = messages_answer(orjson.dumps(raw))
    assert (answer.usage.input_tokens, answer.usage.output_tokens) == (1234, 100)


@pytest.mark.parametrize(
    "raw", [b"<html>bad gateway</html>", b'{"object": "list"}', b'{"choices": []}']
)
def test_an_answer_that_is_not_a_chat_completion_is_a_protocol_error(raw: bytes) -> None:
    with pytest.raises(ProtocolError):
        anthropic.from_chat(raw, REPLY)


# ---------------------------------------------------------------- StreamTranslator


def chunk(
    content: str | None = None,
    reasoning: str | None = None,
    tool_calls: list[dict[str, Any]] | None = None,
    finish: str | None = None,
) -> bytes:
    delta: dict[str, Any] = {}
    if content is not None:
        delta["content"] = content
    if reasoning is not None:
        delta["reasoning_content"] = reasoning
    if tool_calls is not None:
        delta["tool_calls"] = tool_calls
    choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
    return orjson.dumps(
        {"id": "c1", "object": "chat.completion.chunk", "model": "q", "choices": [choice]}
    )


def piece(
    index: int, arguments: str, name: str | None = None, call_id: str | None = None
) -> dict[str, Any]:
    out: dict[str, Any] = {"index": index, "function": {"arguments": arguments}}
    if name is not None:
        out |= {"id": call_id or f"call_{index}", "type": "function"}
        out["function"]["name"] = name
    return out


USAGE = orjson.dumps(
    {
        "id": "c1",
        "choices": [],
        "usage": {"prompt_tokens": 900, "completion_tokens": 42, "total_tokens": 942},
    }
)


def events(raw: bytes) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for frame in raw.split(b"\n\n"):
        if frame:
            name, data = frame.split(b"\n")
            assert name.startswith(b"event: ") and data.startswith(b"data: ")
            payload = orjson.loads(data[6:])
            assert payload["type"] == name[7:].decode()
            out.append((name[7:].decode(), payload))
    return out


def check(all_events: list[tuple[str, dict[str, Any]]]) -> Message:
    """The events are a well-formed Messages stream; returns what the SDK accumulates."""
    names = [n for n, _ in all_events]
    assert names[:2] == ["message_start", "ping"]
    assert names[-2:] == ["message_delta", "message_stop"]
    kinds: dict[int, str] = {}
    open_index: int | None = None
    snapshot = None
    json_bufs: dict[int, bytes] = {}
    for name, data in all_events:
        if name == "ping":
            continue
        EVENT.validate_python(data)
        if name == "content_block_start":
            assert open_index is None and data["index"] == len(kinds)
            open_index = data["index"]
            kinds[open_index] = data["content_block"]["type"]
        elif name == "content_block_delta":
            assert open_index is not None and data["index"] == open_index
            allowed = {
                "thinking": {"thinking_delta", "signature_delta"},
                "text": {"text_delta"},
                "tool_use": {"input_json_delta"},
            }[kinds[open_index]]
            assert data["delta"]["type"] in allowed  # no thinking_delta in a text block
        elif name == "content_block_stop":
            assert data["index"] == open_index
            open_index = None
        snapshot = accumulate_event(event=data, current_snapshot=snapshot, json_bufs=json_bufs)  # type: ignore[arg-type]
    assert open_index is None
    assert snapshot is not None
    return Message.model_validate(snapshot.to_dict())


def run(chunks: list[bytes], reply: Reply = REPLY) -> tuple[list[bytes], Message, StreamTranslator]:
    translator = StreamTranslator(reply)
    outputs = [translator.feed(c) for c in chunks]
    outputs.append(translator.finish())
    return outputs, check(events(b"".join(outputs))), translator


def test_reasoning_first_then_content() -> None:
    chunks = [
        chunk(content="", reasoning=""),
        chunk(reasoning="Let me"),
        chunk(reasoning=" think."),
        chunk(content="Hel"),
        chunk(content="lo"),
        chunk(finish="stop"),
        USAGE,
        b"[DONE]",
    ]
    outputs, message, _ = run(chunks)
    assert [(b.type) for b in message.content] == ["thinking", "text"]
    assert message.content[0].type == "thinking" and message.content[0].thinking == "Let me think."
    assert message.content[0].signature
    assert message.content[1].type == "text" and message.content[1].text == "Hello"
    # every piece went out in the call that brought it
    assert b'"thinking":"Let me"' in outputs[1] and b'"text":"lo"' in outputs[4]
    signature = outputs[3].index(b"signature_delta")
    assert signature < outputs[3].index(b"content_block_stop") < outputs[3].index(b'"text":"Hel"')
    assert outputs[-1] == b""  # [DONE] already finished the message


def test_usage_comes_last_and_message_start_never_reports_zero() -> None:
    outputs, message, translator = run([chunk(content="hi"), chunk(finish="stop"), USAGE])
    start = events(outputs[0])[0][1]
    assert start["message"]["usage"]["input_tokens"] == 1234
    assert (message.usage.input_tokens, message.usage.output_tokens) == (900, 42)
    assert message.stop_reason == "end_turn"
    assert translator.usage == {"prompt_tokens": 900, "completion_tokens": 42, "total_tokens": 942}
    assert b"message_delta" not in b"".join(outputs[:-1])  # waits for the usage


def test_usage_reported_in_the_first_chunk_is_used_in_message_start() -> None:
    first = orjson.loads(chunk(content="a"))
    first["usage"] = {"prompt_tokens": 77, "completion_tokens": 1}
    outputs, _, _ = run([orjson.dumps(first), chunk(finish="stop")])
    assert events(outputs[0])[0][1]["message"]["usage"]["input_tokens"] == 77


def test_no_usage_and_no_done_still_ends_the_message() -> None:
    translator = StreamTranslator(REPLY)
    sent = translator.feed(chunk(content="x" * 40)) + translator.feed(chunk(finish="length"))
    end = translator.finish()
    message = check(events(sent + end))
    assert message.stop_reason == "max_tokens"
    assert (message.usage.input_tokens, message.usage.output_tokens) == (1234, 10)
    assert translator.usage is None
    assert translator.finish() == b"" and translator.feed(chunk(content="late")) == b""


def test_an_empty_stream_is_still_a_valid_message() -> None:
    _, message, _ = run([b"[DONE]"])
    assert message.content == [] and message.stop_reason == "end_turn"


def test_garbage_chunks_are_skipped() -> None:
    outputs, message, _ = run(
        [b"{not json", chunk(content="ok"), b": keepalive", b"", chunk(finish="stop")]
    )
    assert outputs[0] == b"" and outputs[2] == b""
    assert message.content[0].type == "text" and message.content[0].text == "ok"


ARGUMENTS = '{"command": "ls -la /tmp", "description": "List \\u00e9 files"}'


@pytest.mark.parametrize("split", range(1, len(ARGUMENTS)))
def test_tool_arguments_split_at_every_boundary(split: int) -> None:
    chunks = [
        chunk(content="Running."),
        chunk(tool_calls=[piece(0, "", name="Bash")]),
        chunk(tool_calls=[piece(0, ARGUMENTS[:split])]),
        chunk(tool_calls=[piece(0, ARGUMENTS[split:])]),
        chunk(finish="tool_calls"),
        USAGE,
    ]
    outputs, message, _ = run(chunks)
    tool_use = message.content[1]
    assert (
        tool_use.type == "tool_use" and tool_use.name == "Bash" and tool_use.id.startswith("toolu_")
    )
    assert tool_use.input == orjson.loads(ARGUMENTS)
    assert message.stop_reason == "tool_use"
    deltas = [
        d["delta"]["partial_json"]
        for n, d in events(b"".join(outputs))
        if n == "content_block_delta" and d["delta"]["type"] == "input_json_delta"
    ]
    assert deltas == [ARGUMENTS[:split], ARGUMENTS[split:]]


def test_two_parallel_tool_calls_by_index_with_dashscope_style_later_pieces() -> None:
    later = {
        "id": "",
        "type": "function",
        "function": {"name": "", "arguments": '/a"}'},
        "index": 0,
    }
    chunks = [
        chunk(tool_calls=[piece(0, '{"path": "', name="Read", call_id="call_a")]),
        chunk(tool_calls=[later]),
        chunk(tool_calls=[piece(1, '{"path":', name="Read", call_id="call_b")]),
        chunk(tool_calls=[{"index": 1, "id": "", "function": {"arguments": ' "/b"}'}}]),
        chunk(finish="tool_calls"),
        USAGE,
        b"[DONE]",
    ]
    _, message, _ = run(chunks)
    inputs = [(b.name, b.input) for b in message.content if b.type == "tool_use"]
    assert inputs == [("Read", {"path": "/a"}), ("Read", {"path": "/b"})]
    ids = {b.id for b in message.content if b.type == "tool_use"}
    assert len(ids) == 2


def test_a_tool_call_with_empty_arguments_has_an_empty_input() -> None:
    chunks = [
        chunk(tool_calls=[piece(0, "", name="TodoRead")]),
        chunk(tool_calls=[piece(0, "")]),
        chunk(finish="tool_calls"),
    ]
    outputs, message, _ = run(chunks)
    assert message.content[0].type == "tool_use" and message.content[0].input == {}
    assert b'"partial_json":"{}"' in b"".join(outputs)
    assert b'"partial_json":""' not in b"".join(outputs)


def test_a_name_that_comes_after_the_first_arguments_is_waited_for() -> None:
    chunks = [
        chunk(tool_calls=[{"index": 0, "id": "call_1", "function": {"arguments": '{"a"'}}]),
        chunk(tool_calls=[{"index": 0, "function": {"name": "Grep", "arguments": ": 1}"}}]),
        chunk(finish="tool_calls"),
    ]
    outputs, message, _ = run(chunks)
    assert b"content_block_start" not in outputs[0]
    assert message.content[0].type == "tool_use"
    assert (message.content[0].name, message.content[0].input) == ("Grep", {"a": 1})


def test_interleaved_tool_calls_keep_each_piece_with_its_call() -> None:
    translator = StreamTranslator(REPLY)
    raw = (
        b"".join(
            translator.feed(c)
            for c in [
                chunk(tool_calls=[piece(0, '{"x":', name="A")]),
                chunk(tool_calls=[piece(1, '{"y":', name="B")]),
                chunk(tool_calls=[piece(0, " 1}")]),
                chunk(tool_calls=[piece(1, " 2}")]),
                chunk(finish="tool_calls"),
            ]
        )
        + translator.finish()
    )
    snapshot = None
    json_bufs: dict[int, bytes] = {}
    for _, data in events(raw):
        if data["type"] != "ping":
            snapshot = accumulate_event(event=data, current_snapshot=snapshot, json_bufs=json_bufs)  # type: ignore[arg-type]
    assert snapshot is not None
    assert [b.input for b in snapshot.content] == [{"x": 1}, {"y": 2}]  # type: ignore[union-attr]


def test_a_megabyte_of_arguments_streams_through_without_being_held() -> None:
    piece_text = "a" * 1000
    translator = StreamTranslator(REPLY)
    translator.feed(chunk(tool_calls=[piece(0, '{"content": "', name="Write")]))
    tracemalloc.start()
    try:
        for _ in range(1000):
            out = translator.feed(chunk(tool_calls=[piece(0, piece_text)]))
            ((_, data),) = events(out)
            assert data["delta"]["partial_json"] == piece_text
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 100_000  # a few pieces' worth, not the megabyte
    end = translator.feed(chunk(tool_calls=[piece(0, '"}')])) + translator.feed(
        chunk(finish="tool_calls")
    )
    assert b'"partial_json":"\\"}"' in end


def test_a_single_megabyte_piece_is_passed_on_whole() -> None:
    arguments = orjson.dumps({"content": "\u00e9" * 500_000}).decode()
    _, message, _ = run(
        [chunk(tool_calls=[piece(0, arguments, name="Write")]), chunk(finish="tool_calls")]
    )
    assert message.content[0].type == "tool_use" and message.content[0].input == {
        "content": "\u00e9" * 500_000
    }


def test_vllm_reports_the_stop_sequence_it_matched() -> None:
    last = orjson.loads(chunk(finish="stop"))
    last["choices"][0]["stop_reason"] = "</answer>"
    reply = Reply("claude-x", 10, ("</answer>",))
    _, message, _ = run([chunk(content="42"), orjson.dumps(last)], reply)
    assert (message.stop_reason, message.stop_sequence) == ("stop_sequence", "</answer>")
    assert message.model == "claude-x"


def test_a_failure_after_the_first_byte_is_an_error_event() -> None:
    translator = StreamTranslator(REPLY)
    translator.feed(chunk(content="par"))
    ((name, data),) = events(translator.fail(529, "no provider left"))
    assert name == "error"
    assert data == {
        "type": "error",
        "error": {"type": "overloaded_error", "message": "no provider left"},
    }
    assert translator.finish() == b"" and translator.fail(500, "again") == b""


def test_an_error_chunk_from_the_provider_becomes_an_error_event() -> None:
    translator = StreamTranslator(REPLY)
    out = translator.feed(chunk(content="a")) + translator.feed(
        b'{"error": {"message": "upstream died"}}'
    )
    assert events(out)[-1] == (
        "error",
        {"type": "error", "error": {"type": "api_error", "message": "upstream died"}},
    )


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (400, "invalid_request_error"),
        (422, "invalid_request_error"),
        (401, "authentication_error"),
        (403, "permission_error"),
        (404, "not_found_error"),
        (413, "request_too_large"),
        (429, "rate_limit_error"),
        (500, "api_error"),
        (502, "api_error"),
        (504, "timeout_error"),
        (503, "overloaded_error"),
        (529, "overloaded_error"),
    ],
)
def test_error_body(status: int, kind: str) -> None:
    assert orjson.loads(anthropic.error_body(status, "m")) == {
        "type": "error",
        "error": {"type": kind, "message": "m"},
    }


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b'{"error": {"message": "Invalid key sk-***", "type": "auth"}}', "Invalid key sk-***"),
        (b'{"error": "quota exceeded"}', "quota exceeded"),
        (b'{"code": "Throttling", "message": "Requests throttled"}', "Requests throttled"),
        (b'{"object": "error", "message": "model not found"}', "model not found"),
        (b'{"detail": "Not Found"}', "Not Found"),
        (b"upstream connect error", "upstream connect error"),
        (b"", "The provider answered HTTP 429."),
    ],
)
def test_error_from_chat_keeps_the_providers_message(raw: bytes, message: str) -> None:
    out = orjson.loads(anthropic.error_from_chat(429, raw))
    assert out == {"type": "error", "error": {"type": "rate_limit_error", "message": message}}


CONTEXT_LIMIT = "input length and `max_tokens` exceed context limit: "


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        (
            "This model's maximum context length is 8192 tokens. However, you requested 9000 "
            "tokens (5000 in the messages, 4000 in the completion). Please reduce the length.",
            CONTEXT_LIMIT + "5000 + 4000 > 8192",
        ),
        (
            "'max_tokens' or 'max_completion_tokens' is too large: 4000. This model's maximum "
            "context length is 4096 tokens and your request has 1000 input tokens "
            "(4000 > 4096 - 1000).",
            CONTEXT_LIMIT + "1000 + 4000 > 4096",
        ),
        (
            "max_tokens is too large: 64000. This model supports at most 16384 completion tokens, "
            "whereas you provided 64000.",
            CONTEXT_LIMIT + "0 + 64000 > 16384",
        ),
        (
            "<400> InternalError.Algo.InvalidParameter: Range of max_tokens should be [1, 65536]",
            CONTEXT_LIMIT + "0 + 100000 > 65536",
        ),
        (
            "Invalid max_tokens value, the valid range of max_tokens is [1, 8192]",
            CONTEXT_LIMIT + "0 + 100000 > 8192",
        ),
        (
            "This model's maximum context length is 32768 tokens. However, your request has "
            "40000 input tokens. Please reduce the length of the input messages.",
            "prompt is too long: 40000 tokens > 32768 maximum",
        ),
        (
            "Range of input length should be [1, 129024]",
            "prompt is too long: 200000 tokens > 129024 maximum",
        ),
    ],
)
def test_context_length_refusals_use_anthropics_wording(message: str, expected: str) -> None:
    raw = orjson.dumps({"error": {"message": message, "type": "invalid_request_error"}})
    out = orjson.loads(
        anthropic.error_from_chat(400, raw, max_tokens=100000, input_estimate=200000)
    )
    assert out == {"type": "error", "error": {"type": "invalid_request_error", "message": expected}}


def test_a_max_tokens_limit_without_the_requested_number_is_left_as_is() -> None:
    message = "Range of max_tokens should be [1, 8192]"
    out = orjson.loads(anthropic.error_from_chat(400, orjson.dumps({"message": message})))
    assert out["error"]["message"] == message


def test_error_event() -> None:
    assert anthropic.error_event(429, "slow down") == (
        b'event: error\ndata: {"type":"error",'
        b'"error":{"type":"rate_limit_error","message":"slow down"}}\n\n'
    )
