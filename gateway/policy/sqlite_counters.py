"""The token counters in a SQLite file: memory:// keeps its quotas across reloads and restarts.

Without Redis, the day and month must still outlive a worker (a SIGHUP replaces every
worker; a crash or a deploy restarts them), so they live in one file on the host, shared by
its workers. WAL mode lets readers run beside the one writer; each reserve and settle is one
`BEGIN IMMEDIATE` transaction (the file's write lock), which makes check-and-reserve atomic
across the workers as the Lua scripts do in Redis. `synchronous=NORMAL`: a power cut may
lose the last transactions, never the file; a killed process loses nothing.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import stat
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any, cast

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
_ADD_ALL = """
INSERT INTO counters (key, value, expires) VALUES {rows}
ON CONFLICT (key) DO UPDATE SET
  value = CASE WHEN expires > :now THEN value + excluded.value ELSE excluded.value END,
  expires = CASE WHEN expires > :now THEN expires ELSE excluded.expires END
RETURNING key, value
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
_PURGE_SECONDS = 0.5
# The expiry of a counter that has none (a budget_total).
_NEVER = 1e18


class _Job:
    """One step for the store's thread; its caller waits on `done` (released when over)."""

    __slots__ = ("abandoned", "done", "error", "result", "step")

    def __init__(self, step: Callable[[sqlite3.Connection], Any]) -> None:
        self.step = step
        self.done = threading.Lock()
        self.done.acquire()
        self.result: Any = None
        self.error: BaseException | None = None
        self.abandoned = False


class SqliteCounters:
    """The counters in a SQLite file (WAL), shared by every worker of the host.

    One thread per process runs the steps, as many as are waiting in one transaction (a
    group commit). Each request thread taking the file itself held a lock through every
    statement, and each statement releases the GIL: under load the other threads queued on
    that lock and were woken one by one, and each step paid its own BEGIN and COMMIT
    (teams-json-c64 cost 1.7x the plain gateway). The steps of a batch still run one after
    the other inside the file's write lock, so each check-and-reserve stays atomic across
    the workers.
    """

    def __init__(self, path: str) -> None:
        self._path = path
        self._db: sqlite3.Connection | None = None
        self._pid = 0
        self._operations = 0
        self._purged_at = -1.0
        self._jobs: deque[_Job] = deque()
        self._wake = threading.Event()
        self._lock = threading.Lock()  # starts the thread once per process
        # Fail at start-up on a path that cannot hold the file; closed again so that no
        # connection crosses gunicorn's fork (each worker opens its own).
        self._open().close()

    def reserve(self, hold: Hold, limits: list[int], now: float) -> list[int]:
        return cast(list[int], self._run(partial(self._reserve, hold, limits, now)))

    def settle(self, hold: Hold | None, charges: list[tuple[str, int]], now: float) -> None:
        self._run(partial(self._settle, hold, charges, now))

    def read(self, keys: list[str], now: float) -> list[int]:
        return cast(list[int], self._run(partial(self._read, keys, now)))

    def _reserve(
        self, hold: Hold, limits: list[int], now: float, db: sqlite3.Connection
    ) -> list[int]:
        self._purge(db, now)
        values = self._values(db, hold.keys)
        full = first_full(values, hold.amounts, limits)
        if not full and hold.held:
            pairs = list(zip(hold.keys, hold.amounts, strict=True))
            values = self._add_all(db, pairs)
            # Each counter as "key=amount": rows written before money (one amount for
            # every counter, in `cost`) are still read.
            held = " ".join(f"{k}={a}" for k, a in pairs if a)
            db.execute(
                "INSERT OR REPLACE INTO holds VALUES (?, ?, ?, ?)",
                (hold.id, hold.deadline, 0, held),
            )
        return [full, *values]

    def _settle(
        self, hold: Hold | None, charges: list[tuple[str, int]], now: float, db: sqlite3.Connection
    ) -> None:
        self._purge(db, now)
        if hold is not None and hold.held and self._unhold(db, hold.id):
            self._release(db, zip(hold.keys, hold.amounts, strict=True))
        self._add_all(db, [(key, amount) for key, amount in charges if amount])
        self._sweep(db)

    def _read(self, keys: list[str], now: float, db: sqlite3.Connection) -> list[int]:
        self._purge(db, now)
        return self._values(db, tuple(keys))

    def _run(self, step: Callable[[sqlite3.Connection], Any]) -> Any:
        """Hand `step` to the store's thread and wait for it (at most _LOCK_TIMEOUT)."""
        self._start_thread()
        job = _Job(step)
        self._jobs.append(job)
        self._wake.set()
        if not job.done.acquire(timeout=_LOCK_TIMEOUT):
            # Past it the budget holds the counts in memory (as for a Redis outage); a step
            # that still runs later holds its reservation until the hold's deadline.
            job.abandoned = True
            raise sqlite3.OperationalError("the token store is busy in this worker")
        if job.error is not None:
            raise job.error
        return job.result

    def _start_thread(self) -> None:
        if self._pid == os.getpid():
            return
        with self._lock:
            if self._pid != os.getpid():  # a forked worker: its own connection and thread
                self._db = self._open()  # the parent's, if any, is never used here
                self._jobs, self._wake = deque(), threading.Event()
                thread = threading.Thread(
                    target=self._serve, args=(self._jobs, self._wake), name="token-store"
                )
                thread.daemon = True
                thread.start()
                self._pid = os.getpid()

    def _serve(self, jobs: deque[_Job], wake: threading.Event) -> None:
        while True:
            wake.wait()
            wake.clear()
            batch = []
            with contextlib.suppress(IndexError):
                while True:
                    batch.append(jobs.popleft())
            if batch := [job for job in batch if not job.abandoned]:
                self._batch(batch)

    def _batch(self, batch: list[_Job]) -> None:
        """Every step of `batch` in one transaction; each job learns its result once it is
        committed (or the error that ended the transaction)."""
        try:
            with self._transaction() as db:
                for job in batch:
                    job.result = job.step(db)
        except BaseException as exc:  # noqa: BLE001 - every caller learns it; the thread goes on
            for job in batch:
                job.result, job.error = None, exc
        for job in batch:
            job.done.release()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
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

    def _connection(self) -> sqlite3.Connection:
        assert self._db is not None, "opened by _start_thread, in this process"
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
        # Twice a second at most, while the last purge found less than a batch: a hold
        # outlives its deadline by half a second more, and the store is spared a query on
        # every step; a killed worker's many holds are still purged a batch per step.
        if self._purged_at <= now < self._purged_at + _PURGE_SECONDS:
            return
        dead = db.execute(
            "SELECT id, cost, keys FROM holds WHERE deadline <= ? ORDER BY deadline LIMIT ?",
            (now, PURGE_BATCH),
        ).fetchall()
        self._purged_at = now if len(dead) < PURGE_BATCH else -1.0
        for hold_id, amount, keys in dead:
            self._unhold(db, hold_id)
            held = (k.split("=") if "=" in k else (k, amount) for k in keys.split())
            self._release(db, ((k, int(a)) for k, a in held))

    def _unhold(self, db: sqlite3.Connection, hold_id: str) -> bool:
        """Whether the reservation was still held (not yet released at its deadline)."""
        return db.execute("DELETE FROM holds WHERE id = ?", (hold_id,)).rowcount > 0

    def _release(self, db: sqlite3.Connection, held: Iterable[tuple[str, int]]) -> None:
        db.executemany(
            "UPDATE counters SET value = max(0, value - ?) WHERE key = ?",
            [(amount, key) for key, amount in held if amount],
        )

    def _values(self, db: sqlite3.Connection, keys: tuple[str, ...]) -> list[int]:
        """The counters' values (0 for none or expired), in one statement."""
        marks = ", ".join("?" * len(keys))
        found = dict(
            db.execute(
                f"SELECT key, value FROM counters WHERE key IN ({marks}) AND expires > ?",
                (*keys, time.time()),
            ).fetchall()
        )
        return [int(found.get(key, 0)) for key in keys]

    def _add_all(self, db: sqlite3.Connection, pairs: list[tuple[str, int]]) -> list[int]:
        """Add each amount to its counter (a new window starts from it), in one statement;
        the counters' new values, in order. Each step of a statement is a wait for the
        GIL with this worker's lock held: a request's three windows are one step, not three."""
        if not pairs:
            return []
        if len({key for key, _ in pairs}) != len(pairs):  # never so far; kept exact anyway
            return [value for pair in pairs for value in self._add_all(db, [pair])]
        now = time.time()
        params: dict[str, object] = {"now": now}
        rows = []
        for index, (key, amount) in enumerate(pairs):
            ttl = ttl_of(key)
            params |= {
                f"k{index}": key,
                f"a{index}": amount,
                f"e{index}": now + ttl if ttl else _NEVER,
            }
            rows.append(f"(:k{index}, :a{index}, :e{index})")
        found = dict(db.execute(_ADD_ALL.format(rows=", ".join(rows)), params).fetchall())
        return [int(found[key]) for key, _ in pairs]

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
