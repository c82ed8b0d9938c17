"""Ending a provider exchange from outside its thread: the client left, or time ran out.

A request thread spends its time blocked on the provider: sending, waiting for the headers,
reading the body. If the client leaves meanwhile, nothing the thread does fails (the first
write after a client left even succeeds), so the provider would go on generating (and
billing) until the answer is complete or `UPSTREAM_READ_TIMEOUT` ends it. And a provider
that drips a non-streamed answer a byte at a time never trips the read timeout at all.

One watcher thread per worker process waits, with epoll, for end-of-file on the client
sockets of the requests in flight, and keeps their deadlines. When either comes, it calls
back with `CLIENT_GONE` or `DEADLINE`, and the exchange shuts its upstream socket down,
which ends whatever the request thread was blocked on. An exchange whose answer has come
whole may instead answer `CLIENT_GONE` with a time: it is read on for its usage, and
ended then (with `DEADLINE`) if it is still going.

A client that closed after sending more than its request (one pipelined byte is enough)
has unread bytes before its end-of-file: readable is then not alive. The peer's FIN is
seen as POLLRDHUP whatever is still unread, and that is what decides; the watcher asks
for nothing else, so bytes a client sends never wake it.

A client socket stays registered from its first watched request until it closes (the
kernel drops a closed socket from the epoll set itself): the next request on a keep-alive
connection is watched with no system call at all, where registering and unregistering
each time cost three (the check below, add, delete), each a hand-off of the GIL under
load. A client that leaves between two requests is seen by the watcher thread, which
forgets the socket, so the next watch on it checks at once as for a new connection.

`end_all()` ends every exchange still watched, as at its deadline: a worker whose drain
is over ends its streams that way (each with its dialect's error event) and exits on time.

Known limit: a client that half-closes its side (shutdown(SHUT_WR)) counts as gone, as
with nginx.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import os
import select
import socket
import ssl
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass

from loguru import logger

Unwatch = Callable[[], None]
# Returns None, or (for CLIENT_GONE) a time.monotonic() at which to end it after all.
OnEnd = Callable[[str], float | None]
CLIENT_GONE = "client_gone"
DEADLINE = "deadline"
# The worker is draining and its time is up: neither the client's doing nor the provider's.
SHUTDOWN = "shutdown"
# The client's end (FIN: RDHUP; a reset: HUP and ERR, always reported), not its bytes: a
# pipelined request stays unread, and only its end matters.
_EVENTS = select.EPOLLRDHUP | select.EPOLLONESHOT
# The longest the thread sleeps: a deadline added while it sleeps is kept at most this late.
_TICK_SECONDS = 0.5


@dataclass
class _Watch:
    on_end: OnEnd
    client: socket.socket | None
    fd: int = -1
    deadline: float | None = None
    active: bool = True


class DisconnectWatcher:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pid: int | None = None
        self._epoll: select.epoll | None = None
        self._by_fd: dict[int, _Watch] = {}
        # The sockets registered in the epoll set (armed), by fd; an fd closed and reused
        # by a new connection names another socket, so the entry is matched by identity.
        # At most one entry per fd number the process has used.
        self._registered: dict[int, weakref.ref[socket.socket]] = {}
        self._deadlines: list[tuple[float, int, _Watch]] = []
        self._stale = 0  # unwatched entries still in the heap
        self._order = itertools.count()

    def watch(
        self, client: socket.socket | None, on_end: OnEnd, deadline: float | None = None
    ) -> Unwatch:
        """Call `on_end(reason)` once if `client` closes, or at `deadline` (time.monotonic()):
        once more, with DEADLINE, at the time `on_end(CLIENT_GONE)` returns, if it returns one.

        A client that has already gone is reported before this returns, on this thread.
        Otherwise `on_end` runs on the watcher thread, under the watcher's lock: it must be
        quick, and it never runs after the returned function has returned.
        """
        if isinstance(client, ssl.SSLSocket):  # peeking needs the plain socket
            client = None
        if client is None and deadline is None:
            return _nothing
        entry = _Watch(on_end, client, client.fileno() if client is not None else -1, deadline)
        epoll = self._epoll_for_this_process()
        if client is not None and not self._watch_registered(entry):
            if _peer_state(client) == "closed":
                on_end(CLIENT_GONE)  # a request that queued while its client gave up
                return _nothing
            self._register(epoll, entry, client)
        if deadline is not None:
            with self._lock:
                heapq.heappush(self._deadlines, (deadline, next(self._order), entry))
        return lambda: self._unwatch(entry)

    def _watch_registered(self, entry: _Watch) -> bool:
        # The connection's socket is still registered (and so still there, as far as the
        # watcher has seen): the entry is all a new request on it needs.
        with self._lock:
            registered = self._registered.get(entry.fd)
            if registered is None or registered() is not entry.client:
                return False
            self._by_fd[entry.fd] = entry
            return True

    def _register(self, epoll: select.epoll, entry: _Watch, client: socket.socket) -> None:
        # No lock around the epoll call: it releases the GIL, and a lock held meanwhile had
        # every other request thread queue behind it. The entry is known before its socket
        # can fire.
        with self._lock:
            self._by_fd[entry.fd] = entry
            self._registered[entry.fd] = weakref.ref(client)
        try:
            epoll.register(entry.fd, _EVENTS)
        except FileExistsError:  # the fd's earlier socket object, same connection
            epoll.modify(entry.fd, _EVENTS)

    def _unwatch(self, entry: _Watch) -> None:
        # The socket stays registered for the connection's next request.
        with self._lock:
            if entry.active and entry.deadline is not None:
                self._forget_deadline()
            entry.active = False
            if self._by_fd.get(entry.fd) is entry:
                del self._by_fd[entry.fd]

    def _forget_deadline(self) -> None:
        # Unwatched deadlines stay in the heap until they reach its top, 15 minutes later
        # for a non-streamed answer: rebuild it once most of it is stale, or it would grow
        # by one entry per request.
        self._stale += 1
        if self._stale > 64 and self._stale * 2 > len(self._deadlines):
            self._deadlines = [item for item in self._deadlines if item[2].active]
            heapq.heapify(self._deadlines)
            self._stale = 0

    def close(self) -> None:
        """Stop watching (the thread ends when its epoll set is closed)."""
        with self._lock:
            if self._epoll is not None and self._pid == os.getpid():
                self._epoll.close()
            self._epoll = None
            self._by_fd = {}
            self._registered = {}
            self._deadlines = []
            self._stale = 0

    def _epoll_for_this_process(self) -> select.epoll:
        # Made lazily by the process that uses it: gunicorn forks workers after loading the
        # app, and neither an epoll set nor a thread survives a fork.
        epoll = self._epoll
        if epoll is not None and self._pid == os.getpid():
            return epoll
        with self._lock:
            if self._epoll is None or self._pid != os.getpid():
                if self._epoll is not None:
                    self._epoll.close()  # the copy inherited from the parent
                self._epoll = select.epoll()
                self._pid = os.getpid()
                self._by_fd = {}
                self._registered = {}
                self._deadlines = []
                self._stale = 0
                thread = threading.Thread(
                    target=self._run, args=(self._epoll,), name="disconnect-watcher", daemon=True
                )
                thread.start()
            return self._epoll

    def _run(self, epoll: select.epoll) -> None:
        while True:
            try:
                events = epoll.poll(self._sleep_seconds())
            except (OSError, ValueError):  # closed by close()
                return
            for fd, _ in events:
                self._guarded(self._check, epoll, fd)
            self._guarded(self._expire, time.monotonic())

    @staticmethod
    def _guarded(step: Callable[..., None], *args: object) -> None:
        try:
            step(*args)
        except Exception:  # noqa: BLE001 - one bad callback must not end the thread
            logger.opt(exception=True).error("disconnect watcher callback failed")

    def _sleep_seconds(self) -> float:
        with self._lock:
            while self._deadlines and not self._deadlines[0][2].active:
                heapq.heappop(self._deadlines)
                self._stale = max(0, self._stale - 1)
            if not self._deadlines:
                return _TICK_SECONDS
            return min(_TICK_SECONDS, max(0.0, self._deadlines[0][0] - time.monotonic()))

    def _check(self, epoll: select.epoll, fd: int) -> None:
        with self._lock:
            registered = self._registered.get(fd)
            client = registered() if registered is not None else None
            # An event polled before its socket was closed here comes after: the socket's
            # fileno() is then -1 (or the fd is another connection's, registered just now).
            if client is not None and client.fileno() == fd and _peer_state(client) != "closed":
                # A false alarm: watch again. OSError: a new connection on this fd is not in
                # the set yet; its own registration, about to come, arms it.
                with contextlib.suppress(OSError):
                    epoll.modify(fd, _EVENTS)
                return
            # Gone, during a request or between two: forgotten, so that a next watch of
            # this socket checks it at once.
            self._registered.pop(fd, None)
            with contextlib.suppress(OSError):  # OSError: closed, so unregistered already
                epoll.unregister(fd)
            entry = self._by_fd.get(fd)
            if entry is not None and entry.client is client and entry.active:
                del self._by_fd[fd]
                self._end(entry, CLIENT_GONE)

    def _expire(self, now: float) -> None:
        with self._lock:
            while self._deadlines and self._deadlines[0][0] <= now:
                _, _, entry = heapq.heappop(self._deadlines)
                if entry.active:
                    self._end(entry, DEADLINE)

    def end_all(self) -> int:
        """End every exchange still watched, now (the worker is shutting down); how many."""
        with self._lock:
            found = {id(e): e for e in self._by_fd.values() if e.active}
            found.update({id(e): e for _, _, e in self._deadlines if e.active})
            for entry in found.values():
                self._end(entry, SHUTDOWN)
            return len(found)

    def _end(self, entry: _Watch, reason: str) -> None:
        entry.active = False
        later = entry.on_end(reason)
        if later is not None and reason == CLIENT_GONE:
            # Read on until `later`: watched as a deadline now (an earlier one still holds).
            entry.active, entry.client, entry.deadline = True, None, later
            heapq.heappush(self._deadlines, (later, next(self._order), entry))


def _peer_state(client: socket.socket) -> str:
    # Poll first: on a socket with a timeout (the worker's write timeout), Python waits for
    # readability before recv() even with MSG_DONTWAIT, which would hold the request here.
    poller = select.poll()
    poller.register(client.fileno(), select.POLLIN | select.POLLRDHUP)
    ready = poller.poll(0)
    if not ready:
        return "idle"
    # The peer's FIN (or a reset), even behind bytes it sent and nobody read: gone. Peeking
    # alone would see those bytes and take the client for alive.
    if ready[0][1] & (select.POLLRDHUP | select.POLLHUP | select.POLLERR):
        return "closed"
    try:
        peeked = client.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return "idle"
    except OSError:
        return "closed"  # reset by the peer
    return "data" if peeked else "closed"


def _nothing() -> None:
    return None
