"""A Chat Completions answer as a Messages answer, and what streamed and whole answers share."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

import msgspec

from gateway.protocols.anthropic.request import MessagesRequest, count_tokens
from gateway.protocols.common import ProtocolError

# Anthropic checks a thinking block's signature when it is replayed; a translating provider
# never sees it (replayed thinking goes back as reasoning_content), but clients require one.
SIGNATURE = "gateway-translated"
_STOP_REASONS = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
}


@dataclass(frozen=True)
class Reply:
    """What the answer translators need to know of the request."""

    model: str  # the name the client asked for: answers echo it, not the provider's
    input_estimate: int  # message_start's input_tokens until the provider reports its own
    stop_sequences: tuple[str, ...] = ()


def reply_for(req: MessagesRequest) -> Reply:
    return Reply(req.model, count_tokens(req), tuple(req.stop_sequences or ()))


class PromptDetails(msgspec.Struct, gc=False):
    cached_tokens: int | None = None


class ChatUsage(msgspec.Struct, gc=False):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    prompt_tokens_details: PromptDetails | None = None
    prompt_cache_hit_tokens: int | None = None  # DeepSeek's name for cached tokens

    def cached(self) -> int:
        details = self.prompt_tokens_details
        if details is not None and details.cached_tokens:
            return details.cached_tokens
        return self.prompt_cache_hit_tokens or 0

    def as_counts(self) -> dict[str, int]:
        total = self.prompt_tokens + self.completion_tokens
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": total,
        }


def usage_fields(usage: ChatUsage | None, reply: Reply, output_estimate: int) -> dict[str, int]:
    """Messages usage. Anthropic's `input_tokens` excludes cache reads (clients add the two to
    size the context), so the provider's cached tokens move from one to the other."""
    if usage is None:
        return {
            "input_tokens": reply.input_estimate,
            "output_tokens": max(1, output_estimate),
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
        }
    cached = min(usage.cached(), usage.prompt_tokens)
    return {
        "input_tokens": usage.prompt_tokens - cached,
        "output_tokens": usage.completion_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": cached,
    }


def stop_reason_for(
    finish_reason: str | None, matched: object, *, tool_calls: bool, reply: Reply
) -> tuple[str, str | None]:
    """(stop_reason, stop_sequence) for a chat finish_reason.

    Only vLLM says which stop string matched (`stop_reason` beside `finish_reason`); for the
    others a "stop" is reported as end_turn: the matched text is not in the answer, so guessing
    from its tail would be wrong whenever the model simply finished.
    """
    if tool_calls and finish_reason in (None, "stop", "tool_calls", "function_call"):
        return "tool_use", None  # Ollama and some vLLM parsers report "stop" with tool calls
    known = not reply.stop_sequences or matched in reply.stop_sequences
    if finish_reason == "stop" and isinstance(matched, str) and matched and known:
        return "stop_sequence", matched
    return _STOP_REASONS.get(finish_reason or "stop", "end_turn"), None


def message_id() -> str:
    return "msg_" + secrets.token_hex(12)


def tool_use_id() -> str:
    return "toolu_" + secrets.token_hex(12)


class _Function(msgspec.Struct, gc=False):
    name: str | None = None
    arguments: msgspec.Raw = msgspec.Raw()  # a JSON string, or an object (lax providers)


class _ToolCall(msgspec.Struct, gc=False):
    function: _Function | None = None


class _AnswerMessage(msgspec.Struct, gc=False):
    content: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None  # vLLM's newer name
    refusal: str | None = None
    tool_calls: list[_ToolCall] | None = None


class _Choice(msgspec.Struct, gc=False):
    message: _AnswerMessage
    finish_reason: str | None = None
    stop_reason: str | int | None = None  # vLLM: the stop string (or token id) that matched


class _Answer(msgspec.Struct, gc=False):
    choices: list[_Choice]
    usage: ChatUsage | None = None


_ANSWER = msgspec.json.Decoder(_Answer)
_OBJECT = msgspec.json.Decoder(dict[str, msgspec.Raw])
_STRING = msgspec.json.Decoder(str)
_ENCODER = msgspec.json.Encoder()
_EMPTY_INPUT = msgspec.Raw(b"{}")


def from_chat(answer: bytes, reply: Reply) -> bytes:
    """The Messages answer for a chat completion; ProtocolError if `answer` is not one."""
    try:
        parsed = _ANSWER.decode(answer)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError) as exc:
        raise ProtocolError(f"The provider's answer is not a chat completion: {exc}") from None
    if not parsed.choices:
        raise ProtocolError("The provider's answer has no choices.")
    choice = parsed.choices[0]
    message = choice.message
    content: list[dict[str, Any]] = []
    thinking = message.reasoning_content or message.reasoning
    if thinking:
        content.append({"type": "thinking", "thinking": thinking, "signature": SIGNATURE})
    text = message.content or message.refusal
    if text:
        content.append({"type": "text", "text": text})
    for call in message.tool_calls or ():
        function = call.function or _Function()
        content.append(
            {
                "type": "tool_use",
                "id": tool_use_id(),
                "name": function.name or "",
                "input": tool_input(function.arguments),
            }
        )
    finish = "content_filter" if message.refusal and not message.content else choice.finish_reason
    stop_reason, stop_sequence = stop_reason_for(
        finish, choice.stop_reason, tool_calls=bool(message.tool_calls), reply=reply
    )
    output_estimate = (len(thinking or "") + len(text or "")) // 4
    body = {
        "id": message_id(),
        "type": "message",
        "role": "assistant",
        "model": reply.model,
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": stop_sequence,
        "usage": usage_fields(parsed.usage, reply, output_estimate),
    }
    return _ENCODER.encode(body)


def tool_input(arguments: msgspec.Raw) -> msgspec.Raw:
    """A tool call's arguments as the `input` object, kept as the provider's bytes when they
    are one; `{}` for empty or broken arguments, which clients must still be able to run."""
    raw = bytes(arguments)
    try:
        if raw.startswith(b'"'):
            raw = _STRING.decode(raw).encode()
        if not raw.strip():
            return _EMPTY_INPUT
        _OBJECT.decode(raw)  # checks it is a JSON object without building its values
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
        return _EMPTY_INPUT
    return msgspec.Raw(raw.strip())
