"""Noticing, at once, a client that leaves a stream while the provider is silent.

A request thread relaying a stream spends its time blocked reading from the provider. If
the client leaves while a reasoning model thinks for minutes, nothing is written, so
nothing fails: the provider would go on generating (and billing) until its next chunk,
and even then the first write after the client left still succeeds. One watcher thread per
worker process waits for end-of-file on the client sockets of the streams in flight and
calls back, and the stream shuts its upstream socket down, which ends the blocked read.

Known limits: a client that half-closes its side (shutdown(SHUT_WR)) counts as gone, as
with nginx; and a client that leaves before the provider's first byte is noticed at it.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import ssl
import threading
from collections.abc import Callable

from loguru import logger

Unwatch = Callable[[], None]
_EVENTS = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLONESHOT


class DisconnectWatcher:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pid: int | None = None
        self._epoll: select.epoll | None = None
        self._watched: dict[int, tuple[socket.socket, Callable[[], None]]] = {}

    def watch(self, client: socket.socket, on_disconnect: Callable[[], None]) -> Unwatch:
        """Call `on_disconnect` if `client` closes before the returned function is called.

        `on_disconnect` runs on the watcher thread, under the watcher's lock: it must be
        quick, and it never runs after the returned function has returned.
        """
        if isinstance(client, ssl.SSLSocket):  # peeking needs the plain socket
            return _nothing
        fd = client.fileno()
        with self._lock:
            epoll = self._epoll_for_this_process()
            epoll.register(fd, _EVENTS)
            self._watched[fd] = (client, on_disconnect)

        def unwatch() -> None:
            with self._lock:
                # OSError: the fd is already closed, and so already unregistered.
                if self._watched.pop(fd, None) is not None:
                    with contextlib.suppress(OSError):
                        epoll.unregister(fd)

        return unwatch

    def close(self) -> None:
        """Stop watching (the thread ends when its epoll set is closed)."""
        with self._lock:
            if self._epoll is not None and self._pid == os.getpid():
                self._epoll.close()
            self._epoll = None
            self._watched = {}

    def _epoll_for_this_process(self) -> select.epoll:
        # Made lazily by the process that uses it: gunicorn forks workers after loading the
        # app, and neither an epoll set nor a thread survives a fork.
        if self._epoll is None or self._pid != os.getpid():
            if self._epoll is not None:
                self._epoll.close()  # the copy inherited from the parent
            self._epoll = select.epoll()
            self._pid = os.getpid()
            self._watched = {}
            thread = threading.Thread(
                target=self._run, args=(self._epoll,), name="disconnect-watcher", daemon=True
            )
            thread.start()
        return self._epoll

    def _run(self, epoll: select.epoll) -> None:
        while True:
            try:
                events = epoll.poll()
            except (OSError, ValueError):  # closed by close()
                return
            for fd, _ in events:
                try:
                    self._check(epoll, fd)
                except Exception:  # noqa: BLE001 - one bad callback must not end the thread
                    logger.opt(exception=True).error("disconnect watcher callback failed")

    def _check(self, epoll: select.epoll, fd: int) -> None:
        with self._lock:
            watched = self._watched.get(fd)
            if watched is None:
                return
            state = _peer_state(watched[0])
            if state == "closed":
                del self._watched[fd]
                with contextlib.suppress(OSError):
                    epoll.unregister(fd)
                watched[1]()
            elif state == "idle":  # a false alarm: watch again
                epoll.modify(fd, _EVENTS)
            # "data": the client sent more (a pipelined request); stop watching it rather
            # than wake up for the same bytes again and again.


def _peer_state(client: socket.socket) -> str:
    try:
        peeked = client.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return "idle"
    except OSError:
        return "closed"  # reset by the peer
    return "data" if peeked else "closed"


def _nothing() -> None:
    return None
