"""What one attempt sends and how its answer comes back, whatever dialect the client speaks.

The attempt loop asks the request's `Dialect` for each candidate's `Leg`: the path, the
body, any headers to set or drop, and an `AnswerShape` that turns the provider's answer
into the client's (None: the provider's bytes are relayed as they are). Chat Completions
is the `ChatDialect` below; Messages and Responses are built by their views from the pure
translators in `gateway.protocols`. Nothing else in this package knows which dialect a
request is in.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import orjson

from gateway.upstream.edits import edited
from gateway.upstream.router import Candidate

# Qwen3's hybrid-thinking models refuse a non-streamed call unless thinking is off; a client
# that sets enable_thinking keeps its value (edits adds only what is absent).
DASHSCOPE_CHAT_DEFAULTS = {"enable_thinking": False}


class StreamTranslator(Protocol):
    """Fed the provider's event stream one `data:` payload at a time; returns client bytes."""

    def feed(self, data: bytes) -> bytes: ...

    def finish(self) -> bytes: ...

    def fail(self, status: int, message: str) -> bytes: ...

    @property
    def failed(self) -> bool:
        """The stream ended in the dialect's error event: the provider's failure."""
        ...

    @property
    def usage(self) -> Mapping[str, int] | None: ...


class AnswerShape(Protocol):
    """How a translated attempt's answer becomes the client's. `answer` raises ValueError
    for an answer it cannot read (the gateway's 502)."""

    def answer(self, body: bytes) -> bytes: ...

    def error(self, status: int, body: bytes) -> bytes: ...

    def stream(self) -> StreamTranslator: ...


@dataclass(frozen=True)
class Leg:
    """One attempt's request, as the dialect builds it for one candidate."""

    path: str
    body: bytes | None
    query: bytes = b""
    method: str = "POST"
    base_url: str | None = None  # None: the provider's base_url
    # The gateway added stream_options.include_usage: what it brings back is the gateway's.
    usage_asked: bool = False
    # Set on the request after the client's forwarded headers; None drops one.
    headers: Mapping[str, str | None] = field(default_factory=dict)
    shape: AnswerShape | None = None
    # A relayed stream's failure after its first byte, as an event of its dialect
    # (status, message -> bytes); None: Chat Completions' `data: {"error": ...}`.
    stream_error: Callable[[int, str], bytes] | None = None
    # Shown the first bytes of a successful answer relayed as is (a native provider's
    # response id is read from them).
    on_first: Callable[[bytes], None] | None = None
    # Whether the answer's usage is the request's cost (not so for reading a stored one).
    counts_usage: bool = True


class Dialect(Protocol):
    def leg(self, candidate: Candidate, *, stream: bool, include_usage: bool) -> Leg: ...


@dataclass(frozen=True)
class ChatDialect:
    """Chat Completions, completions and embeddings: relayed, with the few edits of `edits`."""

    path: str
    body: bytes | None
    query: bytes = b""
    # An output limit to send when the request has none (a budgeted key's): see record.
    output_cap: int | None = None

    def leg(self, candidate: Candidate, *, stream: bool, include_usage: bool) -> Leg:
        body = self.body
        if body is not None:
            chat = self.path == "/chat/completions"
            defaults: dict[str, object] = {}
            if candidate.provider.kind == "dashscope" and chat and not stream:
                defaults.update(DASHSCOPE_CHAT_DEFAULTS)
            if self.output_cap is not None and self.path != "/embeddings":
                defaults[output_limit_name(candidate.provider.kind, chat)] = self.output_cap
            body = edited(
                body,
                model=candidate.upstream_model if candidate.rewrite else None,
                defaults=defaults or None,
                include_usage=include_usage,
            )
        return Leg(self.path, body, self.query, usage_asked=include_usage)


def as_chunk(answer: bytes) -> bytes:
    """A Chat Completions answer as the one stream chunk that says the same thing, for a
    provider that answered JSON to a stream request (ValueError if it is no completion)."""
    try:
        whole = orjson.loads(answer)
        choice = whole["choices"][0]
        message = choice["message"]
        calls = [{"index": i, **call} for i, call in enumerate(message.get("tool_calls") or [])]
    except (orjson.JSONDecodeError, LookupError, TypeError, AttributeError) as exc:
        raise ValueError("not a chat completion") from exc
    delta = {key: message.get(key) for key in ("role", "content", "reasoning_content")}
    if calls:
        delta["tool_calls"] = calls
    chunk = {
        "id": whole.get("id"),
        "object": "chat.completion.chunk",
        "model": whole.get("model"),
        "choices": [{"index": 0, "delta": delta, "finish_reason": choice.get("finish_reason")}],
        "usage": whole.get("usage"),
    }
    return orjson.dumps(chunk)


def output_limit_name(kind: str, chat: bool) -> str:
    """The output limit's field: OpenAI's reasoning models refuse `max_tokens` in chat."""
    return "max_completion_tokens" if kind == "openai" and chat else "max_tokens"
