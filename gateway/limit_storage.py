"""The rate-limit storages: limits' memory and Redis storages, each with a hit that also
returns its window.

A request the limit admits answers with x-ratelimit-remaining/reset, which needs the
window as the hit left it. Asked for separately, that is a second storage call per request
(a second Redis round trip); `acquire_with_window` is the moving-window hit and the
window read in one step (one Lua script in Redis), used by GatewayLimiter. The other
strategies keep the two calls.
"""

from __future__ import annotations

import bisect
import threading
import time
from typing import Any

from limits import WindowStats
from limits.storage import MemoryStorage, RedisStorage
from limits.storage.memory import Entry

# The moving window's acquire (limits' acquire_moving_window.lua, for one entry), then its
# window (limits' moving_window.lua): the list holds hit times newest first.
_ACQUIRE_WITH_WINDOW = """
local now, limit, expiry = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local acquired = 0
local entry = redis.call('lindex', KEYS[1], limit - 1)
if not (entry and tonumber(entry) >= now - expiry) then
    redis.call('lpush', KEYS[1], now)
    redis.call('ltrim', KEYS[1], 0, limit - 1)
    redis.call('expire', KEYS[1], expiry)
    acquired = 1
end
local low, high, found = 0, limit - 1, nil
while low <= high do
    local mid = math.floor((low + high) / 2)
    local value = tonumber(redis.call('lindex', KEYS[1], mid))
    if value and value >= now - expiry then
        found = mid
        low = mid + 1
    else
        high = mid - 1
    end
end
if found then
    return {acquired, tostring(redis.call('lindex', KEYS[1], found)), found + 1}
end
return {acquired, tostring(now), 0}
"""


class GatewayMemoryStorage(MemoryStorage):
    """limits' memory:// storage: a moving window kept oldest first, swept once a second.

    The stock storage keeps each key's hits newest first, so every hit inserts at the front
    of a list as long as the window's hits (1,000 requests a second keep 60,000 entries:
    a 480 KB move per request), and starts a new 10 ms Timer thread whenever the last one
    has ended (~5-8% of a request's CPU). Here a hit is an append and the sweep drops the
    expired head once a second. Every check compares timestamps itself, so sweeping less
    often changes no decision; the answers are the stock storage's.
    """

    STORAGE_SCHEME = ["gateway-memory"]  # noqa: RUF012 - the registry reads a list
    SWEEP_SECONDS = 1.0

    # Overrides MemoryStorage.__schedule_expiry (name-mangled, hence the spelling).
    def _MemoryStorage__schedule_expiry(self) -> None:  # noqa: N802
        if not self.timer.is_alive():
            self.timer = threading.Timer(self.SWEEP_SECONDS, self._sweep)
            self.timer.daemon = True
            self.timer.start()

    def _sweep(self) -> None:
        now = time.time()
        for key in list(self.events):
            with self.locks[key]:
                events = self.events.get(key)
                if events:
                    # A new list, not the old one cut: get_moving_window reads without the
                    # lock, and its index must stay valid in the list it searched.
                    events = self.events[key] = events[
                        bisect.bisect_right(events, now, key=_expiry) :
                    ]
                if not events:
                    self.events.pop(key, None)
                    self.locks.pop(key, None)
        for key in [k for k, at in list(self.expirations.items()) if at <= now]:
            self.storage.pop(key, None)
            self.expirations.pop(key, None)

    def acquire_entry(self, key: str, limit: int, expiry: int, amount: int = 1) -> bool:
        if amount > limit:
            return False
        self._MemoryStorage__schedule_expiry()
        with self.locks[key]:
            events = self.events.setdefault(key, [])
            # The hit `limit - amount` places before the newest: still in the window, full.
            index = len(events) - 1 - (limit - amount)
            if index >= 0 and events[index].atime >= time.time() - expiry:
                return False
            events.extend(Entry(expiry) for _ in range(amount))
            return True

    def acquire_with_window(self, key: str, limit: int, expiry: int) -> tuple[bool, WindowStats]:
        """One hit, and the window as it is after it (see GatewayLimiter)."""
        with self.locks[key]:
            acquired = self.acquire_entry(key, limit, expiry)
            start, count = self.get_moving_window(key, limit, expiry)
        return acquired, WindowStats(start + expiry, limit - count)

    def get_moving_window(self, key: str, limit: int, expiry: int) -> tuple[float, int]:
        now = time.time()
        events = self.events.get(key)
        if events:
            first = bisect.bisect_left(events, now - expiry, key=_atime)
            if first < len(events):
                return events[first].atime, len(events) - first
        return now, 0


def _atime(entry: Entry) -> float:
    return entry.atime


def _expiry(entry: Entry) -> float:
    return entry.expiry


class GatewayRedisStorage(RedisStorage):
    """limits' Redis storage (redis:// and rediss://), with the one-step hit and window."""

    STORAGE_SCHEME = ["gateway-redis", "gateway-rediss"]  # noqa: RUF012 - read as a list

    def __init__(self, uri: str, **options: Any) -> None:
        super().__init__(uri.removeprefix("gateway-"), **options)
        self._acquire_with_window = self.get_connection().register_script(
            _ACQUIRE_WITH_WINDOW.encode()
        )

    def acquire_with_window(self, key: str, limit: int, expiry: int) -> tuple[bool, WindowStats]:
        acquired, start, count = self._acquire_with_window(
            [self.prefixed_key(key)], [time.time(), limit, expiry]
        )
        return bool(acquired), WindowStats(float(start) + expiry, limit - int(count))


def storage_uri(uri: str) -> str:
    """The URI of the storage class here for RATE_LIMIT_STORAGE_URI's scheme."""
    for scheme in ("memory://", "redis://", "rediss://"):
        if uri.startswith(scheme):
            return "gateway-" + uri
    return uri


def storage_options(uri: str) -> dict[str, str | int]:
    # Bounded Redis timeouts: without them a Redis that stops answering (rather than
    # refusing) would hold every request, and /ready, until TCP gives up.
    if uri.startswith("redis"):
        return {"socket_connect_timeout": 1, "socket_timeout": 1}
    return {}
