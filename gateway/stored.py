"""Stored Responses: what `previous_response_id`, GET, DELETE and `/input_items` read.

A finished response (`store: true`, the default) is kept for `RESPONSES_STORE_TTL` seconds
in the limits' storage: Redis when `RATE_LIMIT_STORAGE_URI` is redis:// (every worker and
replica sees it), else this process's memory, bounded in bytes (the oldest go first). Each
entry belongs to the key that made it: any other key is told it does not exist.

For a bridged provider the entry holds the response, its input items and the conversation
so far (what the next turn's `previous_response_id` replays). For a provider that serves
Responses itself it holds only where the response lives, so those calls are relayed there.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Protocol

import msgspec
from limits.storage import storage_from_string
from loguru import logger

_PREFIX = "ai-gateway:responses:"


class Stored(msgspec.Struct, frozen=True):
    owner: str  # the key id of the key that made it
    model: str  # the public model it was asked of
    provider: str | None = None  # set: the provider holds it (native); None: the gateway does
    response: dict[str, Any] | None = None
    input: list[dict[str, Any]] = []
    # Input and output items of every turn up to and including this one, oldest first;
    # None when it grew past MAX_CONVERSATION_BYTES (the response cannot be continued).
    conversation: list[dict[str, Any]] | None = []


_ENCODER = msgspec.json.Encoder()
_DECODER = msgspec.json.Decoder(Stored)


# A conversation (every turn's items, replayed by previous_response_id) longer than this is
# not kept for replay: the response itself still is. The next turn gets a clear 400.
MAX_CONVERSATION_BYTES = 8 * 1024 * 1024


class _Backend(Protocol):
    def put(self, key: str, value: bytes, ttl: float, owner: str) -> None: ...

    def get(self, key: str) -> bytes | None: ...

    def delete(self, key: str) -> bool: ...


class StoreUnavailableError(Exception):
    """The storage did not answer."""


@dataclass
class ResponseStore:
    backend: _Backend
    ttl: float

    @classmethod
    def of(cls, storage_uri: str, ttl: float, memory_bytes: int) -> ResponseStore:
        if storage_uri.startswith("redis"):
            return cls(RedisBackend(storage_uri), ttl)
        return cls(MemoryBackend(memory_bytes), ttl)

    def put(self, response_id: str, entry: Stored) -> None:
        """Kept, or a warning: a failure to store never fails the answer already given."""
        value = _ENCODER.encode(entry)
        if len(value) > MAX_CONVERSATION_BYTES and entry.conversation:
            value = _ENCODER.encode(msgspec.structs.replace(entry, conversation=None))
        try:
            self.backend.put(_PREFIX + response_id, value, self.ttl, entry.owner)
        except Exception as exc:  # noqa: BLE001 - the storage is down; the answer stands
            logger.warning("stored response not kept: {}", type(exc).__name__)

    def get(self, response_id: str, owner: str) -> Stored | None:
        """The entry if it exists and belongs to `owner`; StoreUnavailableError if unknown."""
        raw = self._call(self.backend.get, _PREFIX + response_id)
        if raw is None:
            return None
        entry = _DECODER.decode(raw)
        return entry if entry.owner == owner else None

    def delete(self, response_id: str, owner: str) -> bool:
        if self.get(response_id, owner) is None:
            return False
        return bool(self._call(self.backend.delete, _PREFIX + response_id))

    @staticmethod
    def _call(step: Any, key: str) -> Any:
        try:
            return step(key)
        except Exception as exc:  # told to the caller as one kind of failure
            logger.warning("stored responses unreachable: {}", type(exc).__name__)
            raise StoreUnavailableError from exc


class MemoryBackend:
    """Entries in this process, oldest dropped first past `limit` bytes. One key may hold at
    most a quarter of it (its own oldest go first), so one tenant cannot evict the rest."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._owner_limit = limit // 4
        self._size = 0
        self._entries: OrderedDict[str, tuple[float, bytes, str]] = OrderedDict()
        self._owned: dict[str, OrderedDict[str, int]] = {}  # owner -> its keys and sizes
        self._lock = threading.Lock()

    def put(self, key: str, value: bytes, ttl: float, owner: str) -> None:
        if len(value) > self._owner_limit:
            logger.warning("stored response not kept: {} bytes, over the memory limit", len(value))
            return
        with self._lock:
            self._drop(key)
            self._entries[key] = (time.monotonic() + ttl, value, owner)
            self._owned.setdefault(owner, OrderedDict())[key] = len(value)
            self._size += len(value)
            mine = self._owned[owner]
            while sum(mine.values()) > self._owner_limit:
                self._drop(next(iter(mine)))
            while self._size > self._limit:
                self._drop(next(iter(self._entries)))

    def get(self, key: str) -> bytes | None:
        with self._lock:
            found = self._entries.get(key)
            if found is None:
                return None
            if found[0] <= time.monotonic():
                self._drop(key)
                return None
            return found[1]

    def delete(self, key: str) -> bool:
        with self._lock:
            return self._drop(key)

    def _drop(self, key: str) -> bool:
        found = self._entries.pop(key, None)
        if found is None:
            return False
        self._size -= len(found[1])
        mine = self._owned.get(found[2])
        if mine is not None:
            mine.pop(key, None)
            if not mine:
                del self._owned[found[2]]
        return True


class RedisBackend:
    def __init__(self, uri: str) -> None:
        # Bounded timeouts, as for the limits: a Redis that stops answering holds nobody.
        storage: Any = storage_from_string(uri, socket_connect_timeout=1, socket_timeout=1)
        self._connection = storage.get_connection()

    def put(self, key: str, value: bytes, ttl: float, owner: str) -> None:
        del owner  # Redis bounds itself (maxmemory); each entry expires with its TTL
        self._connection.set(key, value, px=max(1, int(ttl * 1000)))

    def get(self, key: str) -> bytes | None:
        value = self._connection.get(key)
        return value if value is None else bytes(value)

    def delete(self, key: str) -> bool:
        return bool(self._connection.delete(key))
