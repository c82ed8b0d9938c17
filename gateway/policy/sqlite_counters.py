"""The token counters in a SQLite file: memory:// keeps its quotas across reloads and restarts.

Without Redis, the day and month must still outlive a worker (a SIGHUP replaces every
worker; a crash or a deploy restarts them), so they live in one file on the host, shared by
its workers. WAL mode lets readers run beside the one writer; each reserve and settle is one
`BEGIN IMMEDIATE` transaction (the file's write lock), which makes check-and-reserve atomic
across the workers as the Lua scripts do in Redis. `synchronous=NORMAL`: a power cut may
lose the last transactions, never the file; a killed process loses nothing.
"""

from __future__ import annotations

import os
import sqlite3
import stat
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from gateway.policy.counters import PURGE_BATCH, Hold, first_full, ttl_of

_SCHEMA = """
CREATE TABLE IF NOT EXISTS counters (
  key TEXT PRIMARY KEY, value INTEGER NOT NULL, expires REAL NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS holds (
  id TEXT PRIMARY KEY, deadline REAL NOT NULL, cost INTEGER NOT NULL, keys TEXT NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS holds_by_deadline ON holds (deadline);
"""
_ADD = """
INSERT INTO counters (key, value, expires) VALUES (:key, :amount, :expires)
ON CONFLICT (key) DO UPDATE SET
  value = CASE WHEN expires > :now THEN value + :amount ELSE :amount END,
  expires = CASE WHEN expires > :now THEN expires ELSE :expires END
RETURNING value
"""
# A writer waits this long for another worker's transaction (each takes microseconds);
# past it the step fails and the budget holds the limits in memory meanwhile.
# How long a step waits for another process's write: short, because the wait happens with
# this worker's lock held (every token-limited request of the worker queues behind it).
# Past it the step fails and TokenBudget holds the counts in memory meanwhile, as for a
# Redis outage: a stuck sqlite3 shell or a frozen worker costs the limits, not answers.
_BUSY_TIMEOUT = 0.25
# How long a step waits for this worker's own lock before taking the memory fallback.
_LOCK_TIMEOUT = 1.0
_SWEEP_EVERY = 1000
# The expiry of a counter that has none (a budget_total).
_NEVER = 1e18


class SqliteCounters:
    """The counters in a SQLite file (WAL), shared by every worker of the host."""

    def __init__(self, path: str) -> None:
        self._path = path
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        self._pid = 0
        self._operations = 0
        # Fail at start-up on a path that cannot hold the file; closed again so that no
        # connection crosses gunicorn's fork (each worker opens its own).
        self._open().close()

    def reserve(self, hold: Hold, limits: list[int], now: float) -> list[int]:
        with self._transaction() as db:
            self._purge(db, now)
            values = [self._get(db, k) for k in hold.keys]
            full = first_full(values, hold.amounts, limits)
            if not full and hold.held:
                pairs = list(zip(hold.keys, hold.amounts, strict=True))
                values = [self._add(db, k, a) for k, a in pairs]
                # Each counter as "key=amount": rows written before money (one amount for
                # every counter, in `cost`) are still read.
                held = " ".join(f"{k}={a}" for k, a in pairs if a)
                db.execute(
                    "INSERT OR REPLACE INTO holds VALUES (?, ?, ?, ?)",
                    (hold.id, hold.deadline, 0, held),
                )
            return [full, *values]

    def settle(self, hold: Hold | None, charges: list[tuple[str, int]], now: float) -> None:
        with self._transaction() as db:
            self._purge(db, now)
            if hold is not None and hold.held and self._unhold(db, hold.id):
                self._release(db, zip(hold.keys, hold.amounts, strict=True))
            for key, amount in charges:
                if amount:
                    self._add(db, key, amount)
            self._sweep(db)

    def read(self, keys: list[str], now: float) -> list[int]:
        with self._transaction() as db:
            self._purge(db, now)
            return [self._get(db, k) for k in keys]

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        if not self._lock.acquire(timeout=_LOCK_TIMEOUT):
            raise sqlite3.OperationalError("the token store is busy in this worker")
        try:
            db = self._connection()
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
                db.execute("COMMIT")
            except BaseException:
                # A failed COMMIT too: a transaction left open would fail every later BEGIN.
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
        finally:
            self._lock.release()

    def _connection(self) -> sqlite3.Connection:
        if self._db is None or self._pid != os.getpid():  # a forked worker: its own
            self._db, self._pid = self._open(), os.getpid()
        return self._db

    def _open(self) -> sqlite3.Connection:
        _own_file(self._path)
        # isolation_level=None: the transactions are the explicit BEGIN IMMEDIATE above.
        db = sqlite3.connect(
            self._path, timeout=_BUSY_TIMEOUT, isolation_level=None, check_same_thread=False
        )
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.executescript(_SCHEMA)
        return db

    def _purge(self, db: sqlite3.Connection, now: float) -> None:
        dead = db.execute(
            "SELECT id, cost, keys FROM holds WHERE deadline <= ? ORDER BY deadline LIMIT ?",
            (now, PURGE_BATCH),
        ).fetchall()
        for hold_id, amount, keys in dead:
            self._unhold(db, hold_id)
            held = (k.split("=") if "=" in k else (k, amount) for k in keys.split())
            self._release(db, ((k, int(a)) for k, a in held))

    def _unhold(self, db: sqlite3.Connection, hold_id: str) -> bool:
        """Whether the reservation was still held (not yet released at its deadline)."""
        return db.execute("DELETE FROM holds WHERE id = ?", (hold_id,)).rowcount > 0

    def _release(self, db: sqlite3.Connection, held: Iterable[tuple[str, int]]) -> None:
        for key, amount in held:
            db.execute("UPDATE counters SET value = max(0, value - ?) WHERE key = ?", (amount, key))

    def _get(self, db: sqlite3.Connection, key: str) -> int:
        row = db.execute(
            "SELECT value FROM counters WHERE key = ? AND expires > ?", (key, time.time())
        ).fetchone()
        return int(row[0]) if row else 0

    def _add(self, db: sqlite3.Connection, key: str, amount: int) -> int:
        now = time.time()
        expires = now + ttl_of(key) if ttl_of(key) else _NEVER
        params = {"key": key, "amount": amount, "now": now, "expires": expires}
        return int(db.execute(_ADD, params).fetchone()[0])

    def _sweep(self, db: sqlite3.Connection) -> None:
        self._operations += 1
        if self._operations % _SWEEP_EVERY == 0:
            db.execute("DELETE FROM counters WHERE expires <= ?", (time.time(),))


def _own_file(path: str) -> None:
    """Create the store file for this user alone, or check that the one found is ours.

    Its default lives in /tmp, where another local user could have made it first (to read
    or reset the quotas) or left a symlink to somewhere else: refused, with the path named.
    """
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        found = os.lstat(path)
        if stat.S_ISLNK(found.st_mode) or found.st_uid != os.geteuid():
            raise PermissionError(
                f"{path} is a symlink or belongs to another user: not used as the token store"
            ) from None
    else:
        os.close(fd)
