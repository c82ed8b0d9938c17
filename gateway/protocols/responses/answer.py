"""A chat completion -> the Responses `response` object, and the pieces streams reuse."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec

from gateway.protocols.common import ProtocolError
from gateway.protocols.responses.names import namespaced, restore
from gateway.protocols.responses.request import ResponsesRequest, new_id

# finish_reason -> incomplete_details.reason; every other reason is a completed response.
INCOMPLETE = {"length": "max_output_tokens", "content_filter": "content_filter"}


@dataclass(frozen=True)
class Reply:
    """What the gateway knows about the response it is building, before the provider answers."""

    response_id: str
    model: str  # the name the client asked for, not the provider's
    created_at: int
    request: ResponsesRequest
    input_estimate: int  # used when the provider reports no usage


class PromptDetails(msgspec.Struct):
    cached_tokens: int | None = None


class CompletionDetails(msgspec.Struct):
    reasoning_tokens: int | None = None


class ChatUsage(msgspec.Struct):
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None
    prompt_tokens_details: PromptDetails | None = None
    completion_tokens_details: CompletionDetails | None = None
    prompt_cache_hit_tokens: int | None = None  # DeepSeek's name for cached input


class ChatFunction(msgspec.Struct):
    name: str | None = None
    arguments: str | None = None


class ChatToolCall(msgspec.Struct):
    id: str | None = None
    function: ChatFunction | None = None
    index: int | None = None  # in stream deltas


class ChatMessage(msgspec.Struct):
    content: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None  # vLLM's and Ollama's name for it
    refusal: str | None = None
    tool_calls: list[ChatToolCall] | None = None


class ChatChoice(msgspec.Struct):
    index: int = 0
    message: ChatMessage | None = None
    delta: ChatMessage | None = None  # in stream chunks
    finish_reason: str | None = None


class ChatCompletion(msgspec.Struct):
    """A completion or a stream chunk: the same fields, `message` or `delta` in the choices."""

    choices: list[ChatChoice] | None = None
    usage: ChatUsage | None = None
    error: Any = None


completion_decoder = msgspec.json.Decoder(ChatCompletion)


def usage_counts(usage: ChatUsage) -> dict[str, int]:
    """The provider's usage in Responses terms, flat, for accounting."""
    prompt = usage.prompt_tokens or 0
    completion = usage.completion_tokens or 0
    details = usage.prompt_tokens_details
    cached = (details.cached_tokens if details else None) or usage.prompt_cache_hit_tokens or 0
    thinking = usage.completion_tokens_details
    return {
        "input_tokens": prompt,
        "output_tokens": completion,
        "total_tokens": usage.total_tokens or prompt + completion,
        "cached_tokens": cached,
        "reasoning_tokens": (thinking.reasoning_tokens if thinking else None) or 0,
    }


def estimated_counts(input_tokens: int, output_chars: int) -> dict[str, int]:
    # About four characters a token: the same rough rule the gateway uses elsewhere.
    output = (output_chars + 3) // 4
    return {
        "input_tokens": input_tokens,
        "output_tokens": output,
        "total_tokens": input_tokens + output,
        "cached_tokens": 0,
        "reasoning_tokens": 0,
    }


def usage_object(counts: dict[str, int]) -> dict[str, Any]:
    return {
        "input_tokens": counts["input_tokens"],
        "input_tokens_details": {"cached_tokens": counts["cached_tokens"], "cache_write_tokens": 0},
        "output_tokens": counts["output_tokens"],
        "output_tokens_details": {"reasoning_tokens": counts["reasoning_tokens"]},
        "total_tokens": counts["total_tokens"],
    }


def reasoning_item(item_id: str, text: str) -> dict[str, Any]:
    summary = [{"type": "summary_text", "text": text}] if text else []
    return {"id": item_id, "type": "reasoning", "summary": summary}


def message_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
    return {
        "id": item_id,
        "type": "message",
        "role": "assistant",
        "status": status,
        "content": [part] if text or status != "in_progress" else [],
    }


def call_item(
    item_id: str, *, call_id: str, name: str, namespace: str | None, arguments: str, status: str
) -> dict[str, Any]:
    item = {"id": item_id, "type": "function_call", "status": status, "call_id": call_id}
    item |= {"name": name, "arguments": arguments}
    if namespace is not None:
        item["namespace"] = namespace
    return item


def request_echo(req: ResponsesRequest) -> dict[str, Any]:
    """The request fields a response object repeats; computed once per response."""
    text: dict[str, Any] = {"format": {"type": "text"}}
    if req.text is not None:
        if req.text.format is not None:
            text["format"] = msgspec.to_builtins(req.text.format)
        if req.text.verbosity is not None:
            text["verbosity"] = req.text.verbosity
    reasoning = msgspec.to_builtins(req.reasoning) if req.reasoning else {}
    return {
        "instructions": msgspec.to_builtins(req.instructions),
        "max_output_tokens": req.max_output_tokens,
        "metadata": req.metadata or {},
        "parallel_tool_calls": req.parallel_tool_calls is not False,
        "previous_response_id": req.previous_response_id,
        "reasoning": {"effort": None, "summary": None} | reasoning,
        "store": req.store,
        "temperature": req.temperature,
        "text": text,
        "tool_choice": msgspec.to_builtins(req.tool_choice) or "auto",
        "tools": msgspec.to_builtins(req.tools),
        "top_p": req.top_p,
        "truncation": req.truncation or "disabled",
        "user": req.user,
    }


def response_object(
    reply: Reply,
    echo: dict[str, Any],
    *,
    status: str,
    output: list[dict[str, Any]],
    usage: dict[str, Any] | None,
    incomplete: str | None = None,
    error: dict[str, str] | None = None,
) -> dict[str, Any]:
    head = {"id": reply.response_id, "object": "response", "created_at": reply.created_at}
    return {
        **head,
        "status": status,
        "background": False,
        "error": error,
        "incomplete_details": {"reason": incomplete} if incomplete else None,
        "model": reply.model,
        "output": output,
        "usage": usage,
        **echo,
    }


def from_chat(answer: bytes, reply: Reply) -> dict[str, Any]:
    """A chat completion (JSON) -> the Responses `response` object."""
    try:
        completion = completion_decoder.decode(answer)
    except (msgspec.DecodeError, RecursionError):
        raise ProtocolError("the provider's answer is not a chat completion") from None
    choice = completion.choices[0] if completion.choices else None
    if choice is None or choice.message is None:
        raise ProtocolError("the provider's answer is not a chat completion (no choices)")
    incomplete = INCOMPLETE.get(choice.finish_reason or "")
    output = _output(choice.message, namespaced(reply.request.tools))
    if incomplete and output:
        output[-1]["status"] = "incomplete"
    if completion.usage is not None:
        counts = usage_counts(completion.usage)
    else:
        counts = estimated_counts(reply.input_estimate, _chars(choice.message))
    return response_object(
        reply,
        request_echo(reply.request),
        status="incomplete" if incomplete else "completed",
        output=output,
        usage=usage_object(counts),
        incomplete=incomplete,
    )


def _output(message: ChatMessage, names: dict[str, tuple[str, str]]) -> list[dict[str, Any]]:
    output: list[dict[str, Any]] = []
    thinking = message.reasoning_content or message.reasoning
    if thinking:
        output.append(reasoning_item(new_id("rs"), thinking))
    text = message.content or message.refusal or ""
    if text or not message.tool_calls:
        output.append(message_item(new_id("msg"), text, "completed"))
    for call in message.tool_calls or ():
        function = call.function or ChatFunction()
        name, namespace = restore(function.name or "", names)
        call_id = call.id or new_id("call")
        arguments = function.arguments or "{}"
        item = call_item(
            new_id("fc"),
            call_id=call_id,
            name=name,
            namespace=namespace,
            arguments=arguments,
            status="completed",
        )
        output.append(item)
    return output


def _chars(message: ChatMessage) -> int:
    calls = message.tool_calls or ()
    functions = [call.function for call in calls if call.function is not None]
    text = [message.content, message.reasoning_content or message.reasoning]
    text += [piece for function in functions for piece in (function.name, function.arguments)]
    return sum(len(piece) for piece in text if piece)
