"""The Responses <-> Chat Completions bridge, pure: bodies in, bodies and SSE bytes out.

Answers and streamed events are checked with the openai SDK's own pydantic types, and streams are
replayed through the SDK's accumulator (`ResponseStreamState`) as `responses.stream()` would.
"""

from __future__ import annotations

import re
import tracemalloc
import typing
from typing import Any

import orjson
import pytest
from openai._types import omit
from openai.lib.streaming.responses._responses import ResponseStreamState
from openai.types.responses import (
    Response,
    ResponseErrorEvent,
    ResponseItem,
    ResponseStreamEvent,
)
from pydantic import TypeAdapter

from gateway.protocols.common import ProtocolError
from gateway.protocols.responses import (
    Reply,
    ResponsesRequest,
    StreamTranslator,
    failed_event,
    flat_name,
    from_chat,
    input_items,
    parse,
    to_chat,
    tool_types_dropped,
)

# The stream event class for each `type`, so a bad event names its own class in the error.
_UNION = typing.get_args(typing.get_args(ResponseStreamEvent)[0])
EVENT_TYPES = {typing.get_args(c.model_fields["type"].annotation)[0]: c for c in _UNION}
ITEM = TypeAdapter(ResponseItem)
FUNCTION_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
NAMESPACE_TOOL = {
    "type": "namespace",
    "name": "crm",
    "description": "Customer records",
    "tools": [
        {
            "type": "function",
            "name": "find",
            "description": "Find a customer",
            "parameters": {"type": "object", "properties": {"q": {"type": "string"}}},
            "strict": True,
        }
    ],
}


# -- helpers ------------------------------------------------------------------------------------


def request(**fields: Any) -> ResponsesRequest:
    return parse(orjson.dumps({"model": "qwen-plus", **fields}))


def chat(req: ResponsesRequest, kind: str = "openai", **options: Any) -> dict[str, Any]:
    options.setdefault("include_usage", True)
    return orjson.loads(to_chat(req, model="up-model", provider_kind=kind, **options).body)


def reply(req: ResponsesRequest, estimate: int = 11) -> Reply:
    return Reply("resp_abc", "client-model", 1_700_000_000, req, estimate)


def chunk(delta: dict[str, Any] | None = None, finish: str | None = None) -> bytes:
    choice = {"index": 0, "delta": delta or {}, "finish_reason": finish}
    return orjson.dumps({"id": "c1", "object": "chat.completion.chunk", "choices": [choice]})


def call_piece(index: int, args: str, call_id: str = "", name: str = "") -> bytes:
    function = {"name": name, "arguments": args}
    return chunk({"tool_calls": [{"index": index, "id": call_id, "function": function}]})


def usage_chunk(prompt: int = 9, completion: int = 5, cached: int = 2, thinking: int = 1) -> bytes:
    usage = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
        "completion_tokens_details": {"reasoning_tokens": thinking},
    }
    return orjson.dumps({"choices": [], "usage": usage})


def events(stream: bytes) -> list[dict[str, Any]]:
    """Split SSE bytes into payloads, checking each one's framing and shape."""
    found = []
    for block in stream.split(b"\n\n")[:-1]:
        head, data = block.split(b"\n")
        assert head.startswith(b"event: ") and data.startswith(b"data: ")
        payload = orjson.loads(data[6:])
        assert head[7:].decode() == payload["type"]
        found.append(payload)
    assert stream.endswith(b"\n\n") or not stream
    return found


def run(payloads: list[bytes], req: ResponsesRequest | None = None, done: bool = True) -> Any:
    translator = StreamTranslator(reply(req or request(input="hi", stream=True)))
    out = b"".join(translator.feed(p) for p in payloads)
    out += translator.feed(b"[DONE]") if done else translator.finish()
    return translator, events(out)


def sdk_replay(payloads: list[dict[str, Any]], tools: list[Any] | None = None) -> Any:
    """Drive the SDK's stream accumulator with our events; return its final response."""
    state = ResponseStreamState(input_tools=tools or [], text_format=omit)
    for number, payload in enumerate(payloads):
        assert payload["sequence_number"] == number
        state.handle_event(EVENT_TYPES[payload["type"]].model_validate(payload))
    return state._completed_response


# -- parse ----------------------------------------------------------------------------------------


def test_parse_keeps_the_whitelist_with_openai_defaults() -> None:
    req = parse(b'{"model": "m", "input": "hi", "service_tier": "flex", "background": true}')
    assert (req.model, req.input, req.store, req.stream) == ("m", "hi", True, False)
    assert not hasattr(req, "service_tier")


@pytest.mark.parametrize(
    ("body", "message", "param"),
    [
        (b"{not json", "not valid JSON", None),
        (b"[1, 2]", "Expected `object`", None),
        (b'{"input": "hi"}', "missing required field `model`", None),
        (b'{"model": ""}', "must not be empty", "model"),
        (
            b'{"model": "m", "input": [{"role": "user", "content": 5}]}',
            "Expected",
            "input[0].content",
        ),
        (b'{"model": "m", "input": [{"role": "robot", "content": "x"}]}', "role", "input[0]"),
        (
            b'{"model": "m", "input": [{"type": "function_call", "name": "f"}]}',
            "call_id",
            "input[0]",
        ),
        (
            b'{"model":"m","input":[{"type":"function_call_output","call_id":"c"}]}',
            "output",
            "input[0]",
        ),
        (
            b'{"model":"m","input":[{"role":"user","content":[{"type":"input_audio"}]}]}',
            "input_audio",
            "input[0].content[0].type",
        ),
        (
            b'{"model":"m","input":[{"role":"user","content":[{"type":"input_image"}]}]}',
            "image_url",
            "input[0].content[0].image_url",
        ),
        (b'{"model": "m", "temperature": "hot"}', "Expected `float | null`", "temperature"),
    ],
)
def test_parse_refuses_bad_bodies_with_a_clear_message(
    body: bytes, message: str, param: str | None
) -> None:
    with pytest.raises(ProtocolError) as caught:
        parse(body)
    assert message in caught.value.message
    assert caught.value.param == param
    assert "Traceback" not in caught.value.message


def test_parse_refuses_deep_nesting_without_recursing_forever() -> None:
    deep = b'{"model": "m", "client_metadata": {"x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}}"
    with pytest.raises(ProtocolError, match="nested too deeply"):
        parse(deep)


def test_parse_refuses_a_schema_too_deep_to_echo() -> None:
    schema: dict[str, Any] = {"type": "object"}
    for _ in range(70):
        schema = {"type": "object", "properties": {"x": schema}}
    tool = {"type": "function", "name": "f", "parameters": schema}
    with pytest.raises(ProtocolError) as caught:
        request(tools=[tool])
    assert caught.value.param == "tools[0].parameters"


def test_a_huge_input_of_tiny_items_costs_less_than_plain_json_objects() -> None:
    body = orjson.dumps({"model": "m", "input": [{"role": "user", "content": "x"}] * 100_000})
    tracemalloc.start()
    req = parse(body)
    ours = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    tracemalloc.start()
    plain = orjson.loads(body)
    theirs = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    assert len(req.input) == len(plain["input"]) == 100_000
    assert ours < theirs


# -- input_items ----------------------------------------------------------------------------------


def test_string_input_is_one_stored_user_message() -> None:
    [item] = input_items(request(input="hello"))
    assert item["id"].startswith("msg_")
    assert (item["type"], item["role"]) == ("message", "user")
    assert item["content"] == [{"type": "input_text", "text": "hello"}]
    ITEM.validate_python(item)


def test_items_keep_client_ids_and_get_ours_when_missing() -> None:
    req = request(
        input=[
            {"id": "msg_client", "type": "message", "role": "user", "content": "q"},
            {"role": "assistant", "content": "a"},
            {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c1", "output": "42"},
            {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": "gAAA"},
        ]
    )
    items = input_items(req)
    assert items[0]["id"] == "msg_client"
    assert items[1]["id"].startswith("msg_") and items[1]["content"][0]["type"] == "output_text"
    assert items[2]["id"].startswith("fc_") and items[2]["call_id"] == "c1"
    assert items[3]["id"].startswith("fco_") and items[3]["output"] == "42"
    assert items[4] == {
        "type": "reasoning",
        "id": "rs_1",
        "summary": [],
        "encrypted_content": "gAAA",
    }
    assert len({item["id"] for item in items}) == 5
    for item in items[:4]:
        ITEM.validate_python(item)


# -- to_chat: messages ----------------------------------------------------------------------------


def test_instructions_system_and_developer_become_one_leading_system_message() -> None:
    req = request(
        instructions="Be brief.",
        input=[
            {"role": "developer", "content": "Use tools."},
            {"role": "user", "content": "hi"},
            {"role": "system", "content": [{"type": "input_text", "text": "Late rule."}]},
        ],
    )
    messages = chat(req)["messages"]
    assert messages == [
        {"role": "system", "content": "Be brief.\n\nUse tools.\n\nLate rule."},
        {"role": "user", "content": "hi"},
    ]


def test_text_parts_join_into_a_string_and_images_make_a_parts_list() -> None:
    text_only = {"role": "user", "content": [{"type": "input_text", "text": "a"}] * 2}
    with_images = {
        "role": "user",
        "content": [
            {"type": "input_text", "text": "what is this?"},
            {"type": "input_image", "image_url": "https://x/cat.png", "detail": "high"},
            {"type": "input_image", "image_url": "data:image/png;base64,AAAA", "detail": "auto"},
        ],
    }
    answer = {"role": "assistant", "content": [{"type": "output_text", "text": "ok"}]}
    messages = chat(request(input=[text_only, with_images, answer]))["messages"]
    assert messages[0] == {"role": "user", "content": "a\na"}
    assert messages[1]["content"] == [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": "https://x/cat.png", "detail": "high"}},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
    ]
    assert messages[2] == {"role": "assistant", "content": "ok"}


def test_function_calls_merge_into_the_assistant_message_before_them() -> None:
    req = request(
        input=[
            {"role": "user", "content": "weather?"},
            {"type": "message", "role": "assistant", "content": "Checking."},
            {"type": "function_call", "id": "fc_1", "call_id": "c1", "name": "w", "arguments": "1"},
            {"type": "function_call", "id": "fc_2", "call_id": "c2", "name": "w", "arguments": "2"},
            {"type": "function_call_output", "call_id": "c1", "output": "sun"},
            {
                "type": "function_call_output",
                "call_id": "c2",
                "output": [
                    {"type": "input_text", "text": "ra"},
                    {"type": "input_text", "text": "in"},
                ],
            },
            {"type": "function_call", "call_id": "c3", "name": "w", "arguments": ""},
        ]
    )
    messages = chat(req)["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "tool", "tool", "assistant"]
    assert messages[1]["content"] == "Checking."
    assert messages[1]["tool_calls"] == [
        {"id": "c1", "type": "function", "function": {"name": "w", "arguments": "1"}},
        {"id": "c2", "type": "function", "function": {"name": "w", "arguments": "2"}},
    ]
    assert messages[2] == {"role": "tool", "tool_call_id": "c1", "content": "sun"}
    assert messages[3] == {"role": "tool", "tool_call_id": "c2", "content": "ra\nin"}
    assert messages[4]["content"] == ""
    assert messages[4]["tool_calls"][0]["function"]["arguments"] == "{}"


REASONING_HISTORY = [
    {"role": "user", "content": "q"},
    {
        "type": "reasoning",
        "id": "rs_1",
        "summary": [{"type": "summary_text", "text": "think"}],
        "encrypted_content": "gAAAA-opaque",
    },
    {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
    {"type": "function_call_output", "call_id": "c1", "output": "r"},
    {"type": "reasoning", "id": "rs_2", "summary": [], "encrypted_content": "gAAAA-only"},
    {"role": "assistant", "content": "done"},
]


@pytest.mark.parametrize("kind", ["openai", "vllm", "ollama", "openai-compatible"])
def test_reasoning_items_are_dropped_for_providers_that_take_no_reasoning(kind: str) -> None:
    body = chat(request(input=REASONING_HISTORY), kind)
    assert all("reasoning_content" not in m for m in body["messages"])
    assert b"gAAAA" not in orjson.dumps(body)


@pytest.mark.parametrize("kind", ["dashscope", "deepseek"])
def test_reasoning_summaries_replay_as_reasoning_content(kind: str) -> None:
    body = chat(request(input=REASONING_HISTORY), kind)
    messages = body["messages"]
    assert messages[1]["reasoning_content"] == "think"
    assert messages[1]["tool_calls"][0]["id"] == "c1"
    assert "reasoning_content" not in messages[3]  # encrypted only: nothing to replay
    assert b"gAAAA" not in orjson.dumps(body)


def test_history_goes_before_the_requests_own_input() -> None:
    history = input_items(request(input="first"))
    history.append(
        {"id": "msg_o", "type": "message", "role": "assistant", "status": "completed",
         "content": [{"type": "output_text", "text": "one", "annotations": [], "logprobs": []}]}
    )  # fmt: skip
    body = chat(request(input="second", instructions="sys"), history=history)
    assert body["messages"] == [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "one"},
        {"role": "user", "content": "second"},
    ]


# -- to_chat: tools and options -------------------------------------------------------------------


def test_function_tools_keep_strict_only_when_the_client_asked() -> None:
    tools = [
        {"type": "function", "name": "a", "parameters": {"type": "object"}, "strict": False},
        {"type": "function", "name": "b", "description": "B", "strict": True},
    ]
    body = chat(request(tools=tools, tool_choice="required", parallel_tool_calls=False))
    assert body["tools"] == [
        {"type": "function", "function": {"name": "a", "parameters": {"type": "object"}}},
        {
            "type": "function",
            "function": {
                "name": "b",
                "description": "B",
                "parameters": {"type": "object", "properties": {}},
                "strict": True,
            },
        },
    ]
    assert (body["tool_choice"], body["parallel_tool_calls"]) == ("required", False)


def test_namespace_tools_flatten_and_history_calls_flatten_the_same_way() -> None:
    history_call = {
        "type": "function_call", "call_id": "c1", "name": "find", "namespace": "crm",
        "arguments": "{}",
    }  # fmt: skip
    body = chat(request(tools=[NAMESPACE_TOOL], input=[history_call]))
    [tool] = body["tools"]
    assert tool["function"]["name"] == "crm__find"
    assert tool["function"]["strict"] is True
    assert body["messages"][0]["tool_calls"][0]["function"]["name"] == "crm__find"


def test_flat_names_stay_valid_and_distinct_when_long_or_odd() -> None:
    long_a = flat_name("mcp.server-with-a-very-long-name", "tool_" + "a" * 60)
    long_b = flat_name("mcp.server-with-a-very-long-name", "tool_" + "a" * 59 + "b")
    assert FUNCTION_NAME.match(long_a) and FUNCTION_NAME.match(long_b)
    assert long_a != long_b
    assert flat_name("my.ns", "f") == "my_ns__f"


def test_built_in_tools_are_dropped_and_reported() -> None:
    tools = [
        {"type": "function", "name": "f"},
        {"type": "web_search", "search_context_size": "low"},
        {"type": "file_search", "vector_store_ids": ["vs"]},
        {"type": "custom", "name": "apply_patch"},
        {"type": "namespace", "name": "ns", "tools": [{"type": "custom", "name": "c"}]},
        {"type": "tool_search"},
        {"type": "web_search"},
    ]
    req = request(tools=tools, tool_choice={"type": "web_search"})
    body = chat(req)
    assert [t["function"]["name"] for t in body["tools"]] == ["f"]
    assert body["tool_choice"] == "auto"
    assert "enable_search" not in body
    assert to_chat(req, model="m", provider_kind="openai", include_usage=False).dropped == [
        "web_search", "file_search", "custom", "tool_search",
    ]  # fmt: skip
    assert tool_types_dropped(req, "dashscope") == ["file_search", "custom", "tool_search"]


def test_dashscope_runs_web_search_itself() -> None:
    body = chat(request(tools=[{"type": "web_search"}], tool_choice="auto"), "dashscope")
    assert body["enable_search"] is True
    assert "tools" not in body and "tool_choice" not in body


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        ("auto", "auto"),
        ("none", "none"),
        ("required", "required"),
        ({"type": "function", "name": "f"}, {"type": "function", "function": {"name": "f"}}),
        ({"type": "function", "name": "missing"}, "auto"),
        ({"type": "file_search"}, "auto"),
        ({"type": "allowed_tools", "mode": "required", "tools": []}, "required"),
    ],
)
def test_tool_choice_takes_the_chat_shape(choice: Any, expected: Any) -> None:
    body = chat(request(tools=[{"type": "function", "name": "f"}], tool_choice=choice))
    assert body["tool_choice"] == expected


def test_no_tools_means_no_tool_choice_or_parallel_flag() -> None:
    body = chat(request(input="hi", tool_choice="required", parallel_tool_calls=True))
    assert not {"tools", "tool_choice", "parallel_tool_calls"} & body.keys()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            {"format": {"type": "json_schema", "name": "p", "schema": {"type": "object"},
                        "strict": True}, "verbosity": "low"},
            {"type": "json_schema",
             "json_schema": {"name": "p", "schema": {"type": "object"}, "strict": True}},
        ),
        ({"format": {"type": "json_object"}}, {"type": "json_object"}),
        ({"format": {"type": "text"}, "verbosity": "high"}, None),
    ],
)  # fmt: skip
def test_text_format_becomes_response_format(text: Any, expected: Any) -> None:
    body = chat(request(text=text))
    assert body.get("response_format") == expected
    assert "verbosity" not in orjson.dumps(body).decode()


@pytest.mark.parametrize(
    ("kind", "reasoning", "expected"),
    [
        ("openai", {"effort": "minimal"}, {"reasoning_effort": "minimal"}),
        ("vllm", {"effort": "xhigh"}, {"reasoning_effort": "high"}),
        ("openai-compatible", {"effort": "none"}, {}),
        ("ollama", {"summary": "auto"}, {}),
        ("deepseek", {"effort": "high"}, {}),
        ("dashscope", None, {"enable_thinking": False}),
        ("dashscope", {"effort": "minimal"}, {"enable_thinking": False}),
        ("dashscope", {"effort": "low"}, {"enable_thinking": True, "thinking_budget": 2048}),
        ("dashscope", {"effort": "high", "summary": "auto"}, {"enable_thinking": True}),
        ("dashscope", {"summary": "auto"}, {}),
    ],
)
def test_reasoning_effort_per_provider(kind: str, reasoning: Any, expected: Any) -> None:
    fields = {"reasoning": reasoning} if reasoning else {}
    body = chat(request(**fields), kind)
    keys = {"reasoning_effort", "enable_thinking", "thinking_budget", "reasoning"}
    assert {k: v for k, v in body.items() if k in keys} == expected


@pytest.mark.parametrize(
    ("kind", "tokens_key", "user", "cache_key"),
    [
        ("openai", "max_completion_tokens", True, True),
        ("vllm", "max_tokens", True, True),
        ("dashscope", "max_tokens", False, False),
        ("deepseek", "max_tokens", False, False),
    ],
)
def test_sampling_options_and_who_gets_user_and_cache_key(
    kind: str, tokens_key: str, user: bool, cache_key: bool
) -> None:
    req = request(
        max_output_tokens=99, temperature=0.2, top_p=0.9, safety_identifier="u-1",
        prompt_cache_key="k-1",
    )  # fmt: skip
    body = chat(req, kind)
    assert (body[tokens_key], body["temperature"], body["top_p"]) == (99, 0.2, 0.9)
    assert body.get("user") == ("u-1" if user else None)
    assert body.get("prompt_cache_key") == ("k-1" if cache_key else None)


def test_user_wins_over_safety_identifier() -> None:
    assert chat(request(user="u", safety_identifier="s"))["user"] == "u"


@pytest.mark.parametrize("include_usage", [True, False])
def test_stream_asks_for_usage_only_when_told(include_usage: bool) -> None:
    body = chat(request(stream=True), include_usage=include_usage)
    assert body["stream"] is True
    assert ("stream_options" in body) is include_usage
    assert "stream" not in chat(request(stream=False))


def test_a_codex_turn_field_by_field() -> None:
    codex = {
        "model": "gpt-5-codex",
        "instructions": None,
        "input": [
            {"type": "message", "role": "developer",
             "content": [{"type": "input_text", "text": "<permissions>sandboxed</permissions>"}]},
            {"type": "message", "role": "user",
             "content": [{"type": "input_text", "text": "<environment_context/>"},
                         {"type": "input_text", "text": "list files"}]},
            {"type": "reasoning", "id": "rs_1",
             "summary": [{"type": "summary_text", "text": "**Listing**"}],
             "content": None, "encrypted_content": "gAAAAABo-secret"},
            {"type": "function_call", "id": "fc_1", "name": "shell", "namespace": None,
             "arguments": "{\"command\":[\"ls\"]}", "call_id": "call_1"},
            {"type": "function_call_output", "call_id": "call_1",
             "output": "README.md\nsrc"},
            {"type": "function_call", "id": "fc_2", "name": "read", "namespace": "files",
             "arguments": "{\"path\":\"README.md\"}", "call_id": "call_2"},
            {"type": "function_call_output", "id": "fco_2", "call_id": "call_2", "output": "# hi"},
        ],
        "tools": [
            {"type": "function", "name": "shell", "description": "Run", "strict": False,
             "parameters": {"type": "object", "properties": {"command": {"type": "array"}},
                            "required": ["command"], "additionalProperties": False}},
            {"type": "namespace", "name": "files", "description": "Files",
             "tools": [{"type": "function", "name": "read", "parameters": {"type": "object"},
                        "strict": False}]},
            {"type": "web_search", "external_web_access": False},
            {"type": "custom", "name": "apply_patch", "format": {"type": "grammar"}},
        ],
        "tool_choice": "auto",
        "parallel_tool_calls": True,
        "reasoning": {"effort": "medium", "summary": "auto"},
        "store": False,
        "stream": True,
        "include": ["reasoning.encrypted_content"],
        "prompt_cache_key": "0199-session",
        "client_metadata": {"x-codex-installation-id": "abc"},
        "text": {"verbosity": "low"},
    }  # fmt: skip
    req = parse(orjson.dumps(codex))
    assert req.store is False
    body = orjson.loads(
        to_chat(req, model="qwen3-coder-plus", provider_kind="dashscope", include_usage=True).body
    )
    assert body["model"] == "qwen3-coder-plus"
    assert body["messages"] == [
        {"role": "system", "content": "<permissions>sandboxed</permissions>"},
        {"role": "user", "content": "<environment_context/>\nlist files"},
        {"role": "assistant", "content": "", "reasoning_content": "**Listing**",
         "tool_calls": [{"id": "call_1", "type": "function",
                         "function": {"name": "shell", "arguments": "{\"command\":[\"ls\"]}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "README.md\nsrc"},
        {"role": "assistant", "content": "",
         "tool_calls": [{"id": "call_2", "type": "function",
                         "function": {"name": "files__read",
                                      "arguments": "{\"path\":\"README.md\"}"}}]},
        {"role": "tool", "tool_call_id": "call_2", "content": "# hi"},
    ]  # fmt: skip
    assert [t["function"]["name"] for t in body["tools"]] == ["shell", "files__read"]
    assert "strict" not in body["tools"][0]["function"]
    assert body["tool_choice"] == "auto"
    assert body["parallel_tool_calls"] is True
    assert body["enable_search"] is True
    assert body["enable_thinking"] is True and "thinking_budget" not in body
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    # Fields with no chat meaning, or that DashScope is not known to take, never leave.
    assert set(body) == {
        "model", "messages", "tools", "tool_choice", "parallel_tool_calls", "enable_search",
        "enable_thinking", "stream", "stream_options",
    }  # fmt: skip
    raw = orjson.dumps(body).decode()
    for absent in ("gAAAA", "x-codex", "0199-session", "apply_patch", "fc_1", "rs_1", "verbosity"):
        assert absent not in raw, absent
    openai_body = chat(req, "openai")
    assert openai_body["prompt_cache_key"] == "0199-session"
    assert openai_body["reasoning_effort"] == "medium"
    assert all("reasoning_content" not in m for m in openai_body["messages"])


# -- from_chat ------------------------------------------------------------------------------------


def completion(message: dict[str, Any], finish: str = "stop", **extra: Any) -> bytes:
    choice = {"index": 0, "message": {"role": "assistant", **message}, "finish_reason": finish}
    return orjson.dumps({"object": "chat.completion", "choices": [choice], **extra})


def test_a_text_answer_becomes_a_completed_response_echoing_the_request() -> None:
    req = request(
        input="hi", instructions="sys", temperature=0.3, max_output_tokens=50, metadata={"k": "v"},
        previous_response_id="resp_prev", store=False, user="u",
        text={"format": {"type": "json_object"}}, reasoning={"effort": "low"},
        tools=[{"type": "function", "name": "f"}], tool_choice="none",
    )  # fmt: skip
    usage = {
        "prompt_tokens": 20, "completion_tokens": 7, "total_tokens": 27,
        "prompt_tokens_details": {"cached_tokens": 16},
        "completion_tokens_details": {"reasoning_tokens": 3},
    }  # fmt: skip
    obj = from_chat(completion({"content": "Hello!"}, usage=usage), reply(req))
    parsed = Response.model_validate(obj)
    assert parsed.output_text == "Hello!"
    assert (obj["id"], obj["object"], obj["status"], obj["model"]) == (
        "resp_abc", "response", "completed", "client-model",
    )  # fmt: skip
    assert obj["created_at"] == 1_700_000_000 and obj["incomplete_details"] is None
    [message] = obj["output"]
    assert message["id"].startswith("msg_") and message["status"] == "completed"
    assert message["content"] == [
        {"type": "output_text", "text": "Hello!", "annotations": [], "logprobs": []}
    ]
    assert obj["usage"] == {
        "input_tokens": 20,
        "input_tokens_details": {"cached_tokens": 16, "cache_write_tokens": 0},
        "output_tokens": 7,
        "output_tokens_details": {"reasoning_tokens": 3},
        "total_tokens": 27,
    }
    keys = ("instructions", "temperature", "max_output_tokens", "metadata",
            "previous_response_id", "store", "user", "tool_choice")  # fmt: skip
    echoed = {k: obj[k] for k in keys}
    assert echoed == {
        "instructions": "sys", "temperature": 0.3, "max_output_tokens": 50, "metadata": {"k": "v"},
        "previous_response_id": "resp_prev", "store": False, "user": "u", "tool_choice": "none",
    }  # fmt: skip
    assert obj["text"]["format"] == {"type": "json_object"}
    assert obj["reasoning"]["effort"] == "low"
    assert obj["tools"] == [{"type": "function", "name": "f"}]


def test_reasoning_and_tool_calls_become_items_with_the_namespace_restored() -> None:
    req = request(tools=[NAMESPACE_TOOL, {"type": "function", "name": "plain"}])
    calls = [
        {"id": "call_9", "type": "function",
         "function": {"name": "crm__find", "arguments": "{\"q\":\"ann\"}"}},
        {"type": "function", "function": {"name": "plain", "arguments": ""}},
    ]  # fmt: skip
    message = {"content": None, "reasoning_content": "look it up", "tool_calls": calls}
    obj = from_chat(completion(message, "tool_calls"), reply(req))
    Response.model_validate(obj)
    reasoning, found, plain = obj["output"]
    assert reasoning["id"].startswith("rs_")
    assert reasoning["summary"] == [{"type": "summary_text", "text": "look it up"}]
    assert found == {
        "id": found["id"], "type": "function_call", "status": "completed", "call_id": "call_9",
        "name": "find", "arguments": "{\"q\":\"ann\"}", "namespace": "crm",
    }  # fmt: skip
    assert found["id"].startswith("fc_")
    assert (plain["name"], plain["arguments"]) == ("plain", "{}")
    assert "namespace" not in plain and plain["call_id"].startswith("call_")


@pytest.mark.parametrize(
    ("finish", "reason"), [("length", "max_output_tokens"), ("content_filter", "content_filter")]
)
def test_a_cut_answer_is_incomplete(finish: str, reason: str) -> None:
    obj = from_chat(completion({"content": "par"}, finish), reply(request()))
    Response.model_validate(obj)
    assert obj["status"] == "incomplete"
    assert obj["incomplete_details"] == {"reason": reason}
    assert obj["output"][-1]["status"] == "incomplete"


def test_without_usage_the_answer_carries_an_estimate() -> None:
    obj = from_chat(completion({"content": "x" * 40}), reply(request(), estimate=12))
    assert obj["usage"]["input_tokens"] == 12
    assert obj["usage"]["output_tokens"] == 10
    assert obj["usage"]["total_tokens"] == 22


def test_deepseek_cache_hits_count_as_cached_tokens() -> None:
    usage = {"prompt_tokens": 10, "completion_tokens": 1, "prompt_cache_hit_tokens": 8}
    obj = from_chat(completion({"content": "k"}, usage=usage), reply(request()))
    assert obj["usage"]["input_tokens_details"]["cached_tokens"] == 8
    assert obj["usage"]["total_tokens"] == 11


@pytest.mark.parametrize(
    "answer",
    [b"<html>502</html>", b'{"error": {"message": "boom"}}', b'{"choices": []}', b"[]"],
)
def test_anything_but_a_chat_completion_is_a_protocol_error(answer: bytes) -> None:
    with pytest.raises(ProtocolError, match="not a chat completion"):
        from_chat(answer, reply(request()))


# -- StreamTranslator -----------------------------------------------------------------------------

TEXT_EVENTS = [
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.content_part.added",
    "response.output_text.delta",
    "response.output_text.delta",
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
    "response.completed",
]


def test_a_text_stream_in_openais_event_order() -> None:
    payloads = [chunk({"role": "assistant", "content": ""}), chunk({"content": "Hel"}),
                chunk({"content": "lo"}), chunk(finish="stop"), usage_chunk()]  # fmt: skip
    translator, found = run(payloads)
    assert [e["type"] for e in found] == TEXT_EVENTS
    assert [e["sequence_number"] for e in found] == list(range(len(found)))
    created = found[0]["response"]
    assert (created["id"], created["status"], created["output"]) == ("resp_abc", "in_progress", [])
    delta = found[4]
    assert (delta["output_index"], delta["content_index"], delta["logprobs"]) == (0, 0, [])
    assert delta["item_id"] == found[2]["item"]["id"] == found[-2]["item"]["id"]
    final = sdk_replay(found)
    assert final.output_text == "Hello"
    assert final.status == "completed"
    assert translator.response == found[-1]["response"]
    Response.model_validate(translator.response)


@pytest.mark.parametrize("cut", range(1, 12))
def test_text_split_at_every_boundary_arrives_whole(cut: int) -> None:
    text = "Hé, wörld!\n"
    payloads = [
        chunk({"content": text[:cut]}),
        chunk({"content": text[cut:]}),
        chunk(finish="stop"),
    ]
    _, found = run(payloads)
    deltas = [e["delta"] for e in found if e["type"] == "response.output_text.delta"]
    assert "".join(deltas) == text
    assert sdk_replay(found).output_text == text


def test_reasoning_first_then_the_answer() -> None:
    payloads = [chunk({"reasoning_content": "Let me "}), chunk({"reasoning_content": "think."}),
                chunk({"content": "42"}), chunk(finish="stop")]  # fmt: skip
    _, found = run(payloads)
    types = [e["type"] for e in found]
    assert types[2:10] == [
        "response.output_item.added",
        "response.reasoning_summary_part.added",
        "response.reasoning_summary_text.delta",
        "response.reasoning_summary_text.delta",
        "response.reasoning_summary_text.done",
        "response.reasoning_summary_part.done",
        "response.output_item.done",
        "response.output_item.added",
    ]
    assert found[6]["text"] == "Let me think."
    final = sdk_replay(found)
    assert [item.type for item in final.output] == ["reasoning", "message"]
    assert final.output[0].summary[0].text == "Let me think."
    assert final.output_text == "42"
    message_added = found[9]
    assert message_added["output_index"] == 1


ARGUMENTS = '{"city": "Zürich", "days": 3}'


@pytest.mark.parametrize("cut", range(1, len(ARGUMENTS)))
def test_tool_call_arguments_split_mid_token(cut: int) -> None:
    req = request(tools=[NAMESPACE_TOOL], stream=True)
    payloads = [
        call_piece(0, ARGUMENTS[:cut], call_id="call_w", name="crm__find"),
        call_piece(0, ARGUMENTS[cut:]),  # later pieces carry id "" and name ""
        chunk(finish="tool_calls"),
    ]
    _, found = run(payloads, req)
    added = next(e for e in found if e["type"] == "response.output_item.added")
    assert added["item"]["arguments"] == "" and added["item"]["call_id"] == "call_w"
    done = next(e for e in found if e["type"] == "response.function_call_arguments.done")
    assert done["arguments"] == ARGUMENTS
    final = sdk_replay(found, [NAMESPACE_TOOL])
    [call] = final.output
    assert (call.name, call.namespace, call.call_id, call.arguments) == (
        "find", "crm", "call_w", ARGUMENTS,
    )  # fmt: skip


def test_two_parallel_tool_calls_with_interleaved_pieces() -> None:
    payloads = [
        chunk({"content": "Both."}),
        call_piece(0, '{"a"', call_id="call_1", name="f"),
        call_piece(1, '{"b"', call_id="call_2", name="g"),
        call_piece(0, ":1}"),
        call_piece(1, ":2}"),
        chunk(finish="tool_calls"),
        usage_chunk(),
    ]
    translator, found = run(payloads)
    final = sdk_replay(found)
    message, first, second = final.output
    assert message.type == "message" and final.output_text == "Both."
    assert (first.call_id, first.name, first.arguments) == ("call_1", "f", '{"a":1}')
    assert (second.call_id, second.name, second.arguments) == ("call_2", "g", '{"b":2}')
    deltas = [(e["output_index"], e["delta"]) for e in found if e["type"].endswith("ts.delta")]
    assert deltas == [(1, '{"a"'), (2, '{"b"'), (1, ":1}"), (2, ":2}")]
    assert found[-1]["type"] == "response.completed"
    assert translator.usage is not None and translator.usage["output_tokens"] == 5


def test_empty_arguments_finish_as_an_empty_object() -> None:
    payloads = [call_piece(0, "", call_id="call_e", name="now"), chunk(finish="tool_calls")]
    _, found = run(payloads)
    assert not [e for e in found if e["type"] == "response.function_call_arguments.delta"]
    assert sdk_replay(found).output[0].arguments == "{}"


def test_arguments_before_the_name_wait_for_it() -> None:
    payloads = [
        chunk({"tool_calls": [{"index": 0, "id": "call_x", "function": {"arguments": '{"k"'}}]}),
        call_piece(0, ":0}", name="late"),
        chunk(finish="tool_calls"),
    ]
    _, found = run(payloads)
    added = next(e for e in found if e["type"] == "response.output_item.added")
    assert added["item"]["name"] == "late"
    assert sdk_replay(found).output[0].arguments == '{"k":0}'


def test_usage_after_finish_reason_is_the_responses_usage() -> None:
    payloads = [chunk({"content": "a"}), chunk(finish="stop"), usage_chunk(9, 5, 2, 1)]
    translator, found = run(payloads)
    assert found[-1]["response"]["usage"] == {
        "input_tokens": 9,
        "input_tokens_details": {"cached_tokens": 2, "cache_write_tokens": 0},
        "output_tokens": 5,
        "output_tokens_details": {"reasoning_tokens": 1},
        "total_tokens": 14,
    }
    assert translator.usage == {
        "input_tokens": 9, "output_tokens": 5, "total_tokens": 14, "cached_tokens": 2,
        "reasoning_tokens": 1,
    }  # fmt: skip


def test_no_usage_leaves_an_estimate_in_the_response_and_none_for_accounting() -> None:
    translator, found = run([chunk({"content": "abcdefgh"}), chunk(finish="stop")])
    assert translator.usage is None
    assert found[-1]["response"]["usage"]["input_tokens"] == 11
    assert found[-1]["response"]["usage"]["output_tokens"] == 2


def test_a_stream_without_done_completes_on_finish_once() -> None:
    translator = StreamTranslator(reply(request()))
    out = translator.feed(chunk({"content": "hi"})) + translator.feed(chunk(finish="stop"))
    assert translator.response is None
    out += translator.finish()
    assert translator.finish() == b"" and translator.feed(chunk({"content": "late"})) == b""
    assert translator.fail(502, "late") == b""
    found = events(out)
    assert found[-1]["type"] == "response.completed"
    assert translator.response is not None and translator.response["status"] == "completed"
    assert sdk_replay(found).output_text == "hi"


def test_garbage_payloads_are_skipped() -> None:
    payloads = [chunk({"content": "a"}), b": keep-alive", b"{not json", b'{"choices": 7}',
                chunk({"content": "b"}), chunk(finish="stop")]  # fmt: skip
    _, found = run(payloads)
    assert sdk_replay(found).output_text == "ab"


def test_a_stream_cut_before_finish_reason_fails_instead_of_completing() -> None:
    translator = StreamTranslator(reply(request()))
    out = translator.feed(chunk({"content": "half an ans"})) + translator.finish()
    found = events(out)
    assert found[-1]["type"] == "response.failed"
    failed = found[-1]["response"]
    assert failed["status"] == "failed" and failed["error"]["code"] == "server_error"
    assert failed["output"][0]["status"] == "incomplete"
    assert failed["output"][0]["content"][0]["text"] == "half an ans"
    Response.model_validate(translator.response)
    assert sdk_replay(found) is None  # the SDK sees no completion, as with OpenAI's own failures


def test_fail_after_the_first_byte_reports_a_rate_limit() -> None:
    translator = StreamTranslator(reply(request()))
    out = translator.feed(call_piece(0, '{"x', call_id="call_1", name="f"))
    out += translator.fail(429, "slow down")
    found = events(out)
    failed = found[-1]
    assert failed["type"] == "response.failed"
    assert failed["response"]["error"] == {"code": "rate_limit_exceeded", "message": "slow down"}
    assert failed["response"]["output"][0]["arguments"] == '{"x'
    for payload in found:
        EVENT_TYPES[payload["type"]].model_validate(payload)


def test_fail_before_anything_still_announces_the_response() -> None:
    translator = StreamTranslator(reply(request()))
    found = events(translator.fail(500, "gone"))
    assert [e["type"] for e in found] == ["response.created", "response.in_progress",
                                          "response.failed"]  # fmt: skip


def test_an_error_payload_mid_stream_fails_the_response() -> None:
    translator = StreamTranslator(reply(request()))
    out = translator.feed(chunk({"content": "a"}))
    out += translator.feed(b'{"error": {"message": "overloaded", "code": 500}}')
    found = events(out)
    assert found[-1]["type"] == "response.failed"
    assert "overloaded" in found[-1]["response"]["error"]["message"]
    assert translator.feed(b"[DONE]") == b""


def test_length_finish_is_a_response_incomplete() -> None:
    _, found = run([chunk({"content": "trunc"}), chunk(finish="length")])
    last = found[-1]
    assert last["type"] == "response.incomplete"
    assert last["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    assert last["response"]["output"][0]["status"] == "incomplete"
    Response.model_validate(last["response"])
    EVENT_TYPES[last["type"]].model_validate(last)


def test_an_empty_answer_still_has_a_message() -> None:
    _, found = run([chunk({"role": "assistant"}, finish="stop")])
    final = sdk_replay(found)
    assert [item.type for item in final.output] == ["message"]
    assert final.output_text == ""


def test_refusals_arrive_as_text() -> None:
    _, found = run([chunk({"refusal": "I can't."}), chunk(finish="stop")])
    assert sdk_replay(found).output_text == "I can't."


def test_the_streamed_final_response_matches_from_chat_in_shape() -> None:
    req = request(tools=[NAMESPACE_TOOL], stream=True)
    translator, _ = run(
        [chunk({"reasoning_content": "r"}), chunk({"content": "t"}),
         call_piece(0, "{}", call_id="call_1", name="crm__find"), chunk(finish="tool_calls")],
        req,
    )  # fmt: skip
    message = {"reasoning_content": "r", "content": "t", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "crm__find", "arguments": "{}"}}
    ]}  # fmt: skip
    answered = from_chat(completion(message, "tool_calls"), reply(req))
    streamed = translator.response
    assert streamed is not None

    def shape(obj: dict[str, Any]) -> Any:
        items = [{k: v for k, v in item.items() if k != "id"} for item in obj["output"]]
        return {**obj, "output": items, "usage": None}

    assert shape(streamed) == shape(answered)


def test_failed_event_for_relayed_streams_is_openais_error_event() -> None:
    [payload] = events(failed_event(429, "slow down"))
    event = ResponseErrorEvent.model_validate(payload)
    assert (event.type, event.code, event.message) == ("error", "rate_limit_exceeded", "slow down")
