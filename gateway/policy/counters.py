"""Where the token counters live: this process's memory, or Redis (SQLite: sqlite_counters).

Every kind keeps the same two things per key: a counter per window (settled tokens plus the
reservations in flight), and the reservations themselves, each with a deadline. Each step
(reserve, settle, read) first releases the reservations past their deadline, so one whose
request can no longer settle it (its worker was killed, or cut at the end of a reload's
drain) leaves the day and month within the deadline instead of when the window ends. A
settle releases its reservation only if it is still held: never twice.
"""

from __future__ import annotations

import heapq
import threading
import time
from dataclasses import dataclass
from typing import Any

from limits.storage import storage_from_string

TTL = {"minute": 120, "day": 2 * 86400, "month": 33 * 86400}
# Reservations past their deadline released per step, at most (the rest at the next one).
PURGE_BATCH = 64


@dataclass(frozen=True)
class Hold:
    """One reservation in the counters: released by its settle, else at its deadline."""

    id: str
    keys: tuple[str, ...]  # the window counters that hold it
    tokens: int
    deadline: float  # Unix time


def ttl_of(key: str) -> int:
    return TTL[key.rsplit(":", 2)[-2]]


def holds_key(key: str) -> str:
    """The reservations of the key whose window counter is `key` (same Redis Cluster slot)."""
    return key.rsplit(":", 2)[0] + ":holds"


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
            full = next((i + 1 for i, v in enumerate(values) if limits[i] and v >= limits[i]), 0)
            if not full and hold.tokens:
                values = [self._add(k, hold.tokens) for k in hold.keys]
                self._holds[hold.id] = hold
                heapq.heappush(self._deadlines, (hold.deadline, hold.id))
            return [full, *values]

    def settle(self, hold: Hold | None, charged_to: list[str], cost: int, now: float) -> None:
        with self._lock:
            self._purge(now)
            if hold is not None and self._holds.pop(hold.id, None) is not None:
                self._release(hold)
            for key in charged_to:
                if cost:
                    self._add(key, cost)

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
        for key in hold.keys:
            if key in self._values:
                value, expires = self._values[key]
                self._values[key] = (max(0, value - hold.tokens), expires)

    def _get(self, key: str) -> int:
        found = self._values.get(key)
        return found[0] if found is not None and found[1] > time.time() else 0

    def _add(self, key: str, amount: int) -> int:
        self._sweep()
        value = self._get(key) + amount
        expires = self._values[key][1] if key in self._values else 0.0
        if expires <= time.time():
            expires = time.time() + ttl_of(key)
        self._values[key] = (value, expires)
        return value

    def _sweep(self) -> None:
        self._operations += 1
        if self._operations % self.SWEEP_EVERY == 0:
            now = time.time()
            self._values = {k: v for k, v in self._values.items() if v[1] > now}
            if not self._holds:
                self._deadlines = []  # only settled ones left: nothing to release


# Releases the reservations of one key past their deadline: each member of the sorted set
# KEYS[#KEYS] (score: its deadline) is "id cost counter counter counter". Those counters are
# the key's own (one hash tag, so one cluster slot) but not all in KEYS: an old reservation
# holds yesterday's day, say.
_PURGE = f"""
local function purge(holds, now)
  local dead = redis.call('ZRANGEBYSCORE', holds, '-inf', now, 'LIMIT', 0, {PURGE_BATCH})
  for _, member in ipairs(dead) do
    local parts = {{}}
    for part in string.gmatch(member, '%S+') do parts[#parts + 1] = part end
    release(parts, 3, #parts, tonumber(parts[2]))
    redis.call('ZREM', holds, member)
  end
end
"""
_RELEASE = """
local function release(keys, first, last, amount)
  for i = first, last do
    if redis.call('EXISTS', keys[i]) == 1 and redis.call('DECRBY', keys[i], amount) < 0 then
      redis.call('SET', keys[i], 0, 'KEEPTTL')
    end
  end
end
"""
# KEYS: the three windows, then the key's reservations. ARGV: cost, each window's limit (0:
# none), each window's TTL, now, the reservation (its member, deadline and the set's TTL).
# Returns the window that is full (1-based; 0: none) and each window's count after.
_RESERVE = (
    _RELEASE
    + _PURGE
    + """
local n = #KEYS - 1
local cost = tonumber(ARGV[1])
purge(KEYS[n + 1], ARGV[2 * n + 2])
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
  redis.call('ZADD', KEYS[n + 1], ARGV[2 * n + 4], ARGV[2 * n + 3])
  redis.call('EXPIRE', KEYS[n + 1], ARGV[2 * n + 5])
end
table.insert(values, 1, full)
return values
"""
)
# KEYS: the windows to charge, then the key's reservations. ARGV: cost, each window's TTL,
# now, the reservation's member ('': none), which is released only if still held (not
# already released at its deadline): its counters are in the member.
_SETTLE = (
    _RELEASE
    + _PURGE
    + """
local n = #KEYS - 1
local holds = KEYS[n + 1]
local cost = tonumber(ARGV[1])
purge(holds, ARGV[n + 2])
local member = ARGV[n + 3]
if member ~= '' and redis.call('ZREM', holds, member) == 1 then
  local parts = {}
  for part in string.gmatch(member, '%S+') do parts[#parts + 1] = part end
  release(parts, 3, #parts, tonumber(parts[2]))
end
if cost > 0 then
  for i = 1, n do
    redis.call('INCRBY', KEYS[i], cost)
    if redis.call('TTL', KEYS[i]) < 0 then redis.call('EXPIRE', KEYS[i], ARGV[1 + i]) end
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
        ttls = [ttl_of(k) for k in keys]
        args = [hold.tokens, *limits, *ttls, now, _member(hold), hold.deadline, TTL["month"]]
        return [int(v) for v in self._reserve(keys=[*keys, holds_key(keys[0])], args=args)]

    def settle(self, hold: Hold | None, charged_to: list[str], cost: int, now: float) -> None:
        ttls = [ttl_of(k) for k in charged_to]
        member = _member(hold) if hold is not None and hold.tokens else ""
        keys = [*charged_to, holds_key(charged_to[0])]
        self._settle(keys=keys, args=[cost, *ttls, now, member])

    def read(self, keys: list[str], now: float) -> list[int]:
        # One script per key: its windows and reservations share one cluster slot, several
        # keys' do not.
        values: list[int] = []
        for i in range(0, len(keys), 3):
            own = keys[i : i + 3]
            values += [int(v) for v in self._read(keys=[*own, holds_key(own[0])], args=[now])]
        return values


def _member(hold: Hold) -> str:
    return " ".join([hold.id, str(hold.tokens), *hold.keys])
