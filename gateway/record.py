"""The facts of one request, filled in as it goes and logged once at the end.

A plain object rather than `flask.g`: a streamed body is sent after the request context is
gone, and the stream still has to record its first byte, its usage and its errors.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation

import msgspec

# Messages and Responses name them otherwise; the gateway counts in Chat Completions' names.
_NAMES = {
    "input_tokens": "prompt_tokens",
    "output_tokens": "completion_tokens",
    "prompt_tokens": "prompt_tokens",
    "completion_tokens": "completion_tokens",
    "total_tokens": "total_tokens",
    # Prompt tokens read from the provider's context cache (priced at `cached_input`).
    "cached_tokens": "cached_tokens",
}
# Where the cached part of the prompt is reported: Chat Completions (DashScope, OpenAI) and
# Responses.
_CACHE_DETAILS = ("prompt_tokens_details", "input_tokens_details")
# Anthropic counts prompt-cache reads and writes apart from input_tokens: they are prompt
# tokens all the same (a client using cache_control would otherwise pass tpm and quotas).
_ADDED_TO_PROMPT = frozenset({"cache_creation_input_tokens", "cache_read_input_tokens"})
# A provider's count above this is not believed (it would overflow Redis's counters).
MAX_REPORTED_TOKENS = 100_000_000
# `"usage": {`, and the strings and braces of what follows (strings may hold braces).
_USAGE_MEMBER = re.compile(rb'"usage"\s*:\s*\{')
_STRING_OR_BRACE = re.compile(rb'"(?:[^"\\]|\\.)*"|[{}]')
_USAGE_MAX_BYTES = 16 * 1024
_USAGE_TRIES = 8
_OBJECT = msgspec.json.Decoder(dict[str, msgspec.Raw])
# A JSON number that is not negative.
_NUMBER = re.compile(rb"(\d+(?:\.\d+)?)(?:[eE]([+-]?)\d+)?")


@dataclass
class RequestRecord:
    request_id: str
    method: str
    path: str
    route: str
    started: float = field(default_factory=time.perf_counter)
    key_id: str | None = None
    # The key's configured name (GATEWAY_CONFIG keys), else None: logs and metrics use it.
    key_name: str | None = None
    model: str | None = None
    # Where it went: the provider and the provider's own model name of the attempt that
    # answered (or the last one tried), and why each earlier attempt failed.
    provider: str | None = None
    upstream_model: str | None = None
    attempts: list[str] = field(default_factory=list)
    # Estimated tokens of attempts the request fell back from after the provider had it
    # whole (a non-streamed read timeout): the provider may have generated; the key pays.
    abandoned_tokens: int = 0
    # The gateway added stream_options.include_usage: the usage chunk (and the "usage": null
    # of other chunks) is the gateway's, removed from what the client receives.
    inject_usage: bool = False
    # The usage was estimated (the provider reported none, e.g. an aborted stream).
    usage_estimated: bool = False
    stream: bool = False
    # The answer is an event stream being relayed (counted in gateway_streams_in_flight).
    event_stream: bool = False
    status: int = 0
    upstream_status: int | None = None
    upstream_request_id: str | None = None
    ttfb: float | None = None
    usage: dict[str, int] | None = None
    upstream_error: str | None = None
    client_disconnected: bool = False
    # The output limit the gateway sends when the request set none (a budgeted key's
    # reservation assumed it: without it the provider could generate past the budget).
    output_cap: int | None = None
    # The stream's end mark was relayed (finish_reason, message_delta, response.completed):
    # a client leaving before it left mid-answer.
    answer_complete: bool = False
    # --- per-key accounting (gateway/policy) ---
    # Sizes an estimate is made of when the provider reports no usage: the request body,
    # and the answer text relayed (a stream's content deltas).
    prompt_bytes: int = 0
    # The prompt's estimate when the provider reports none (media parts at flat rates:
    # gateway.policy.estimate); None: a token per 4 bytes of the body.
    prompt_estimate: int | None = None
    completion_bytes: int = 0
    # The answer's cost in nano-units of `currency` (gateway.policy.prices); None: no price.
    cost: int | None = None
    currency: str = ""
    team: str | None = None  # the key's team, if it has one
    # Run once the answer has ended, before it is logged and counted (settles token budgets).
    on_complete: list[Callable[[RequestRecord], None]] = field(default_factory=list)

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def note_usage(self, body: bytes) -> None:
        """Keep token counts if `body` (a JSON answer or an SSE chunk) reports them.

        Counts add up across events: a Messages stream gives its input tokens in
        `message_start` and its output tokens in `message_delta`."""
        usage = usage_in(body)
        if usage:
            self.set_usage(usage)

    def set_usage(self, usage: Mapping[str, int]) -> None:
        counts = dict(self.usage or {})
        for name, value in usage.items():
            if (ours := _NAMES.get(name)) is not None and isinstance(value, int):
                counts[ours] = max(0, min(value, MAX_REPORTED_TOKENS))
        self.usage = counts


def usage_in(body: bytes) -> dict[str, int] | None:
    """The counts of the answer's usage object in `body`, in the gateway's names.

    A whole JSON answer or event is read by its structure: the top-level `usage`, or that
    of its `response` (Responses events) or `message` (Messages' message_start), so that a
    `usage` member elsewhere (echoed metadata, a tool schema) is never taken for it. A part
    of an answer (the tail of a long one) falls back to the last `"usage": {...}` object.
    Only the usage object is decoded, its own members read (not the `*_details` inside it),
    whatever form their numbers take.
    """
    payload = _data_of(body)
    if payload[:1] == b"{":
        try:
            envelope = _ENVELOPE.decode(payload)
        except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
            pass
        else:
            raw = envelope.usage
            for inner in (envelope.response, envelope.message):
                if not raw and inner is not None:
                    raw = inner.usage
            text = bytes(raw)
            return _usage_at(b'"usage":' + text, 0) if text[:1] == b"{" else None
    at = len(body)
    for _ in range(_USAGE_TRIES):  # the last few "usage" strings: one is the member
        at = body.rfind(b'"usage"', 0, at)
        if at < 0:
            return None
        if (found := _usage_at(body, at)) is not None:
            return found
    return None


class _Inner(msgspec.Struct):
    usage: msgspec.Raw = msgspec.Raw()


class _Envelope(msgspec.Struct):
    usage: msgspec.Raw = msgspec.Raw()
    response: _Inner | None = None
    message: _Inner | None = None


_ENVELOPE = msgspec.json.Decoder(_Envelope)


def _data_of(body: bytes) -> bytes:
    """An SSE event's one `data:` payload, or `body` itself when it is not such an event."""
    body = body.strip()
    if body[:6] == b"event:" and (at := body.find(b"\ndata:")) > 0:
        body = body[at + 1 :]
    if body[:5] == b"data:" and b"\n" not in body:
        return body[5:].strip()
    return body


def _usage_at(body: bytes, at: int) -> dict[str, int] | None:
    member = _USAGE_MEMBER.match(body, at)
    if member is None:
        return None
    start, depth = member.end() - 1, 0
    for part in _STRING_OR_BRACE.finditer(body, start, start + _USAGE_MAX_BYTES):
        depth += {b"{": 1, b"}": -1}.get(part[0], 0)
        if depth == 0:
            break
    else:
        return None  # unterminated, or longer than any usage object
    try:
        fields = _OBJECT.decode(body[start : part.end()])
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    return _counts(fields)


def _counts(fields: Mapping[str, msgspec.Raw]) -> dict[str, int] | None:
    """The counts of a usage object's members, in the gateway's names."""
    found: dict[str, int] = {}
    cached = 0
    for name, raw in fields.items():
        if name in _CACHE_DETAILS:
            if (hits := _cached_in(bytes(raw))) is not None:
                found["cached_tokens"] = hits
            continue
        if (count := count_of(bytes(raw))) is None:
            continue
        if (ours := _NAMES.get(name)) is not None and ours != "cached_tokens":
            found[ours] = count
        elif name in _ADDED_TO_PROMPT:
            cached += count
            if name == "cache_read_input_tokens":
                found["cached_tokens"] = count
    if cached and "prompt_tokens" in found:
        found["prompt_tokens"] = min(MAX_REPORTED_TOKENS, found["prompt_tokens"] + cached)
    return found or None


def _cached_in(details: bytes) -> int | None:
    """`cached_tokens` of a `*_tokens_details` object, if it gives one."""
    try:
        fields = _OBJECT.decode(details)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    raw = fields.get("cached_tokens")
    return count_of(bytes(raw)) if raw is not None else None


def count_of(number: bytes) -> int | None:
    """A JSON number as a whole count: `1.2e3` and `1200.0` are 1200, a fraction is
    rounded up, the value capped at MAX_REPORTED_TOKENS; None if not a number >= 0."""
    if (found := _NUMBER.fullmatch(number)) is None:
        return None
    try:  # Decimal: exact, and a 5,000-digit number is no error
        value = Decimal(number.decode())
    except InvalidOperation:  # an exponent past Decimal's range: tiny or huge
        tiny = found[2] == b"-" or not found[1].strip(b"0.")
        return (1 if found[1].strip(b"0.") else 0) if tiny else MAX_REPORTED_TOKENS
    return MAX_REPORTED_TOKENS if value >= MAX_REPORTED_TOKENS else math.ceil(value)
