"""Closing client sockets gracefully, on the poller.

gunicorn's `util.close_graceful` sends FIN and then reads what the client still sends for
up to 2 s, so that the kernel does not answer those bytes with a reset that would truncate
our last response. gthread calls it on its main loop, which then blocks for those 2 s on
every client that keeps its end open (a client dropped for not reading, a 503 whose client
is slow to close): probes and every other connection would wait. This does the same
lingering without blocking.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import struct
import time

from gunicorn import util

LINGER_SECONDS = 2.0  # as gunicorn's close_graceful
_ABORTIVE = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() resets the connection
_MAX_DRAIN_BYTES = 65536


class Lingering:
    def __init__(self, poller: selectors.BaseSelector) -> None:
        self._poller = poller
        # Insertion order is deadline order: every socket lingers equally long.
        self._deadlines: dict[socket.socket, float] = {}
        self._drained: dict[socket.socket, int] = {}

    def close(self, sock: socket.socket) -> None:
        if _abortive(sock):
            util.close(sock)  # the app cut its answer off: a reset now, never a clean end
            return
        try:
            sock.shutdown(socket.SHUT_WR)
            sock.setblocking(False)
            self._poller.register(sock, selectors.EVENT_READ, self._on_readable)
        except (OSError, ValueError, KeyError):
            util.close(sock)
            return
        self._deadlines[sock] = time.monotonic() + LINGER_SECONDS
        self._drained[sock] = 0

    def next_deadline(self) -> float | None:
        return next(iter(self._deadlines.values()), None)

    def expire(self, now: float) -> None:
        while self._deadlines:
            sock, deadline = next(iter(self._deadlines.items()))
            if deadline > now:
                return
            self._finish(sock)

    def _on_readable(self, sock: socket.socket) -> None:
        try:
            data = sock.recv(16384)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        self._drained[sock] = self._drained.get(sock, 0) + len(data)
        if not data or self._drained[sock] >= _MAX_DRAIN_BYTES:
            self._finish(sock)

    def _finish(self, sock: socket.socket) -> None:
        self._deadlines.pop(sock, None)
        self._drained.pop(sock, None)
        with contextlib.suppress(KeyError, ValueError, OSError):
            self._poller.unregister(sock)
        util.close(sock)


def _abortive(sock: socket.socket) -> bool:
    """Whether the app asked for a reset (gateway.upstream.bodies.Client.cut)."""
    try:
        return sock.getsockopt(socket.SOL_SOCKET, socket.SO_LINGER, len(_ABORTIVE)) == _ABORTIVE
    except OSError:
        return False
