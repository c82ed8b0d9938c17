"""Answers written on the poller, as fast as the client takes them.

`send_now` (replies.py) is enough for the worker's own few-hundred-byte replies, which an
empty send buffer always takes. A /metrics answer can be far larger than a socket buffer
(every key's and model's series), and the main loop must never wait on one client: what the
socket does not take at once is written each time it becomes writable, within
CLIENT_WRITE_TIMEOUT for the whole answer, as a request thread's writes are bounded.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class _Reply:
    rest: memoryview
    deadline: float
    sent: Callable[[bool], None]
    failed: bool = False


class Sending:
    def __init__(
        self, poller: selectors.BaseSelector, timeout: float, on_stalled: Callable[[], None]
    ) -> None:
        self._poller = poller
        self._timeout = timeout
        self._on_stalled = on_stalled
        # Insertion order is deadline order: every reply gets the same time.
        self._replies: dict[socket.socket, _Reply] = {}

    def send(self, sock: socket.socket, data: bytes, sent: Callable[[bool], None]) -> None:
        """Write `data` to the non-blocking `sock`; `sent(True)` once all of it is written,
        `sent(False)` if the client is gone or took too long. Always on the main loop."""
        reply = _Reply(memoryview(data), time.monotonic() + self._timeout, sent)
        if not _write(sock, reply):
            sent(not reply.failed)
            return
        try:
            self._poller.register(sock, selectors.EVENT_WRITE, self._on_writable)
        except (OSError, ValueError, KeyError):
            sent(False)
            return
        self._replies[sock] = reply

    def next_deadline(self) -> float | None:
        return next(iter(self._replies.values())).deadline if self._replies else None

    def expire(self, now: float) -> None:
        while self._replies:
            sock, reply = next(iter(self._replies.items()))
            if reply.deadline > now:
                return
            self._on_stalled()
            self._end(sock, ok=False)

    def _on_writable(self, sock: socket.socket) -> None:
        reply = self._replies[sock]
        if not _write(sock, reply):
            self._end(sock, ok=not reply.failed)

    def _end(self, sock: socket.socket, *, ok: bool) -> None:
        reply = self._replies.pop(sock)
        with contextlib.suppress(KeyError, ValueError, OSError):
            self._poller.unregister(sock)
        reply.sent(ok)


def _write(sock: socket.socket, reply: _Reply) -> bool:
    """Send what the socket takes now; True while some of the reply is left to send."""
    try:
        while reply.rest:
            reply.rest = reply.rest[sock.send(reply.rest, socket.MSG_DONTWAIT) :]
    except (BlockingIOError, InterruptedError):
        return True
    except OSError:
        reply.failed = True
    return False
