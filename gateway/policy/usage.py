"""What an answer costs: the usage the provider reported, or an estimate when it sent none.

A provider reports usage in a JSON answer's `usage` and, when asked, in a stream's last
chunk. When it reports none (an aborted stream, a client that left, a provider that ignores
`stream_options`), the prompt is estimated at a token per 4 bytes of the request body and
the completion at a token per 4 bytes of the answer text relayed, and the record says so.
"""

from __future__ import annotations

import math

from gateway.record import MAX_REPORTED_TOKENS, RequestRecord

# Where the provider's work is known to have started: the request reached it.
_STARTED_ERRORS = frozenset({"stream_broken", "timeout", "too_large"})


def tokens_for(body_bytes: int) -> int:
    return math.ceil(body_bytes / 4)


def reservation(body_bytes: int, max_tokens: int | None, choices: int = 1) -> int:
    """What a request holds while in flight: its estimated prompt plus its worst case."""
    return tokens_for(body_bytes) + worst_output(max_tokens, choices)


def worst_output(max_tokens: int | None, choices: int = 1) -> int:
    """The most a request may generate: `max_tokens` for each of its `n` (or `best_of`)
    choices, capped (a provider's own limit is far below it)."""
    return min(MAX_REPORTED_TOKENS, max(1, choices) * max(0, max_tokens or 0))


def charge(usage: dict[str, int]) -> int:
    """The tokens to charge for reported `usage`, however odd its numbers."""
    parts = usage.get("prompt_tokens", 0) + usage.get("completion_tokens", 0)
    return min(MAX_REPORTED_TOKENS, max(parts, usage.get("total_tokens", 0)))


def settle_usage(record: RequestRecord) -> int:
    """Fill in `record.usage` (estimated if the provider reported none); return its cost,
    with the attempts abandoned after the provider had the request (record.attempts)."""
    return _answer_cost(record) + min(record.abandoned_tokens, MAX_REPORTED_TOKENS)


def _answer_cost(record: RequestRecord) -> int:
    stream_left_mid_answer = record.event_stream and record.client_disconnected
    if record.usage and stream_left_mid_answer and not record.answer_complete:
        _at_least_what_was_relayed(record)
    if record.usage:
        # One number: the access line's total is what the key pays (without a total, the
        # parts it shows add up to it).
        cost = charge(record.usage)
        if "total_tokens" in record.usage:
            record.usage = {**record.usage, "total_tokens": cost}
        return cost
    if not _provider_worked(record):
        return 0
    prompt = (
        record.prompt_estimate
        if record.prompt_estimate is not None
        else tokens_for(record.prompt_bytes)
    )
    completion = tokens_for(record.completion_bytes)
    record.usage = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }
    record.usage_estimated = True
    return prompt + completion


def _at_least_what_was_relayed(record: RequestRecord) -> None:
    """A stream left mid-answer whose provider reported only a start (Messages' message_start
    says output_tokens: 1): its completion is at least what was relayed."""
    assert record.usage is not None
    relayed = tokens_for(record.completion_bytes)
    if relayed > record.usage.get("completion_tokens", 0):
        usage = {**record.usage, "completion_tokens": relayed}
        usage.pop("total_tokens", None)
        record.usage = usage
        record.usage_estimated = True


def _provider_worked(record: RequestRecord) -> bool:
    """Whether the provider (probably) spent tokens: it answered 2xx, broke off mid-answer,
    or the client left once the request could have reached it."""
    status = record.upstream_status
    if status is not None and 200 <= status < 300:
        return True
    if record.upstream_error in _STARTED_ERRORS:
        return True
    return record.client_disconnected and (status is None or status < 400)
