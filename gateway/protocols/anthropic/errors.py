"""Anthropic's error shape, for the gateway's own errors and for providers' translated ones."""

from __future__ import annotations

import re
from typing import Any

import orjson

from gateway.protocols.common import sse

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    402: "billing_error",
    429: "rate_limit_error",
    503: "overloaded_error",
    504: "timeout_error",
    529: "overloaded_error",
}
_MESSAGE_MAX = 2000

# A provider's context-length refusals, with the numbers Claude Code needs to retry with a
# smaller max_tokens. Each pattern yields some of: input (X), max_tokens (Y), limit (Z).
_BOTH = (
    # OpenAI, older vLLM: "...maximum context length is 8192 tokens. However, you requested
    # 9000 tokens (5000 in the messages, 4000 in the completion)."
    re.compile(
        r"maximum context length is (?P<Z>\d+) tokens.*?\((?P<X>\d+) in (?:the messages|your "
        r"prompt)[;,] (?P<Y>\d+) (?:in|for) the completion\)",
        re.S,
    ),
    # vLLM: "'max_tokens' or 'max_completion_tokens' is too large: 4000. This model's maximum
    # context length is 4096 tokens and your request has 1000 input tokens (...)"
    re.compile(
        r"too large: (?P<Y>\d+)\..*?maximum context length is (?P<Z>\d+) tokens and your "
        r"request has (?P<X>\d+) input tokens",
        re.S,
    ),
)
_PROMPT = (
    # vLLM: "...maximum context length is 32768 tokens. However, your request has 40000 input
    # tokens." and "However, you requested 40000 tokens in the messages"
    re.compile(
        r"maximum context length is (?P<Z>\d+) tokens.*?(?:has|requested) (?P<X>\d+) "
        r"(?:input )?tokens",
        re.S,
    ),
    # DashScope: "Range of input length should be [1, 129024]" (no input count given).
    re.compile(r"Range of input length should be \[1, ?(?P<Z>\d+)\]"),
)
_COMPLETION = (
    # OpenAI: "max_tokens is too large: 64000. This model supports at most 16384 completion
    # tokens"; DashScope: "Range of max_tokens should be [1, 8192]"; DeepSeek: "the valid
    # range of max_tokens is [1, 8192]"; others: "max_tokens must be less than or equal to".
    re.compile(
        r"max_(?:completion_)?tokens.*?(?:at most|less than or equal to|\[1,)\s*`?(?P<Z>\d+)",
        re.S,
    ),
)
_TOO_LARGE = re.compile(r"too large: (\d+)")


def error_type(status: int) -> str:
    if status in _TYPES:
        return _TYPES[status]
    return "invalid_request_error" if 400 <= status < 500 else "api_error"


def error_body(status: int, message: str) -> bytes:
    """`{"type": "error", "error": {"type", "message"}}`, the type chosen by `status`."""
    error = {"type": error_type(status), "message": message}
    return orjson.dumps({"type": "error", "error": error})


def error_event(status: int, message: str) -> bytes:
    """The SSE `error` event for a stream that broke off after its first byte."""
    error = {"type": error_type(status), "message": message}
    return sse("error", {"type": "error", "error": error})


def error_from_chat(
    status: int,
    body: bytes,
    *,
    max_tokens: int | None = None,
    input_estimate: int | None = None,
) -> bytes:
    """A provider's error body (OpenAI-shaped or not) as Anthropic's, context-length refusals
    in Anthropic's own wording: "input length and `max_tokens` exceed context limit: X + Y > Z"
    is what Claude Code recovers from by itself, retrying with a smaller max_tokens."""
    message = provider_message(status, body)
    context = context_message(message, max_tokens=max_tokens, input_estimate=input_estimate)
    if context is not None:
        return orjson.dumps(
            {"type": "error", "error": {"type": "invalid_request_error", "message": context}}
        )
    return error_body(status, message)


def provider_message(status: int, body: bytes) -> str:
    """The human message in an error body, whatever its shape; the body's text otherwise."""
    try:
        parsed: Any = orjson.loads(body)
    except orjson.JSONDecodeError:
        parsed = None
    message: Any = None
    if isinstance(parsed, dict):
        error = parsed.get("error")
        message = error.get("message") if isinstance(error, dict) else error
        message = message or parsed.get("message") or parsed.get("detail")
    if not isinstance(message, str):
        message = body.decode("utf-8", "replace").strip() if parsed is None else None
    if not message:
        return f"The provider answered HTTP {status}."
    return message[:_MESSAGE_MAX]


def context_message(
    message: str, *, max_tokens: int | None = None, input_estimate: int | None = None
) -> str | None:
    """Anthropic's wording for a context-length refusal, or None if `message` is not one."""
    if "context" not in message and "length" not in message and "max_" not in message:
        return None
    for pattern in _BOTH:
        found = pattern.search(message)
        if found:
            return _exceeds(int(found["X"]), int(found["Y"]), int(found["Z"]))
    for pattern in _PROMPT:
        found = pattern.search(message)
        if found:
            limit = int(found["Z"])
            given = found.groupdict().get("X")
            tokens = int(given) if given else max(input_estimate or 0, limit + 1)
            return f"prompt is too long: {tokens} tokens > {limit} maximum"
    for pattern in _COMPLETION:
        found = pattern.search(message)
        if found:
            asked = _TOO_LARGE.search(message)
            wanted = int(asked[1]) if asked else max_tokens
            if wanted is not None and wanted > int(found["Z"]):
                # The limit is the completion's alone: "0 + Y > Z" makes Claude Code retry
                # with max_tokens just under Z, which is exactly what the provider accepts.
                return _exceeds(0, wanted, int(found["Z"]))
    return None


def _exceeds(prompt: int, completion: int, limit: int) -> str:
    return f"input length and `max_tokens` exceed context limit: {prompt} + {completion} > {limit}"
