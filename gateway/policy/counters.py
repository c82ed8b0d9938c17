"""Where the token and money counters live: this process's memory, or Redis (SQLite:
sqlite_counters).

Every kind keeps the same two things per key: a counter per window (settled tokens or money
plus the reservations in flight), and the reservations themselves, each with a deadline and
the amount it holds in each counter (tokens in a token window, nano-units in a money one).
A limit is checked in one of two ways: a positive limit refuses once the counter has
reached it (tokens: a request admitted below the limit may finish past it), a negative one
refuses when the counter plus what this request holds would pass -limit (money: a budget
is never promised beyond itself). Each step
(reserve, settle, read) first releases the reservations past their deadline, so one whose
request can no longer settle it (its worker was killed, or cut at the end of a reload's
drain) leaves the day and month within the deadline instead of when the window ends. A
settle releases its reservation only if it is still held: never twice.
"""

from __future__ import annotations

import heapq
import math
import threading
import time
from dataclasses import dataclass
from typing import Any

from limits.storage import storage_from_string

# 0: never expires (a budget_total).
TTL = {
    "minute": 120,
    "day": 2 * 86400,
    "month": 33 * 86400,
    "cost-day": 2 * 86400,
    "cost-month": 33 * 86400,
    "cost-total": 0,
}
# Reservations past their deadline released per step, at most (the rest at the next one).
PURGE_BATCH = 64


@dataclass(frozen=True)
class Hold:
    """One reservation in the counters: released by its settle, else at its deadline."""

    id: str
    keys: tuple[str, ...]  # the window counters that hold it
    amounts: tuple[int, ...]  # what it holds in each
    deadline: float  # Unix time

    @property
    def held(self) -> bool:
        return any(self.amounts)


def ttl_of(key: str) -> int:
    return TTL[key.rsplit(":", 2)[-2]]


def holds_key(key: str) -> str:
    """The reservations of every counter with the same {hash tag} as `key` (one Redis
    Cluster slot): a key's own, or a team's and its keys'."""
    return key[: key.index("}") + 1] + ":holds"


def fits(value: int, amount: int, limit: int) -> bool:
    """Whether a counter at `value` may take `amount` more (see the module's docstring)."""
    if limit > 0:
        return value < limit
    return limit == 0 or value + amount <= -limit


class MemoryCounters:
    """The counters in this process, under one lock (the fallback during an outage)."""

    SWEEP_EVERY = 1000

    def __init__(self) -> None:
        self._values: dict[str, tuple[int, float]] = {}
        self._holds: dict[str, Hold] = {}
        self._deadlines: list[tuple[float, str]] = []  # a heap
        self._lock = threading.Lock()
        self._operations = 0

    def reserve(self, hold: Hold, limits: list[int], now: float) -> list[int]:
        with self._lock:
            self._purge(now)
            values = [self._get(k) for k in hold.keys]
            full = first_full(values, hold.amounts, limits)
            if not full and hold.held:
                values = [self._add(k, a) for k, a in zip(hold.keys, hold.amounts, strict=True)]
                self._holds[hold.id] = hold
                heapq.heappush(self._deadlines, (hold.deadline, hold.id))
            return [full, *values]

    def settle(self, hold: Hold | None, charges: list[tuple[str, int]], now: float) -> None:
        with self._lock:
            self._purge(now)
            if hold is not None and self._holds.pop(hold.id, None) is not None:
                self._release(hold)
            for key, amount in charges:
                if amount:
                    self._add(key, amount)

    def read(self, keys: list[str], now: float) -> list[int]:
        with self._lock:
            self._purge(now)
            return [self._get(k) for k in keys]

    def _purge(self, now: float) -> None:
        while self._deadlines and self._deadlines[0][0] <= now:
            _, hold_id = heapq.heappop(self._deadlines)
            found = self._holds.pop(hold_id, None)
            if found is not None:
                self._release(found)

    def _release(self, hold: Hold) -> None:
        for key, amount in zip(hold.keys, hold.amounts, strict=True):
            if key in self._values:
                value, expires = self._values[key]
                self._values[key] = (max(0, value - amount), expires)

    def _get(self, key: str) -> int:
        found = self._values.get(key)
        return found[0] if found is not None and found[1] > time.time() else 0

    def _add(self, key: str, amount: int) -> int:
        self._sweep()
        value = self._get(key) + amount
        expires = self._values[key][1] if key in self._values else 0.0
        if expires <= time.time():
            expires = time.time() + (ttl_of(key) or math.inf)
        self._values[key] = (value, expires)
        return value

    def _sweep(self) -> None:
        self._operations += 1
        if self._operations % self.SWEEP_EVERY == 0:
            now = time.time()
            self._values = {k: v for k, v in self._values.items() if v[1] > now}
            if not self._holds:
                self._deadlines = []  # only settled ones left: nothing to release


# Releases the reservations of one hash tag past their deadline: each member of the sorted
# set KEYS[#KEYS] (score: its deadline) is "id amount counter counter ...", where a counter
# written "counter=n" holds n instead of the amount. Those counters share the hash tag (one
# cluster slot) but are not all in KEYS: an old reservation holds yesterday's day, say.
_PURGE = f"""
local function purge(holds, now)
  local dead = redis.call('ZRANGEBYSCORE', holds, '-inf', now, 'LIMIT', 0, {PURGE_BATCH})
  for _, member in ipairs(dead) do
    release(member)
    redis.call('ZREM', holds, member)
  end
end
"""
_RELEASE = """
local function release(member)
  local parts = {}
  for part in string.gmatch(member, '%S+') do parts[#parts + 1] = part end
  for i = 3, #parts do
    local key, amount = string.match(parts[i], '^(.+)=(%d+)$')
    if not key then key, amount = parts[i], parts[2] end
    if redis.call('EXISTS', key) == 1 and redis.call('DECRBY', key, amount) < 0 then
      redis.call('SET', key, 0, 'KEEPTTL')
    end
  end
end
"""
# KEYS: the windows, then the reservations of their hash tag. ARGV: now, the reservation's
# member, its deadline, the set's TTL, then per window its amount, its limit (see `fits`)
# and its TTL (0: none). Returns the window that is full (1-based; 0: none) and each
# window's count after.
_RESERVE = (
    _RELEASE
    + _PURGE
    + """
local n = #KEYS - 1
purge(KEYS[n + 1], ARGV[1])
local values = {}
local full = 0
local held = false
for i = 1, n do
  values[i] = tonumber(redis.call('GET', KEYS[i]) or '0')
  local amount = tonumber(ARGV[2 + 3 * i])
  local limit = tonumber(ARGV[3 + 3 * i])
  if amount > 0 then held = true end
  if full == 0 and limit > 0 and values[i] >= limit then full = i end
  if full == 0 and limit < 0 and values[i] + amount > -limit then full = i end
end
if full == 0 and held then
  for i = 1, n do
    local amount = tonumber(ARGV[2 + 3 * i])
    if amount > 0 then
      values[i] = redis.call('INCRBY', KEYS[i], amount)
      local ttl = tonumber(ARGV[4 + 3 * i])
      if ttl > 0 and redis.call('TTL', KEYS[i]) < 0 then redis.call('EXPIRE', KEYS[i], ttl) end
    end
  end
  redis.call('ZADD', KEYS[n + 1], ARGV[3], ARGV[2])
  redis.call('EXPIRE', KEYS[n + 1], ARGV[4])
end
table.insert(values, 1, full)
return values
"""
)
# KEYS: the windows to charge, then the reservations of their hash tag. ARGV: now, the
# reservation's member ('': none), which is released only if still held (not already
# released at its deadline): its counters are in the member; then per window the amount
# to charge and its TTL (0: none).
_SETTLE = (
    _RELEASE
    + _PURGE
    + """
local n = #KEYS - 1
local holds = KEYS[n + 1]
purge(holds, ARGV[1])
local member = ARGV[2]
if member ~= '' and redis.call('ZREM', holds, member) == 1 then release(member) end
for i = 1, n do
  local amount = tonumber(ARGV[1 + 2 * i])
  if amount > 0 then
    redis.call('INCRBY', KEYS[i], amount)
    local ttl = tonumber(ARGV[2 + 2 * i])
    if ttl > 0 and redis.call('TTL', KEYS[i]) < 0 then redis.call('EXPIRE', KEYS[i], ttl) end
  end
end
return 0
"""
)
# KEYS: one key's windows, then its reservations. ARGV: now. Returns each window's count.
_READ = (
    _RELEASE
    + _PURGE
    + """
purge(KEYS[#KEYS], ARGV[1])
local values = {}
for i = 1, #KEYS - 1 do values[i] = tonumber(redis.call('GET', KEYS[i]) or '0') end
return values
"""
)


class RedisCounters:
    """The counters in Redis (redis://, rediss://, sentinel, cluster), one script per step."""

    def __init__(self, uri: str) -> None:
        # Bounded timeouts, as for the request limiter: a Redis that stops answering must
        # not hold every request.
        storage: Any = storage_from_string(uri, socket_connect_timeout=1, socket_timeout=1)
        connection = storage.get_connection()
        self._reserve = connection.register_script(_RESERVE)
        self._settle = connection.register_script(_SETTLE)
        self._read = connection.register_script(_READ)

    def reserve(self, hold: Hold, limits: list[int], now: float) -> list[int]:
        keys = list(hold.keys)
        args: list[Any] = [now, _member(hold), hold.deadline, TTL["month"]]
        for key, amount, limit in zip(keys, hold.amounts, limits, strict=True):
            args += [amount, limit, ttl_of(key)]
        return [int(v) for v in self._reserve(keys=[*keys, holds_key(keys[0])], args=args)]

    def settle(self, hold: Hold | None, charges: list[tuple[str, int]], now: float) -> None:
        member = _member(hold) if hold is not None and hold.held else ""
        keys = [key for key, _ in charges]
        first = keys[0] if keys else hold.keys[0] if hold is not None else ""
        if not first:
            return
        args: list[Any] = [now, member]
        for key, amount in charges:
            args += [amount, ttl_of(key)]
        self._settle(keys=[*keys, holds_key(first)], args=args)

    def read(self, keys: list[str], now: float) -> list[int]:
        # One script per owner's three windows: they and their reservations share one
        # cluster slot, several owners' may not.
        values: list[int] = []
        for i in range(0, len(keys), 3):
            own = keys[i : i + 3]
            values += [int(v) for v in self._read(keys=[*own, holds_key(own[0])], args=[now])]
        return values


def _member(hold: Hold) -> str:
    parts = (f"{k}={a}" for k, a in zip(hold.keys, hold.amounts, strict=True) if a)
    return " ".join([hold.id, "0", *parts])


def first_full(values: list[int], amounts: tuple[int, ...], limits: list[int]) -> int:
    """The first window (1-based) that cannot take its amount; 0: none."""
    checks = zip(values, amounts, limits, strict=True)
    return next((i + 1 for i, (v, a, lim) in enumerate(checks) if not fits(v, a, lim)), 0)
