"""A reload's new workers take over only once they serve; until then the old ones do.

gunicorn's reload forks the new workers and SIGTERMs the old ones in the same breath. A
new worker that cannot boot (its threads do not fit the memory or process limits) then
leaves nobody serving: its exit code (WORKER_BOOT_ERROR) halts the master, or it is
forked again and again while the old workers drain away.

Here every worker reports on a pipe it inherits from the master: `ready` once it accepts
connections, or `failed <why>` when it cannot boot (it then exits 0, so gunicorn neither
halts nor logs its own error line). In the master, `Handover` holds gunicorn's
`manage_workers` back while a reload's workers start: the old workers get SIGTERM only
once all new ones are ready. If one fails (or exits, or is not ready in time), one error
line says why, the reload is rolled back, the new workers are stopped and the old ones
serve on. A worker that fails to boot outside a reload (at start-up) halts the master, as
gunicorn's own boot error does.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from gunicorn.errors import HaltServer
from loguru import logger

# How long a reload's workers may take to serve: starting thousands of threads on a busy
# machine takes seconds, and the threads' own start has a bound of its own (threads.py).
READY_TIMEOUT_SECONDS = 120.0
_READY = "ready"
_FAILED = "failed"


class BootReports:
    """The pipe workers report their boot on. Made by the master before any fork."""

    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe()
        os.set_blocking(self.read_fd, False)
        self._partial = b""

    def send(self, kind: str, detail: str = "") -> None:
        """From a worker: one line, written whole (far below PIPE_BUF)."""
        line = f"{os.getpid()} {kind} {detail}"[:1000].replace("\n", " ") + "\n"
        with contextlib.suppress(OSError):
            os.write(self.write_fd, line.encode("utf-8", "replace"))

    def receive(self) -> list[tuple[int, str, str]]:
        """In the master: the reports that came since the last call, as (pid, kind, detail)."""
        data = self._partial
        with contextlib.suppress(BlockingIOError, InterruptedError):
            for _ in range(64):  # bounded: a few lines per worker at most
                chunk = os.read(self.read_fd, 65536)
                if not chunk:
                    break
                data += chunk
        *lines, self._partial = data.split(b"\n")
        reports = []
        for line in lines:
            pid, _, rest = line.decode("utf-8", "replace").partition(" ")
            kind, _, detail = rest.partition(" ")
            if pid.isdigit():
                reports.append((int(pid), kind, detail))
        return reports


@dataclass
class _Channel:
    """Module state on purpose: made in the master, inherited by every forked worker."""

    reports: BootReports | None = None


_channel = _Channel()


def open_reports() -> BootReports:
    """In the master, once, before the first worker forks."""
    if _channel.reports is None:
        _channel.reports = BootReports()
    return _channel.reports


def report_ready() -> None:
    if _channel.reports is not None:
        _channel.reports.send(_READY)


def report_boot_failure(reason: str) -> None:
    if _channel.reports is not None:
        _channel.reports.send(_FAILED, reason)


def _wake_on_reports(server: Any, reports: BootReports) -> None:
    """In the master: wake its loop whenever a worker reports (no lock is held here, so a
    fork meanwhile copies nothing half-done)."""
    while True:
        try:
            select.select([reports.read_fd], [], [])
        except (OSError, ValueError):
            return  # the pipe is gone: the master is exiting
        server.wakeup()
        time.sleep(0.05)  # the loop reads the reports; a slow loop is woken again


@dataclass
class _Pending:
    old: set[int]
    roll_back: Callable[[], None]
    started: float = field(default_factory=time.monotonic)
    new: set[int] = field(default_factory=set)
    ready: set[int] = field(default_factory=set)
    stopping: set[int] | None = None  # a failed reload's new workers, until reaped


class Handover:
    """The master's side: gunicorn's `manage_workers`, held back while a reload's new
    workers boot (installed on the one arbiter by `Handover.install`)."""

    def __init__(self, server: Any, reports: BootReports) -> None:
        self._server = server
        self._reports = reports
        self._pending: _Pending | None = None
        self._gunicorn_manage = server.manage_workers

    @classmethod
    def install(cls, server: Any, reports: BootReports) -> Handover:
        handover = cls(server, reports)
        server.manage_workers = handover.manage_workers
        # The master's loop waits up to a second for a signal: a report wakes it at once,
        # so the old workers stop taking requests as soon as the new ones serve (until
        # then both generations accept, and a revoked key could still be served).
        threading.Thread(
            target=_wake_on_reports, args=(server, reports), name="boot-reports", daemon=True
        ).start()
        return handover

    @property
    def pending(self) -> bool:
        return self._pending is not None

    def begin(self, roll_back: Callable[[], None]) -> None:
        """Just before gunicorn's reload forks the new workers: the current ones stay."""
        self._pending = _Pending(set(self._server.WORKERS), roll_back)

    def manage_workers(self) -> None:
        for pid, kind, detail in self._reports.receive():
            self._on_report(pid, kind, detail)
        if self._pending is not None and not self._settled(self._pending):
            return  # neither spawn nor stop anything while a reload's workers boot
        self._gunicorn_manage()

    def _on_report(self, pid: int, kind: str, detail: str) -> None:
        pending = self._pending
        if pending is not None and pid not in pending.old:
            if kind == _READY:
                pending.ready.add(pid)
            elif kind == _FAILED and pending.stopping is None:
                self._fail(pending, f"a new worker could not start ({detail})")
            return
        if kind == _FAILED:
            # Start-up, or a worker forked again after one died: nothing older to serve on.
            raise HaltServer(f"a worker could not boot: {detail}", self._server.WORKER_BOOT_ERROR)

    def _settled(self, pending: _Pending) -> bool:
        """Whether gunicorn may manage the workers again (the reload is over either way)."""
        workers = set(self._server.WORKERS)
        if pending.stopping is not None:
            if pending.stopping & workers:
                return False  # a failed reload's workers are not reaped yet
            self._pending = None
            return True
        pending.new |= workers - pending.old
        if pending.new - workers - pending.ready:
            self._fail(pending, "a new worker exited before it served")
            return False
        new = workers - pending.old
        if len(new) >= self._server.num_workers and new <= pending.ready:
            logger.info(
                "the new workers serve: the previous ones ({}) stop taking requests and drain",
                len(workers & pending.old),
            )
            self._pending = None
            return True  # gunicorn's manage_workers now stops the old ones, oldest first
        if time.monotonic() - pending.started > READY_TIMEOUT_SECONDS:
            self._fail(pending, f"the new workers did not serve within {READY_TIMEOUT_SECONDS:g} s")
        return False

    def _fail(self, pending: _Pending, why: str) -> None:
        logger.error(
            "configuration reload failed, the previous configuration stays and its workers "
            "serve on: {}",
            why,
        )
        pending.roll_back()
        pending.stopping = set(self._server.WORKERS) - pending.old
        for pid in pending.stopping:
            # A booting worker dies at once (gunicorn.conf.py's post_fork); a ready one drains.
            self._server.kill_worker(pid, signal.SIGTERM)
