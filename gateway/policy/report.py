"""What each key has used, from the token counters: the usage API and the quota gauges.

Both read the same storage the limits use, so every worker and replica reports the same
numbers. Counts include the reservations of requests still in flight.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gateway.policy.keys import WINDOWS, Caller, KeyRing
from gateway.policy.tokens import TokenBudget, windows_at


def usage_report(budget: TokenBudget, keys: KeyRing, now: float | None = None) -> dict[str, Any]:
    now = time.time() if now is None else now
    callers = keys.callers
    windows = windows_at(now)
    rows = []
    for caller, used in zip(callers, budget.read(callers, now), strict=True):
        row: dict[str, Any] = {"key": caller.label, "key_id": caller.key_id, "name": caller.name}
        for window, tokens in zip(windows, used, strict=True):
            limit = caller.token_limit(window.name) or None
            row[window.name] = {
                "tokens": tokens,
                "limit": limit,
                "remaining": None if limit is None else max(0, limit - tokens),
                "resets_at": _iso(window.resets_at),
            }
        rows.append(row)
    return {"object": "usage", "at": _iso(now), "storage_up": budget.up, "keys": rows}


def _iso(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class QuotaGauges(Collector):
    """`gateway_key_quota_used_tokens` and `_limit_tokens` by key and window, read at scrape.

    Only keys with a day or month quota, and of those only the windows they have used
    tokens in: series grow with the keys in use, not the keys configured (2,000 configured
    keys once made every scrape 377 KB). A key's other usage is in `gateway_tokens_total`
    and /v1/usage; a quota nobody touched is nowhere near being exhausted.
    """

    def __init__(self, budget: TokenBudget, keys: KeyRing) -> None:
        self._budget = budget
        self._callers: tuple[Caller, ...] = tuple(
            c for c in keys.callers if any(c.token_limit(w) for w in WINDOWS[1:])
        )

    def describe(self) -> Iterator[Metric]:
        # Without it the registry would collect (query the storage) when registering.
        yield from self._families()

    def collect(self) -> Iterator[Metric]:
        used, limits = self._families()
        counted = self._budget.read(self._callers) if self._callers else []
        for caller, counts in zip(self._callers, counted, strict=True):
            for window, tokens in zip(WINDOWS[1:], counts[1:], strict=True):
                limit = caller.token_limit(window)
                if limit and tokens:
                    used.add_metric([caller.label, window], tokens)
                    limits.add_metric([caller.label, window], limit)
        yield used
        yield limits

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, GaugeMetricFamily]:
        return (
            GaugeMetricFamily(
                "gateway_key_quota_used_tokens",
                "Tokens used by a key in the current UTC day or month",
                labels=["key", "window"],
            ),
            GaugeMetricFamily(
                "gateway_key_quota_limit_tokens",
                "A key's token quota for the day or month",
                labels=["key", "window"],
            ),
        )
