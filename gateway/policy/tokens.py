"""Token counters per key and window, in the same storage as the request limits.

Each key has three fixed windows aligned to the clock in UTC: this minute (`tpm`), this day
and this month (the quotas). A request first *reserves* its estimated tokens in all three,
atomically and only if none is already at its limit (so a key that is over gets 429 without
an upstream call); when its answer ends the reservation is released and the real tokens are
charged to the windows current at that moment. Requests in flight therefore count with their
estimate, and a request admitted just before a window fills is allowed to finish: whatever it
uses beyond the limit is charged too. A reservation also has a deadline (`hold_seconds`):
one whose request never settles it (a killed worker) is released then (see counters.py).

With redis:// a Lua script does each step, so every worker and replica shares one exact
count; with memory:// a SQLite file does (sqlite_counters.py), shared by the workers of the
host and kept across reloads and restarts (or, given no file, a lock in this process). A
storage outage costs the limits, never an answer: the counts are held in this process's
memory meanwhile, the storage is retried with a backoff of up to 32 s, and each change of
state is one log line. A reservation is released where it was made: one held in memory
during an outage never lowers the storage's counts, and one held in the storage that cannot
be released during an outage is released there when the storage answers again (or at its
deadline, whichever comes first).
"""

from __future__ import annotations

import math
import secrets
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Any, Protocol

from loguru import logger

from gateway.config import ConfigError
from gateway.policy.counters import Hold, MemoryCounters, RedisCounters
from gateway.policy.keys import WINDOWS, Caller
from gateway.policy.sqlite_counters import SqliteCounters

__all__ = [
    "MemoryCounters",
    "RedisCounters",
    "Reservation",
    "TokenBudget",
    "budget_windows_at",
    "windows_at",
]

_PREFIX = "ai-gateway:tokens"
# How long a reservation may stay unsettled: the longest non-streamed answer (the default
# UPSTREAM_TOTAL_TIMEOUT). A stream that outlives it is still charged in full at its end.
DEFAULT_HOLD_SECONDS = 900.0
_MAX_BACKOFF = 32.0
# Reservations held in the storage and not yet released there, during an outage.
_MAX_PENDING_RELEASES = 10_000


@dataclass(frozen=True)
class Window:
    name: str  # minute, day or month
    id: str  # e.g. "minute:29431120", "day:20261202", "month:202612"
    resets_at: float  # Unix time of the window's end


def windows_at(now: float) -> tuple[Window, Window, Window]:
    return _windows_of_minute(int(now // 60))


@lru_cache(maxsize=4)
def _windows_of_minute(minute: int) -> tuple[Window, Window, Window]:
    # Every request asks, and the answer changes once a minute.
    now = minute * 60.0
    start = datetime.fromtimestamp(now, UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    next_month = (start.replace(day=1) + timedelta(days=32)).replace(day=1)
    return (
        Window("minute", f"minute:{minute}", (minute + 1) * 60.0),
        Window("day", f"day:{start:%Y%m%d}", (start + timedelta(days=1)).timestamp()),
        Window("month", f"month:{start:%Y%m}", next_month.timestamp()),
    )


def budget_windows_at(now: float) -> tuple[Window, Window, Window]:
    """The money windows: this UTC day, this UTC month, and all time."""
    _, day, month = windows_at(now)
    return day, month, _ALL_TIME


_ALL_TIME = Window("total", "total:all", math.inf)


def _scope(caller: Caller) -> str:
    # The {hash tag} keeps counters in one Redis Cluster slot, as Lua needs: a key's own,
    # or, for a key in a team, the team's (a request holds both in one step).
    if caller.team is not None:
        return f"{{{caller.team.key_id}}}{caller.key_id}"
    return f"{{{caller.key_id}}}"


def _keys(caller: Caller, windows: Sequence[Window]) -> list[str]:
    return [f"{_PREFIX}:{_scope(caller)}:{w.id}" for w in windows]


def _money_keys(caller: Caller, windows: Sequence[Window]) -> list[str]:
    return [f"{_PREFIX}:{_scope(caller)}:cost-{w.id}" for w in windows]


@dataclass(frozen=True)
class Slot:
    """One counter a request is held in: whose (a key or its team), of what, which window."""

    owner: Caller
    unit: str  # "tokens" or "cost" (nano-units)
    window: Window
    key: str
    limit: int  # as the counters take it: negative for money (see counters.fits)

    @property
    def team(self) -> bool:
        return self.owner.key_id.startswith("team:")


def _slots(caller: Caller, now: float) -> list[Slot]:
    """The key's token windows first, then its team's, then the key's and team's money
    windows: only those some limit applies to (the key's token windows always)."""
    windows, money = windows_at(now), budget_windows_at(now)
    owners = [caller] if caller.team is None else [caller, caller.team]
    slots = [
        Slot(caller, "tokens", w, k, caller.token_limit(w.name))
        for w, k in zip(windows, _keys(caller, windows), strict=True)
    ]
    team = caller.team
    if team is not None and any(team.token_limit(w.name) for w in windows):
        keys = _keys(team, windows)
        slots += [
            Slot(team, "tokens", w, k, team.token_limit(w.name))
            for w, k in zip(windows, keys, strict=True)
        ]
    for owner in owners:
        if any(owner.budget(w.name) for w in money):
            keys = _money_keys(owner, money)
            slots += [
                Slot(owner, "cost", w, k, -owner.budget(w.name))
                for w, k in zip(money, keys, strict=True)
            ]
    return slots


@dataclass(frozen=True)
class Reservation:
    """What `reserve` found: the counts after it, and the window that was full, if any."""

    caller: Caller
    windows: tuple[Window, Window, Window]
    used: tuple[int, int, int]  # per window, this reservation included when admitted
    reserved: int
    full: str | None = None  # the window at its limit: nothing was reserved
    # The counters that hold it (the storage, or this process's memory during an outage).
    held_in: _Counters | None = field(default=None, compare=False, repr=False)
    hold: Hold | None = field(default=None, compare=False, repr=False)
    # Every counter it is held in, their counts after it, and the one that was full.
    slots: tuple[Slot, ...] = field(default=(), compare=False, repr=False)
    values: tuple[int, ...] = field(default=(), compare=False, repr=False)
    full_slot: Slot | None = field(default=None, compare=False, repr=False)
    money: int = 0  # nano-units held

    def remaining(self, window: str) -> int | None:
        limit = self.caller.token_limit(window)
        return max(0, limit - self.used[WINDOWS.index(window)]) if limit else None


class _Counters(Protocol):
    """`hold` names the windows it is held in; settle releases it (if still held) and
    charges `cost` to `charged_to`."""

    def reserve(self, hold: Hold, limits: list[int], now: float) -> list[int]: ...
    def settle(self, hold: Hold | None, charges: list[tuple[str, int]], now: float) -> None: ...
    def read(self, keys: list[str], now: float) -> list[int]: ...


class TokenBudget:
    """The token windows of every key: reserve before a call, settle after, read for reports."""

    def __init__(
        self,
        storage_uri: str,
        store_file: str | None = None,
        hold_seconds: float = DEFAULT_HOLD_SECONDS,
        report_every_key: bool = True,
    ) -> None:
        """`store_file`: the SQLite file of memory:// (None: this process's memory);
        `hold_seconds`: how long a reservation may stay unsettled; `report_every_key`:
        count the tokens of keys without any limit too (for /v1/usage), else only of those
        with one (a storage step per request saved, a Redis round trip)."""
        self._report_every_key = report_every_key
        self._memory = MemoryCounters()
        self._primary: _Counters = self._memory
        if storage_uri.startswith("redis"):
            self._primary = RedisCounters(storage_uri)
        elif store_file:
            try:
                self._primary = SqliteCounters(store_file)
            except (OSError, sqlite3.Error) as exc:  # refused at start-up, in one line
                raise ConfigError(f"TOKEN_STORE_FILE {store_file}: {exc}") from None
        self._hold_seconds = hold_seconds
        self._lock = threading.Lock()
        self._down_since: float | None = None
        self._retry_at = 0.0
        self._backoff = 1.0
        self._pending: deque[Hold] = deque(maxlen=_MAX_PENDING_RELEASES)

    @property
    def up(self) -> bool:
        return self._down_since is None

    def reserve(
        self, caller: Caller, cost: int, now: float | None = None, money: int = 0
    ) -> Reservation:
        """Hold `cost` tokens (and `money` nano-units) in every window of the key and its
        team, in one atomic step, unless one of them cannot take it."""
        now = time.time() if now is None else now
        windows = windows_at(now)
        slots = _slots(caller, now)
        limits = [slot.limit for slot in slots]
        if not any(limits):
            # Nothing to hold against: the answer's tokens are only charged (for reports)
            # when it ends. One storage step per request instead of two.
            return Reservation(caller, windows, (0, 0, 0), 0)
        cost, money = max(0, cost), max(0, money)
        amounts = tuple(cost if slot.unit == "tokens" else money for slot in slots)
        keys = tuple(slot.key for slot in slots)
        hold = Hold(secrets.token_hex(8), keys, amounts, now + self._hold_seconds)
        found, held_in = self._call("reserve", hold, limits, now)
        full_slot = slots[found[0] - 1] if found[0] else None
        full = full_slot.window.name if full_slot is not None else None
        used = (found[1], found[2], found[3])
        if full:
            hold = replace(hold, amounts=tuple(0 for _ in amounts))
            cost = money = 0
        return Reservation(
            caller,
            windows,
            used,
            cost,
            full,
            held_in,
            hold,
            tuple(slots),
            tuple(found[1:]),
            full_slot,
            money,
        )

    def settle(
        self, reservation: Reservation, cost: int, now: float | None = None, money: int = 0
    ) -> None:
        """Release `reservation` and charge `cost` tokens (and `money` nano-units) to the
        windows of the key and its team current now."""
        if reservation.hold is None and not money and not self._report_every_key:
            return  # nothing held, no limit to count against, nobody to report to
        now = time.time() if now is None else now
        charges = _charges(reservation.caller, max(0, cost), max(0, money), now)
        hold = reservation.hold if reservation.hold is not None and reservation.hold.held else None
        if hold is not None and reservation.held_in is self._memory is not self._primary:
            self._memory.settle(hold, [], now)  # made during an outage: freed here
            hold = None
        # Memory answering means the storage is down: nothing of this is held in memory.
        offline = (None, charges, now)
        _, used = self._call("settle", hold, charges, now, offline=offline)
        if hold is not None and used is not self._primary:
            with self._lock:  # the storage holds it but did not answer: free it there later
                self._pending.append(hold)

    def read(self, callers: Sequence[Caller], now: float | None = None) -> list[list[int]]:
        """Each caller's (or team's) tokens used this minute, day and month."""
        now = time.time() if now is None else now
        keys = [k for caller in callers for k in _keys(caller, windows_at(now))]
        values = self._call("read", keys, now)[0] if keys else []
        return [values[i : i + 3] for i in range(0, len(values), 3)]

    def read_spend(self, callers: Sequence[Caller], now: float | None = None) -> list[list[int]]:
        """Each caller's (or team's) money spent this day, month and in all (nano-units)."""
        now = time.time() if now is None else now
        keys = [k for caller in callers for k in _money_keys(caller, budget_windows_at(now))]
        values = self._call("read", keys, now)[0] if keys else []
        return [values[i : i + 3] for i in range(0, len(values), 3)]

    def _call(
        self, method: str, *args: Any, offline: tuple[Any, ...] | None = None
    ) -> tuple[Any, _Counters]:
        """`method` on the storage, else on this process's memory (with `offline` for
        arguments, if given); and which one answered."""
        counters = self._counters()
        if counters is not self._primary and offline is not None:
            args = offline
        try:
            if counters is self._primary and self._pending:
                self._release_pending()
            result = getattr(counters, method)(*args)
        except Exception as exc:  # any storage failure: fail open, held per process
            if counters is self._memory:
                raise
            self._went_down(exc)
            return getattr(self._memory, method)(*(offline or args)), self._memory
        if self._down_since is not None and counters is self._primary:
            self._came_back()
        return result, counters

    def _release_pending(self) -> None:
        """Free in the storage the reservations an outage kept it from freeing."""
        with self._lock:
            pending, self._pending = self._pending, deque(maxlen=_MAX_PENDING_RELEASES)
        while pending:
            hold = pending[0]
            try:
                self._primary.settle(hold, [], time.time())  # nothing charged
            except Exception:
                with self._lock:  # still unreachable: kept for the next attempt
                    self._pending.extendleft(reversed(pending))
                raise
            pending.popleft()

    def _counters(self) -> _Counters:
        if self._down_since is None or time.monotonic() >= self._retry_at:
            return self._primary
        return self._memory

    def _went_down(self, exc: Exception) -> None:
        with self._lock:
            if self._down_since is None:
                self._down_since = time.monotonic()
                logger.warning(
                    "token limit storage unreachable ({}): token limits held per process",
                    type(exc).__name__,
                )
            else:
                self._backoff = min(_MAX_BACKOFF, self._backoff * 2)
            self._retry_at = time.monotonic() + self._backoff

    def _came_back(self) -> None:
        with self._lock:
            if self._down_since is not None:
                self._down_since, self._backoff = None, 1.0
                logger.warning("token limit storage reachable again")


def _charges(caller: Caller, cost: int, money: int, now: float) -> list[tuple[str, int]]:
    """What an answer adds: its tokens and money to the key's windows and its team's."""
    owners = [caller] if caller.team is None else [caller, caller.team]
    charges: list[tuple[str, int]] = []
    for owner in owners:
        charges += [(k, cost) for k in _keys(owner, windows_at(now))]
    for owner in owners if money else ():
        charges += [(k, money) for k in _money_keys(owner, budget_windows_at(now))]
    return charges
