"""Token counters per key and window, in the same storage as the request limits.

Each key has three fixed windows aligned to the clock in UTC: this minute (`tpm`), this day
and this month (the quotas). A request first *reserves* its estimated tokens in all three,
atomically and only if none is already at its limit (so a key that is over gets 429 without
an upstream call); when its answer ends the reservation is released and the real tokens are
charged to the windows current at that moment. Requests in flight therefore count with their
estimate, and a request admitted just before a window fills is allowed to finish: whatever it
uses beyond the limit is charged too.

With redis:// a Lua script does each step, so every worker and replica shares one exact
count; with memory:// a lock does, in one process. A storage outage costs the limits, never
an answer: the counts are held in this process's memory meanwhile, the storage is retried
with a backoff of up to 32 s, and each change of state is one log line. A reservation is
released where it was made: one held in memory during an outage never lowers the storage's
counts, and one held in the storage that cannot be released during an outage is released
there when the storage answers again (else it would eat the day and month until they end).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from limits.storage import storage_from_string
from loguru import logger

from gateway.policy.keys import WINDOWS, Caller

_PREFIX = "ai-gateway:tokens"
_TTL = {"minute": 120, "day": 2 * 86400, "month": 33 * 86400}
_MAX_BACKOFF = 32.0
# Reservations held in the storage and not yet released there, during an outage.
_MAX_PENDING_RELEASES = 10_000


@dataclass(frozen=True)
class Window:
    name: str  # minute, day or month
    id: str  # e.g. "minute:29431120", "day:20261202", "month:202612"
    resets_at: float  # Unix time of the window's end


def windows_at(now: float) -> tuple[Window, Window, Window]:
    minute = int(now // 60)
    start = datetime.fromtimestamp(now, UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    next_month = (start.replace(day=1) + timedelta(days=32)).replace(day=1)
    return (
        Window("minute", f"minute:{minute}", (minute + 1) * 60.0),
        Window("day", f"day:{start:%Y%m%d}", (start + timedelta(days=1)).timestamp()),
        Window("month", f"month:{start:%Y%m}", next_month.timestamp()),
    )


def _keys(caller: Caller, windows: Sequence[Window]) -> list[str]:
    # The {hash tag} keeps a key's counters in one Redis Cluster slot, as Lua needs.
    return [f"{_PREFIX}:{{{caller.key_id}}}:{w.id}" for w in windows]


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

    def remaining(self, window: str) -> int | None:
        limit = self.caller.token_limit(window)
        return max(0, limit - self.used[WINDOWS.index(window)]) if limit else None


class _Counters(Protocol):
    def reserve(self, keys: list[str], limits: list[int], cost: int) -> list[int]: ...
    def settle(self, held: list[str], reserved: int, charged_to: list[str], cost: int) -> None: ...
    def read(self, keys: list[str]) -> list[int]: ...


class TokenBudget:
    """The token windows of every key: reserve before a call, settle after, read for reports."""

    def __init__(self, storage_uri: str) -> None:
        self._memory = MemoryCounters()
        self._primary: _Counters = (
            RedisCounters(storage_uri) if storage_uri.startswith("redis") else self._memory
        )
        self._lock = threading.Lock()
        self._down_since: float | None = None
        self._retry_at = 0.0
        self._backoff = 1.0
        self._pending: deque[tuple[list[str], int]] = deque(maxlen=_MAX_PENDING_RELEASES)

    @property
    def up(self) -> bool:
        return self._down_since is None

    def reserve(self, caller: Caller, cost: int, now: float | None = None) -> Reservation:
        now = time.time() if now is None else now
        windows = windows_at(now)
        limits = [caller.token_limit(w.name) for w in windows]
        found, held_in = self._call("reserve", _keys(caller, windows), limits, max(0, cost))
        full = WINDOWS[found[0] - 1] if found[0] else None
        used = (found[1], found[2], found[3])
        return Reservation(caller, windows, used, 0 if full else max(0, cost), full, held_in)

    def settle(self, reservation: Reservation, cost: int, now: float | None = None) -> None:
        """Release `reservation` and charge `cost` tokens to the windows current now."""
        now = time.time() if now is None else now
        held = _keys(reservation.caller, reservation.windows)
        charged_to = _keys(reservation.caller, windows_at(now))
        reserved = reservation.reserved
        if reserved and reservation.held_in is self._memory is not self._primary:
            self._memory.settle(held, reserved, [], 0)  # made during an outage: freed here
            reserved = 0
        cost = max(0, cost)
        # Memory answering means the storage is down: nothing of this is held in memory.
        offline = (held, 0, charged_to, cost)
        _, used = self._call("settle", held, reserved, charged_to, cost, offline=offline)
        if reserved and used is not self._primary:
            with self._lock:  # the storage holds it but did not answer: free it there later
                self._pending.append((held, reserved))

    def read(self, callers: Sequence[Caller], now: float | None = None) -> list[list[int]]:
        """Each caller's tokens used this minute, day and month."""
        windows = windows_at(time.time() if now is None else now)
        keys = [k for caller in callers for k in _keys(caller, windows)]
        values = self._call("read", keys)[0] if keys else []
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
            held, reserved = pending[0]
            try:
                self._primary.settle(held, reserved, held, 0)  # nothing charged
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


class MemoryCounters:
    """The counters in this process, under one lock (memory://, and the fallback)."""

    SWEEP_EVERY = 1000

    def __init__(self) -> None:
        self._values: dict[str, tuple[int, float]] = {}
        self._lock = threading.Lock()
        self._operations = 0

    def reserve(self, keys: list[str], limits: list[int], cost: int) -> list[int]:
        with self._lock:
            values = [self._get(k) for k in keys]
            full = next((i + 1 for i, v in enumerate(values) if limits[i] and v >= limits[i]), 0)
            if not full and cost:
                values = [self._add(k, cost) for k in keys]
            return [full, *values]

    def settle(self, held: list[str], reserved: int, charged_to: list[str], cost: int) -> None:
        with self._lock:
            for key in held:
                if reserved and key in self._values:
                    value, expires = self._values[key]
                    self._values[key] = (max(0, value - reserved), expires)
            for key in charged_to:
                if cost:
                    self._add(key, cost)

    def read(self, keys: list[str]) -> list[int]:
        with self._lock:
            return [self._get(k) for k in keys]

    def _get(self, key: str) -> int:
        found = self._values.get(key)
        return found[0] if found is not None and found[1] > time.time() else 0

    def _add(self, key: str, amount: int) -> int:
        self._sweep()
        value = self._get(key) + amount
        expires = self._values[key][1] if key in self._values else 0.0
        if expires <= time.time():
            expires = time.time() + _TTL[key.rsplit(":", 2)[-2]]
        self._values[key] = (value, expires)
        return value

    def _sweep(self) -> None:
        self._operations += 1
        if self._operations % self.SWEEP_EVERY == 0:
            now = time.time()
            self._values = {k: v for k, v in self._values.items() if v[1] > now}


# KEYS: the three windows. ARGV: cost, then each window's limit (0: none), then its TTL.
# Returns the window that is full (1-based; 0: none) and each window's count after.
_RESERVE = """
local n = #KEYS
local cost = tonumber(ARGV[1])
local values = {}
local full = 0
for i = 1, n do
  values[i] = tonumber(redis.call('GET', KEYS[i]) or '0')
  local limit = tonumber(ARGV[1 + i])
  if full == 0 and limit > 0 and values[i] >= limit then full = i end
end
if full == 0 and cost > 0 then
  for i = 1, n do
    values[i] = redis.call('INCRBY', KEYS[i], cost)
    if redis.call('TTL', KEYS[i]) < 0 then redis.call('EXPIRE', KEYS[i], ARGV[1 + n + i]) end
  end
end
table.insert(values, 1, full)
return values
"""
# KEYS: the windows holding the reservation, then the windows to charge.
# ARGV: reserved, cost, then the TTL of each window charged.
_SETTLE = """
local n = #KEYS / 2
local reserved = tonumber(ARGV[1])
local cost = tonumber(ARGV[2])
for i = 1, n do
  if reserved > 0 and redis.call('EXISTS', KEYS[i]) == 1 then
    if redis.call('DECRBY', KEYS[i], reserved) < 0 then redis.call('SET', KEYS[i], 0, 'KEEPTTL') end
  end
end
if cost > 0 then
  for i = n + 1, 2 * n do
    redis.call('INCRBY', KEYS[i], cost)
    if redis.call('TTL', KEYS[i]) < 0 then redis.call('EXPIRE', KEYS[i], ARGV[2 + i - n]) end
  end
end
return 0
"""


class RedisCounters:
    """The counters in Redis (redis://, rediss://, sentinel, cluster), one script per step."""

    def __init__(self, uri: str) -> None:
        # Bounded timeouts, as for the request limiter: a Redis that stops answering must
        # not hold every request.
        storage: Any = storage_from_string(uri, socket_connect_timeout=1, socket_timeout=1)
        connection = storage.get_connection()
        self._connection = connection
        self._reserve = connection.register_script(_RESERVE)
        self._settle = connection.register_script(_SETTLE)

    def reserve(self, keys: list[str], limits: list[int], cost: int) -> list[int]:
        ttls = [_TTL[k.rsplit(":", 2)[-2]] for k in keys]
        return [int(v) for v in self._reserve(keys=keys, args=[cost, *limits, *ttls])]

    def settle(self, held: list[str], reserved: int, charged_to: list[str], cost: int) -> None:
        ttls = [_TTL[k.rsplit(":", 2)[-2]] for k in charged_to]
        self._settle(keys=[*held, *charged_to], args=[reserved, cost, *ttls])

    def read(self, keys: list[str]) -> list[int]:
        # Several keys' counters sit in several cluster slots, which one MGET refuses; a
        # cluster client reads them slot by slot (each key's three windows share one).
        mget = getattr(self._connection, "mget_nonatomic", self._connection.mget)
        return [int(v or 0) for v in mget(keys)]
