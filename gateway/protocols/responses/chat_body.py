"""A Responses request -> the Chat Completions body for a chat-only provider.

Built field by field from the whitelist in `request.py`: `metadata`, `client_metadata`,
`include`, `store`, `truncation` and `text.verbosity` have no chat meaning and never leave here.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import msgspec

from gateway.protocols.responses.names import flat_name
from gateway.protocols.responses.request import (
    TEXT_PARTS,
    ContentPart,
    InputItem,
    ResponsesRequest,
    Tool,
    ToolChoice,
)

# Providers that take `reasoning_content` back on assistant messages (DeepSeek requires it
# during a tool-call loop); others would reject or ignore it, so reasoning is dropped there.
REPLAYS_REASONING = frozenset({"dashscope", "deepseek"})
# Providers known to accept `user` and `prompt_cache_key` (vLLM ignores fields it lacks).
TAKES_USER = frozenset({"openai", "vllm", "ollama", "openai-compatible"})
TAKES_CACHE_KEY = frozenset({"openai", "vllm"})
WEB_SEARCH = frozenset({"web_search", "web_search_preview", "web_search_2025_08_26"})
# A `low` effort caps DashScope's thinking; higher efforts keep the model's own (larger) budget.
DASHSCOPE_BUDGETS = {"low": 2048}
# vLLM and most OpenAI-compatible servers accept only these three efforts.
PORTABLE_EFFORTS = {
    "minimal": "low",
    "low": "low",
    "medium": "medium",
    "high": "high",
    "xhigh": "high",
}
EMPTY_SCHEMA: dict[str, Any] = {"type": "object", "properties": {}}


class ChatRequest(NamedTuple):
    """The provider's body, and the built-in tool types left out of it (for one debug line)."""

    body: bytes
    dropped: list[str]


def to_chat(
    req: ResponsesRequest,
    *,
    model: str,
    provider_kind: str,
    include_usage: bool,
    history: Sequence[dict[str, Any]] = (),
) -> ChatRequest:
    """The chat body (JSON) for `req`; `history` (stored items, oldest first) goes before it."""
    body: dict[str, Any] = {"model": model, "messages": chat_messages(req, provider_kind, history)}
    tools = chat_tools(req.tools)
    if tools:
        body["tools"] = tools
        body["tool_choice"] = chat_tool_choice(req.tool_choice, tools)
        if req.parallel_tool_calls is not None:
            body["parallel_tool_calls"] = req.parallel_tool_calls
    if provider_kind == "dashscope" and any(tool.type in WEB_SEARCH for tool in req.tools):
        body["enable_search"] = True
    _add_format(body, req)
    _add_reasoning(body, req, provider_kind)
    _add_sampling(body, req, provider_kind)
    if req.stream:
        body["stream"] = True
        if include_usage:
            body["stream_options"] = {"include_usage": True}
    return ChatRequest(msgspec.json.encode(body), tool_types_dropped(req, provider_kind))


def tool_types_dropped(req: ResponsesRequest, provider_kind: str | None = None) -> list[str]:
    """Types of the tools `to_chat` leaves out (built-ins a chat provider cannot run)."""
    dropped: list[str] = []
    for tool in req.tools:
        kinds = [inner.type for inner in tool.tools or ()] if tool.type == "namespace" else []
        for kind in kinds or [tool.type]:
            mapped = kind == "namespace" or (provider_kind == "dashscope" and kind in WEB_SEARCH)
            if kind != "function" and not mapped and kind not in dropped:
                dropped.append(kind)
    return dropped


def chat_messages(
    req: ResponsesRequest, provider_kind: str, history: Sequence[dict[str, Any]]
) -> list[dict[str, Any]]:
    items: list[InputItem] = []
    system: list[str] = []
    if isinstance(req.instructions, str):
        system.append(req.instructions)
    elif req.instructions:
        items.extend(req.instructions)
    if history:
        items.extend(msgspec.convert(list(history), list[InputItem]))
    if isinstance(req.input, str):
        items.append(InputItem(role="user", content=req.input))
    else:
        items.extend(req.input)
    messages = _conversation(items, system, provider_kind in REPLAYS_REASONING)
    # All system text goes first, as one message: several chat templates (Qwen's among them)
    # refuse a system message anywhere but at the start.
    if system:
        messages.insert(0, {"role": "system", "content": "\n\n".join(system)})
    return messages


def _conversation(
    items: Iterable[InputItem], system: list[str], replay_reasoning: bool
) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    assistant: dict[str, Any] | None = None  # the last message, while tool calls may join it
    reasoning: list[str] = []
    for item in items:
        if item.type == "message" and item.role in ("system", "developer"):
            system.append(_text(item.content))
        elif item.type == "message" and item.role == "assistant":
            assistant = {"role": "assistant", "content": _text(item.content)}
            messages.append(_with_reasoning(assistant, reasoning))
        elif item.type == "message":
            messages.append({"role": "user", "content": _user_content(item.content)})
            assistant, reasoning = None, []
        elif item.type == "function_call":
            if assistant is None:
                assistant = {"role": "assistant", "content": ""}
                messages.append(assistant)
            _with_reasoning(assistant, reasoning).setdefault("tool_calls", []).append(_call(item))
        elif item.type == "function_call_output":
            tool_message = {"role": "tool", "tool_call_id": item.call_id}
            messages.append({**tool_message, "content": _text(item.output)})
            assistant, reasoning = None, []
        elif item.type == "reasoning" and replay_reasoning:
            reasoning.extend(part.text for part in item.summary or ())
    return messages


def _with_reasoning(assistant: dict[str, Any], reasoning: list[str]) -> dict[str, Any]:
    if reasoning:
        earlier = assistant.get("reasoning_content")
        assistant["reasoning_content"] = "\n".join([earlier, *reasoning] if earlier else reasoning)
        reasoning.clear()
    return assistant


def _call(item: InputItem) -> dict[str, Any]:
    name = item.name or ""
    if item.namespace and item.namespace != name:
        name = flat_name(item.namespace, name)
    function = {"name": name, "arguments": item.arguments or "{}"}
    return {"id": item.call_id, "type": "function", "function": function}


def _text(content: str | list[ContentPart] | None) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    return "\n".join(part.text or part.refusal or "" for part in content if part.type in TEXT_PARTS)


def _user_content(content: str | list[ContentPart] | None) -> str | list[dict[str, Any]]:
    # Text-only content stays a string: some providers (DeepSeek) take no content arrays.
    if content is None or isinstance(content, str) or all(p.type in TEXT_PARTS for p in content):
        return _text(content)
    parts: list[dict[str, Any]] = []
    for part in content:
        if part.type in TEXT_PARTS:
            parts.append({"type": "text", "text": part.text or ""})
        elif part.type == "input_image":
            image: dict[str, Any] = {"url": part.image_url}
            if part.detail in ("low", "high"):
                image["detail"] = part.detail
            parts.append({"type": "image_url", "image_url": image})
        elif part.type == "input_file":
            fields = {"file_data": part.file_data, "file_id": part.file_id}
            fields["filename"] = part.filename
            file = {key: value for key, value in fields.items() if value is not None}
            parts.append({"type": "file", "file": file})
    return parts


def chat_tools(tools: Iterable[Tool]) -> list[dict[str, Any]]:
    functions: list[dict[str, Any]] = []
    for tool in tools:
        if tool.type == "function" and tool.name:
            functions.append(_function(tool.name, tool))
        elif tool.type == "namespace" and tool.name:
            for inner in tool.tools or ():
                if inner.type == "function" and inner.name:
                    functions.append(_function(flat_name(tool.name, inner.name), inner))
    return functions


def _function(name: str, tool: Tool) -> dict[str, Any]:
    function: dict[str, Any] = {"name": name}
    if tool.description:
        function["description"] = tool.description
    function["parameters"] = tool.parameters if tool.parameters is not None else EMPTY_SCHEMA
    # Chat's strict mode rejects schemas Responses accepts; only an explicit request turns it on.
    if tool.strict is True:
        function["strict"] = True
    return {"type": "function", "function": function}


def chat_tool_choice(choice: str | ToolChoice | None, tools: list[dict[str, Any]]) -> Any:
    if choice is None or isinstance(choice, str):
        return choice or "auto"
    if choice.type == "allowed_tools":
        return choice.mode or "auto"
    names = {tool["function"]["name"] for tool in tools}
    if choice.type == "function" and choice.name in names:
        return {"type": "function", "function": {"name": choice.name}}
    return "auto"  # a built-in tool we dropped, or a function the request does not define


def _add_format(body: dict[str, Any], req: ResponsesRequest) -> None:
    fmt = req.text.format if req.text else None
    if fmt is None or fmt.type == "text":
        return
    if fmt.type == "json_object":
        body["response_format"] = {"type": "json_object"}
    elif fmt.type == "json_schema":
        schema: dict[str, Any] = {"name": fmt.name or "response", "schema": fmt.schema or {}}
        if fmt.description:
            schema["description"] = fmt.description
        if fmt.strict is not None:
            schema["strict"] = fmt.strict
        body["response_format"] = {"type": "json_schema", "json_schema": schema}


def _add_reasoning(body: dict[str, Any], req: ResponsesRequest, provider_kind: str) -> None:
    effort = req.reasoning.effort if req.reasoning else None
    if provider_kind == "dashscope":
        # Qwen thinks by default on hybrid models; a request that does not ask for reasoning
        # should not pay for it.
        if req.reasoning is None or effort in ("none", "minimal"):
            body["enable_thinking"] = False
        elif effort is not None:
            body["enable_thinking"] = True
            if effort in DASHSCOPE_BUDGETS:
                body["thinking_budget"] = DASHSCOPE_BUDGETS[effort]
    elif provider_kind == "deepseek" or effort is None:
        return  # DeepSeek picks thinking by model name and has no effort parameter
    elif provider_kind == "openai":
        body["reasoning_effort"] = effort
    elif effort in PORTABLE_EFFORTS:
        body["reasoning_effort"] = PORTABLE_EFFORTS[effort]


def _add_sampling(body: dict[str, Any], req: ResponsesRequest, provider_kind: str) -> None:
    if req.max_output_tokens is not None:
        # OpenAI's reasoning models refuse `max_tokens`; everyone else knows only that name.
        key = "max_completion_tokens" if provider_kind == "openai" else "max_tokens"
        body[key] = req.max_output_tokens
    if req.temperature is not None:
        body["temperature"] = req.temperature
    if req.top_p is not None:
        body["top_p"] = req.top_p
    user = req.user or req.safety_identifier
    if user and provider_kind in TAKES_USER:
        body["user"] = user
    if req.prompt_cache_key and provider_kind in TAKES_CACHE_KEY:
        body["prompt_cache_key"] = req.prompt_cache_key
