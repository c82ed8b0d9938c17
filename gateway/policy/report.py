"""What each key and team has used, from the counters: the usage API and the gauges.

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
from gateway.policy.prices import money
from gateway.policy.tokens import TokenBudget, budget_windows_at, windows_at


def usage_report(
    budget: TokenBudget, keys: KeyRing, now: float | None = None, currency: str = "USD"
) -> dict[str, Any]:
    """Every key's and team's tokens per window and money spent per budget window (money
    as exact decimal strings in `currency`; spent includes requests in flight)."""
    now = time.time() if now is None else now
    callers = keys.callers
    rows = []
    for caller, row in zip(callers, _rows(budget, callers, now), strict=True):
        rows.append({"key": caller.label, "key_id": caller.key_id, "name": caller.name, **row})
        if caller.team is not None:
            rows[-1]["team"] = caller.team.name
    teams = list(keys.teams.values())
    team_rows = [
        {"team": team.name, **row}
        for team, row in zip(teams, _rows(budget, teams, now), strict=True)
    ]
    return {
        "object": "usage",
        "at": _iso(now),
        "storage_up": budget.up,
        "currency": currency,
        "keys": rows,
        "teams": team_rows,
    }


def _rows(
    budget: TokenBudget, owners: list[Caller] | tuple[Caller, ...], now: float
) -> list[dict[str, Any]]:
    windows, money_windows = windows_at(now), budget_windows_at(now)
    rows = []
    spent = budget.read_spend(owners, now)
    for owner, used, costs in zip(owners, budget.read(owners, now), spent, strict=True):
        row: dict[str, Any] = {}
        for window, tokens in zip(windows, used, strict=True):
            limit = owner.token_limit(window.name) or None
            row[window.name] = {
                "tokens": tokens,
                "limit": limit,
                "remaining": None if limit is None else max(0, limit - tokens),
                "resets_at": _iso(window.resets_at),
            }
        row["cost"] = {
            window.name: {
                "spent": money(nanos),
                "budget": money(owner.budget(window.name)) if owner.budget(window.name) else None,
                "resets_at": None if window.name == "total" else _iso(window.resets_at),
            }
            for window, nanos in zip(money_windows, costs, strict=True)
        }
        rows.append(row)
    return rows


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


class BudgetGauges(Collector):
    """`gateway_budget_spent` and `gateway_budget_limit` (in the prices' currency) by
    `owner` (a key's label, or `team:<name>`) and window, for keys and teams with a budget,
    read at scrape from the shared counters (requests in flight count with their
    reservation): what the 80 % and 100 % alerts divide."""

    def __init__(self, budget: TokenBudget, keys: KeyRing) -> None:
        self._budget = budget
        owners = [*keys.callers, *keys.teams.values()]
        self._owners = [o for o in owners if any(o.budget(w) for w in ("day", "month", "total"))]

    def describe(self) -> Iterator[Metric]:
        yield from self._families()

    def collect(self) -> Iterator[Metric]:
        spent, limits = self._families()
        counted = self._budget.read_spend(self._owners) if self._owners else []
        for owner, costs in zip(self._owners, counted, strict=True):
            label = owner.key_id if owner.key_id.startswith("team:") else owner.label
            for window, nanos in zip(("day", "month", "total"), costs, strict=True):
                if limit := owner.budget(window):
                    spent.add_metric([label, window], nanos / 1e9)
                    limits.add_metric([label, window], limit / 1e9)
        yield spent
        yield limits

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, GaugeMetricFamily]:
        return (
            GaugeMetricFamily(
                "gateway_budget_spent",
                "Money a key or team spent (and holds in flight) in the budget's window",
                labels=["owner", "window"],
            ),
            GaugeMetricFamily(
                "gateway_budget_limit",
                "A key's or team's budget for the window",
                labels=["owner", "window"],
            ),
        )
