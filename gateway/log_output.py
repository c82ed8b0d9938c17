"""Where JSON log lines are written: to stdout at once, or (in a worker) by one writer thread.

A request thread that writes its own access line holds loguru's handler lock through the
write() system call, which releases the GIL; under load the next threads to reach their
log line then sleep on that lock and are woken one by one (a lock convoy: a context switch
or two per request). A gunicorn worker therefore hands each info line to a queue, and one
thread writes whatever has gathered in one write. Warnings and errors still go out at
once, after what was queued before them; `flush()` runs at exit and on the drain's
hurried exit, so an orderly stop loses no line.
"""

from __future__ import annotations

import atexit
import queue
import threading
from typing import TextIO


class LineOutput:
    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._lock = threading.Lock()  # one writer at a time, whole lines only
        self._queue: queue.SimpleQueue[str] | None = None

    def start_background(self) -> None:
        """From now on info lines are written by a thread of this process (call after fork)."""
        if self._queue is not None:
            return
        self._lock = threading.Lock()  # a lock held by another thread at fork stays held
        self._queue = queue.SimpleQueue()
        writer = threading.Thread(target=self._run, args=(self._queue,), name="log-writer")
        writer.daemon = True
        writer.start()
        atexit.register(self.flush)

    def write(self, line: str, *, urgent: bool = False) -> None:
        """Write one line (ending in a newline); `urgent` lines are written before returning."""
        lines = self._queue
        if lines is None:
            with self._lock:
                self._stream.write(line)
                self._stream.flush()
            return
        lines.put(line)
        if urgent:
            self.flush()

    def flush(self) -> None:
        """Write every queued line now, in this thread."""
        if self._queue is not None:
            with self._lock:
                self._write(self._drain(self._queue, []))

    def _run(self, lines: queue.SimpleQueue[str]) -> None:
        while True:
            first = lines.get()
            with self._lock:
                self._write(self._drain(lines, [first]))

    @staticmethod
    def _drain(lines: queue.SimpleQueue[str], batch: list[str]) -> list[str]:
        while True:
            try:
                batch.append(lines.get_nowait())
            except queue.Empty:
                return batch

    def _write(self, batch: list[str]) -> None:
        if batch:
            try:
                self._stream.write("".join(batch))
                self._stream.flush()
            except (OSError, ValueError):  # stdout closed or gone: nothing left to tell
                pass
