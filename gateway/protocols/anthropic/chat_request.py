"""A Messages request as a Chat Completions body for an OpenAI-compatible provider.

Only what is mapped here reaches the provider: `cache_control`, `context_management`, the
`metadata` object, `output_config.effort` and beta flags have no chat counterpart and are left
behind. Tool schemas and tool inputs go through as the client's own JSON bytes.
"""

from __future__ import annotations

from typing import Any

import msgspec

from gateway.protocols.anthropic.request import BILLING_HEADER, Block, MessagesRequest
from gateway.protocols.common import ProtocolError

_ENCODER = msgspec.json.Encoder()
_TOP_K_KINDS = frozenset({"dashscope", "vllm", "ollama"})
_REASONING_KINDS = frozenset({"dashscope", "deepseek"})  # accept reasoning_content replayed
_TOOL_CHOICE = {"auto": "auto", "any": "required", "none": "none"}
_EFFORTS = {"low": "low", "medium": "medium", "high": "high", "xhigh": "high", "max": "high"}
# OpenAI's limit on `user`; a longer id is a compound one (Claude Code's device + session JSON)
# that a provider cannot use for abuse tracking anyway, and truncating it would merge users.
_USER_MAX = 64


def to_chat(
    req: MessagesRequest,
    *,
    model: str,
    provider_kind: str,
    include_usage: bool,
    max_tokens_cap: int | None = None,
) -> bytes:
    """The Chat Completions body (JSON) for `req`; ProtocolError for content chat cannot carry."""
    body: dict[str, Any] = {"model": model, "messages": _messages(req, provider_kind)}
    max_tokens = req.max_tokens if max_tokens_cap is None else min(req.max_tokens, max_tokens_cap)
    # OpenAI's reasoning models refuse `max_tokens`; its successor is accepted by all of them.
    body["max_completion_tokens" if provider_kind == "openai" else "max_tokens"] = max_tokens
    _sampling(body, req, provider_kind)
    _tools(body, req)
    _thinking(body, req, provider_kind)
    output = req.output_config.format if req.output_config else None
    output = output or req.output_format
    if output is not None and output.type == "json_schema" and output.schema:
        schema = {"name": "output", "schema": output.schema}
        body["response_format"] = {"type": "json_schema", "json_schema": schema}
    user = req.metadata.user_id if req.metadata else None
    if user and len(user) <= _USER_MAX and not user.startswith("{"):
        body["user"] = user
    if req.stream:
        body["stream"] = True
        if include_usage:
            body["stream_options"] = {"include_usage": True}
    return _ENCODER.encode(body)


def _sampling(body: dict[str, Any], req: MessagesRequest, provider_kind: str) -> None:
    if req.stop_sequences:
        body["stop"] = req.stop_sequences
    if req.temperature is not None:
        body["temperature"] = req.temperature
    if req.top_p is not None:
        body["top_p"] = req.top_p
    if req.top_k is not None and provider_kind in _TOP_K_KINDS:
        body["top_k"] = req.top_k


def _tools(body: dict[str, Any], req: MessagesRequest) -> None:
    functions = []
    for i, tool in enumerate(req.tools or ()):
        if tool.type not in (None, "custom"):
            raise ProtocolError(
                f"tools.{i}: server tool {tool.type!r} runs on Anthropic's servers; "
                "this model's provider cannot run it",
                param=f"tools.{i}.type",
            )
        function: dict[str, Any] = {"name": tool.name, "parameters": tool.input_schema}
        if tool.description:
            function["description"] = tool.description
        functions.append({"type": "function", "function": function})
    if not functions:
        return  # OpenAI refuses tool_choice and parallel_tool_calls without tools
    body["tools"] = functions
    choice = req.tool_choice
    if choice is None:
        return
    if choice.type == "tool":
        body["tool_choice"] = {"type": "function", "function": {"name": choice.name}}
    else:
        body["tool_choice"] = _TOOL_CHOICE[choice.type]
    if choice.disable_parallel_tool_use and choice.type != "none":
        body["parallel_tool_calls"] = False


def _thinking(body: dict[str, Any], req: MessagesRequest, provider_kind: str) -> None:
    thinking = req.thinking
    on = thinking is not None and thinking.type != "disabled"
    if provider_kind == "dashscope":
        # Qwen3's hybrid models think by default; Messages does not unless asked.
        body["enable_thinking"] = on
        if on and thinking is not None and thinking.budget_tokens:
            body["thinking_budget"] = thinking.budget_tokens
        return
    if not on or thinking is None:
        return
    effort = _EFFORTS.get(req.output_config.effort or "") if req.output_config else None
    if effort is None and thinking.type == "enabled":
        effort = _effort_for_budget(thinking.budget_tokens)
    if effort is not None:  # adaptive without an effort: the provider's default
        body["reasoning_effort"] = effort


def _effort_for_budget(budget: int | None) -> str:
    """Claude Code's "think" (4,000), "think hard" (10,000) and "ultrathink" (31,999)."""
    if budget is None:
        return "medium"
    if budget <= 4096:
        return "low"
    return "medium" if budget <= 16384 else "high"


def _messages(req: MessagesRequest, provider_kind: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    system = _system_text(req)
    if system:
        out.append({"role": "system", "content": system})
    reasoning = provider_kind in _REASONING_KINDS
    for i, message in enumerate(req.messages):
        content = message.content
        if isinstance(content, str):
            out.append({"role": message.role, "content": content})
        elif message.role == "assistant":
            assistant = _assistant(content, reasoning=reasoning)
            if assistant is not None:
                out.append(assistant)
        else:
            out.extend(_user(content, f"messages.{i}.content"))
    return out


def _system_text(req: MessagesRequest) -> str:
    if req.system is None or isinstance(req.system, str):
        return req.system or ""
    # Claude Code's first system block carries a per-session hash: sent on, it would make
    # every session's prompt differ from its first bytes and defeat the provider's cache.
    texts = [b.text for b in req.system if b.text and not b.text.startswith(BILLING_HEADER)]
    return "\n\n".join(texts)


def _assistant(blocks: list[Block], *, reasoning: bool) -> dict[str, Any] | None:
    texts: list[str] = []
    thoughts: list[str] = []
    calls: list[dict[str, Any]] = []
    for block in blocks:
        if block.type == "text" and block.text:
            texts.append(block.text)
        elif block.type == "tool_use" and block.input:
            function = {"name": block.name, "arguments": bytes(block.input).decode()}
            calls.append({"id": block.id, "type": "function", "function": function})
        elif block.type == "thinking" and reasoning and block.thinking:
            thoughts.append(block.thinking)
        # redacted_thinking is Anthropic-encrypted, server tool blocks ran elsewhere: dropped.
    if not (texts or thoughts or calls):
        return None
    out: dict[str, Any] = {"role": "assistant", "content": "".join(texts) or None}
    if thoughts:
        out["reasoning_content"] = "".join(thoughts)
    if calls:
        out["tool_calls"] = calls
    elif out["content"] is None:
        out["content"] = ""
    return out


def _user(blocks: list[Block], path: str) -> list[dict[str, Any]]:
    """The tool results as `tool` messages first (chat wants them right after the assistant's
    calls), then one user message with the rest, images returned by tools included."""
    out: list[dict[str, Any]] = []
    returned: list[dict[str, Any]] = []  # images from tools, before the user's own parts
    parts: list[dict[str, Any]] = []
    for j, block in enumerate(blocks):
        if block.type == "tool_result":
            text, images = _tool_result(block, f"{path}.{j}")
            out.append({"role": "tool", "tool_call_id": block.tool_use_id, "content": text})
            returned.extend(images)
        else:
            parts.append(_part(block, f"{path}.{j}"))
    parts = returned + parts
    if parts:
        out.append({"role": "user", "content": _user_content(parts)})
    return out


def _user_content(parts: list[dict[str, Any]]) -> str | list[dict[str, Any]]:
    # Plain text as a string: some providers (DeepSeek) take no content arrays.
    if all(p["type"] == "text" for p in parts):
        return "\n\n".join(p["text"] for p in parts)
    return parts


def _tool_result(block: Block, path: str) -> tuple[str, list[dict[str, Any]]]:
    """The result's text (prefixed when it is an error) and any images it returned."""
    texts: list[str] = []
    images: list[dict[str, Any]] = []
    if isinstance(block.content, str):
        texts.append(block.content)
    else:
        for k, inner in enumerate(block.content or ()):
            part = _part(inner, f"{path}.content.{k}")
            if part["type"] == "text":
                texts.append(part["text"])
            else:  # chat's tool messages carry text only
                images.append(part)
    text = "\n\n".join(texts)
    if block.is_error:
        text = f"Error: {text}"
    return text, images


def _part(block: Block, path: str) -> dict[str, Any]:
    """One user-side block as a chat content part."""
    if block.type == "text":
        return {"type": "text", "text": block.text or ""}
    source = block.source
    if source is not None and block.type == "image":
        if source.type == "base64":
            url = f"data:{source.media_type};base64,{source.data}"
            return {"type": "image_url", "image_url": {"url": url}}
        if source.type == "url":
            return {"type": "image_url", "image_url": {"url": source.url}}
    if source is not None and block.type == "document" and source.type == "text":
        return {"type": "text", "text": source.data or ""}
    what = f"{block.type} ({source.type})" if source is not None else block.type
    raise ProtocolError(
        f"{path}: content of type {what} cannot be sent to this model's provider", param=path
    )
