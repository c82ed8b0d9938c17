"""Where JSON log lines are written: to stdout at once, or (in a worker) by one writer thread.

A request thread that writes its own access line holds loguru's handler lock through the
write() system call, which releases the GIL; under load the next threads to reach their
log line then sleep on that lock and are woken one by one (a lock convoy: a context switch
or two per request). A gunicorn worker therefore hands each info line to a queue, and one
thread writes whatever has gathered in one write. Warnings and errors still go out at
once, after what was queued before them; `flush()` runs at exit and on the drain's
hurried exit, so an orderly stop loses no line. The queue is bounded: when stdout does not
keep up (a blocked pipe, a slow log shipper) and `MAX_QUEUED` lines wait, the thread that
adds one writes the queue itself, so requests slow down with their log instead of the
worker's memory growing without end.
"""

from __future__ import annotations

import atexit
import contextlib
import threading
from collections import deque
from typing import TextIO

MAX_QUEUED = 50_000  # lines; about 25 MB of access lines


class LineOutput:
    def __init__(self, stream: TextIO, max_queued: int = MAX_QUEUED) -> None:
        self._stream = stream
        self._max_queued = max_queued
        # Lines leave the queue only with this lock held, so that a flush or an urgent line
        # finds every line queued before it either written or still queued.
        self._lock = threading.Lock()
        self._lines: deque[str] | None = None
        self._pending = threading.Event()

    def start_background(self) -> None:
        """From now on info lines are written by a thread of this process (call after fork)."""
        if self._lines is not None:
            return
        self._lock = threading.Lock()  # a lock held by another thread at fork stays held
        self._pending = threading.Event()
        self._lines = deque()
        writer = threading.Thread(target=self._run, args=(self._lines,), name="log-writer")
        writer.daemon = True
        writer.start()
        atexit.register(self.flush)

    def write(self, line: str, *, urgent: bool = False) -> None:
        """Write one line (ending in a newline); `urgent` lines are written before returning."""
        lines = self._lines
        if lines is None:
            with self._lock:
                self._stream.write(line)
                self._stream.flush()
            return
        lines.append(line)
        if urgent or len(lines) > self._max_queued:
            self.flush()
        elif not self._pending.is_set():
            self._pending.set()

    def flush(self) -> None:
        """Write every queued line now, in this thread."""
        if self._lines is not None:
            with self._lock:
                self._write(_drain(self._lines))

    def _run(self, lines: deque[str]) -> None:
        while True:
            self._pending.wait()
            with self._lock:
                self._pending.clear()
                self._write(_drain(lines))

    def _write(self, batch: list[str]) -> None:
        if batch:
            try:
                self._stream.write("".join(batch))
                self._stream.flush()
            except (OSError, ValueError):  # stdout closed or gone: nothing left to tell
                pass


def _drain(lines: deque[str]) -> list[str]:
    batch = []
    with contextlib.suppress(IndexError):
        while True:
            batch.append(lines.popleft())
    return batch
