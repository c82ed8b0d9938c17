"""The facts of one request, filled in as it goes and logged once at the end.

A plain object rather than `flask.g`: a streamed body is sent after the request context is
gone, and the stream still has to record its first byte, its usage and its errors.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

_TOKEN_FIELDS = re.compile(
    rb'"(prompt_tokens|completion_tokens|total_tokens|input_tokens|output_tokens)"\s*:\s*(\d+)'
)
# Messages and Responses name them otherwise; the gateway counts in Chat Completions' names.
_NAMES = {
    "input_tokens": "prompt_tokens",
    "output_tokens": "completion_tokens",
    "prompt_tokens": "prompt_tokens",
    "completion_tokens": "completion_tokens",
    "total_tokens": "total_tokens",
}
# A provider's count above this is not believed (it would overflow Redis's counters).
MAX_REPORTED_TOKENS = 100_000_000


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
    # --- per-key accounting (gateway/policy) ---
    # Sizes an estimate is made of when the provider reports no usage: the request body,
    # and the answer text relayed (a stream's content deltas).
    prompt_bytes: int = 0
    completion_bytes: int = 0
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
    # A regex over the bytes after the last "usage" key, not a full JSON parse: a large
    # embeddings answer is relayed untouched and should not be decoded just to be logged.
    at = body.rfind(b'"usage"')
    if at < 0:
        return None
    found: dict[str, int] = {}
    for name, value in _TOKEN_FIELDS.findall(body, at, at + 600):
        # The first of each: a Responses usage's details come after its counts.
        found.setdefault(_NAMES[name.decode()], _count(value))
    return found or None


def _count(digits: bytes) -> int:
    # Capped before int(): a provider's 5,000-digit number would raise ValueError.
    return MAX_REPORTED_TOKENS if len(digits) > 9 else min(int(digits), MAX_REPORTED_TOKENS)
