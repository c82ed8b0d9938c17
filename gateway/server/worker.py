"""`GatewayThreadWorker`: gunicorn's gthread worker, guarded so one process holds thousands of
streams without a thread ever waiting on a client that is not sending or not reading.

gthread serves one request per pool thread, and a stream holds its thread to its last byte.
On top of that, this worker:

1. Reads every request head on the main loop, non-blocking (new and kept-alive connections
   alike), within CLIENT_HEADER_TIMEOUT and gunicorn's size limits; only a complete head
   is handed to a thread, its bytes seeded into the connection's parser. An idle or
   header-dripping client never holds a thread (stock gthread blocks one ~5 s per silent
   connection, and as long as a dripper likes).
2. Answers GET /health and GET /ready on the main loop (see probes.py), and GET /metrics
   on a thread of its own (scrapes.py): they never queue behind busy threads.
3. Bounds the queue: while more requests are in flight than threads, one that no thread
   has started after QUEUE_TIMEOUT is cancelled and answered 503 with Retry-After,
   instead of waiting without bound. Threads start at boot (threads.py).
4. Bounds every blocking socket operation of a request thread by CLIENT_WRITE_TIMEOUT: a
   stream client that stops reading is dropped, and closing the response closes the
   provider connection (StreamRelay.close).
5. Lingers on closing sockets on the poller, not blocking the main loop (lingering.py).
6. Closes its listening socket when it stops accepting on SIGTERM, so new connections are
   refused at once instead of hanging through the drain (the arbiter closed its copy).
7. Writes gunicorn's own rejections (400, 414, 431...) as OpenAI-shaped JSON (replies.py).
8. Reports its boot to the master (handover.py): a reload's old workers serve until it is
   ready, and stay if it cannot boot.
9. Drains within graceful_timeout (draining.py): no new request once draining, streams
   still open near the end get their error event, and the worker exits on time.
10. Counts the load it sheds (503s, 408s, 431s, dropped clients) in the app's metrics
    (shedding.py): the app never sees those requests.
"""

from __future__ import annotations

import contextlib
import errno
import os
import selectors
import socket
import sys
import time
from collections import deque
from concurrent import futures
from functools import partial
from typing import Any

from gunicorn import http, util
from gunicorn.http.body import LengthReader
from gunicorn.http2 import negotiation
from gunicorn.workers.gthread import STOP_KEEPALIVE_LINGER, TConn, ThreadWorker

from gateway import logs
from gateway.config import Settings
from gateway.server import shedding
from gateway.server.draining import Drain, draining_reply, end_streams, leave_now
from gateway.server.handover import report_boot_failure, report_ready
from gateway.server.heads import (
    Head,
    head_state,
    is_inline_probe,
    is_metrics_scrape,
    max_head_bytes,
)
from gateway.server.lingering import Lingering
from gateway.server.probes import render_probe
from gateway.server.replies import busy_reply, error_reply, send_now, write_openai_error
from gateway.server.scrapes import ScrapeThread, scrape_busy_reply
from gateway.server.sending import Sending
from gateway.server.threads import thread_pool

# Connections accepted per poll at most, so that heads already read are not starved. With
# several workers on one listening socket, one at a time: every worker wakes for a new
# connection, and the first to run would take a whole burst of keep-alive connections (all
# 64 of a load generator's, measured), leaving the other workers idle for their lifetime.
_ACCEPT_BATCH = 64
_ACCEPT_BATCH_SHARED = 1
# One recv() of a head: most heads arrive whole; bytes past the head are handed on.
_RECV_BYTES = 65536


class GatewayConn(TConn):
    """A client connection, carrying its head while the main loop reads it."""

    def __init__(self, worker: GatewayThreadWorker, sock: socket.socket, client: Any, server: Any):
        super().__init__(worker.cfg, sock, client, server)
        self.head = bytearray()
        self.head_deadline = 0.0
        self._write_timeout = worker.settings.client_write_timeout
        self._linger = worker.lingering.close

    def init(self) -> None:
        super().init()
        # Runs in the request thread for every request, after gthread made the socket
        # blocking: each recv and sendall is bounded, so a client that stops reading cannot
        # hold the thread in sendall() forever.
        self.sock.settimeout(self._write_timeout)

    def close(self, graceful: bool = False) -> None:
        if graceful:
            self._linger(self.sock)
        else:
            util.close(self.sock)


class GatewayThreadWorker(ThreadWorker):
    settings: Settings
    lingering: Lingering
    sending: Sending
    scrapes: ScrapeThread
    count_shed: shedding.ShedCounter

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.max_head = max_head_bytes(self.cfg)
        # Connections whose head is being read; insertion order is deadline order.
        self.reading: dict[GatewayConn, None] = {}
        # Submitted requests, oldest first: (deadline to start, future, connection).
        self.waiting: deque[tuple[float, futures.Future[Any], GatewayConn]] = deque()
        # Submitted and not finished (main loop only): more than `threads` means some wait.
        self.in_flight = 0
        # 503s answered since the last log line about them, and when that line was.
        self.refused = 0
        self.refused_logged_at = 0.0
        self.drain: Drain | None = None
        self.booted_accepting = False

    def init_process(self) -> None:
        # Only this worker process is affected: it answers every HTTP client through this.
        util.write_error = write_openai_error
        try:
            super().init_process()
        except Exception as error:
            if self.booted:
                raise
            # Could not boot (its threads do not fit, typically): the master decides, once,
            # what that means (handover.py). os._exit: the threads already started wait on
            # their start barrier, and a normal exit would wait for them.
            report_boot_failure(f"{type(error).__name__}: {error}")
            os._exit(0)

    def get_thread_pool(self) -> futures.ThreadPoolExecutor:
        pool = thread_pool(self.cfg.threads, alive=self.notify)
        # Beside the request threads and like them, started before the boot is reported.
        self.scrapes = ScrapeThread()
        return pool

    def run(self) -> None:
        # The app is loaded by now (preload_app): its settings are the gateway's settings.
        self.settings = self.wsgi.extensions["gateway.settings"]
        logs.write_in_background()
        sys.setswitchinterval(self.settings.gil_switch_interval)
        self.count_shed = shedding.shed_counter(self.wsgi)
        self.lingering = Lingering(self.poller)
        stalled = partial(self.count_shed, shedding.SLOW_CLIENT)
        self.sending = Sending(self.poller, self.settings.client_write_timeout, stalled)
        try:
            super().run()
        finally:
            self.scrapes.shutdown()
        if self.in_flight:  # gthread's graceful_timeout passed with threads still busy
            leave_now(self.log, self.pid, self.in_flight)

    def set_accept_enabled(self, enabled: bool) -> None:
        first = enabled and not self.booted_accepting
        super().set_accept_enabled(enabled)
        if first:
            self.booted_accepting = True
            report_ready()
        if not enabled and not self.alive:
            for listener in self.sockets:
                listener.close()

    def accept(self, listener: socket.socket) -> None:
        # Drain the backlog, not one connection per poll: under load every trip through
        # the poller costs the main loop a wait for the GIL.
        batch = _ACCEPT_BATCH if self.cfg.workers == 1 else _ACCEPT_BATCH_SHARED
        for _ in range(batch):
            if self.nr_conns >= self.worker_connections or not self._accept_one(listener):
                return

    def _accept_one(self, listener: socket.socket) -> bool:
        try:
            client_sock, client_addr = listener.accept()
        except OSError as e:
            if e.errno in (errno.EMFILE, errno.ENFILE):
                # Out of file descriptors: gthread would crash, dropping every stream. Hold
                # what is open and accept again only below it.
                self.worker_connections = max(1, self.nr_conns - 1)
                self.log.error(
                    "out of file descriptors at %d connections: accepting at most %d; "
                    "raise the open-files limit (ulimit -n)",
                    self.nr_conns,
                    self.worker_connections,
                )
            elif e.errno not in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                raise
            return False
        self.nr_conns += 1
        self.enqueue_req(GatewayConn(self, client_sock, client_addr, listener.getsockname()))
        return True

    # -- heads, read on the main loop ---------------------------------------------------

    def enqueue_req(self, conn: GatewayConn) -> None:
        """Where gthread hands a connection to a thread: read its head here first."""
        if self.cfg.is_ssl or negotiation.prior_knowledge_allowed(self.cfg, conn.client):
            self._submit(conn)  # TLS and h2c need their handshake first: gthread's own path
            return
        if conn.parser is None:
            conn.parser = http.get_parser(self.cfg, conn.sock, conn.client)
        # A pipelined request may already sit, whole or in part, in the parser's buffer.
        conn.head = bytearray(conn.parser.unreader.take_buffered())
        conn.head_deadline = time.monotonic() + self.settings.client_header_timeout
        if not self.alive:
            conn.head_deadline = min(conn.head_deadline, time.monotonic() + STOP_KEEPALIVE_LINGER)
        conn.sock.setblocking(False)
        # Most clients send their request with the connection, and a kept-alive one is here
        # because it is readable: read at once, and wait on the poller only for the rest.
        if self._head_done(conn) or not self._receive(conn):
            return
        self.reading[conn] = None
        self.poller.register(conn.sock, selectors.EVENT_READ, partial(self._on_head, conn))

    def _on_head(self, conn: GatewayConn, _sock: socket.socket) -> None:
        self._receive(conn)

    def _receive(self, conn: GatewayConn) -> bool:
        """Read what the client sent; True while its head is still incomplete."""
        try:
            data = conn.sock.recv(_RECV_BYTES)
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            data = b""
        if not data:  # closed (or reset) before the request was complete
            self._stop_reading(conn)
            self._finish(conn, keep_alive=False)
            return False
        conn.head += data
        return not self._head_done(conn)

    def _head_done(self, conn: GatewayConn) -> bool:
        state = head_state(conn.head, self.max_head)
        if state is Head.INCOMPLETE:
            return False
        self._stop_reading(conn)
        if state is Head.TOO_LARGE:
            message = "The request's headers are too large."
            send_now(conn.sock, error_reply(431, "Request Header Fields Too Large", message))
            self.count_shed(shedding.HEADER_TOO_LARGE)
            self._finish(conn, keep_alive=False)
            return True
        head = bytes(conn.head)
        conn.head = bytearray()
        conn.parser.unreader.unread(head)
        conn.data_ready = True  # gthread's thread must not wait for data again
        if is_inline_probe(head):
            self._answer_probe(conn)
        elif is_metrics_scrape(head):
            self._scrape(conn)
        elif not self.alive:  # draining: no new request (see draining.py)
            send_now(conn.sock, draining_reply())
            self.count_shed(shedding.DRAINING)
            self._finish(conn, keep_alive=False)
        else:
            self._submit(conn)
        return True

    def _stop_reading(self, conn: GatewayConn) -> None:
        if conn in self.reading:
            del self.reading[conn]
            with contextlib.suppress(KeyError, ValueError, OSError):
                self.poller.unregister(conn.sock)

    def _expire_heads(self, now: float) -> None:
        while self.reading:
            conn = next(iter(self.reading))
            if conn.head_deadline > now:
                return
            self._stop_reading(conn)
            if conn.head:  # a client part-way through its head learns why it is dropped
                message = (
                    f"The request head did not arrive within "
                    f"{self.settings.client_header_timeout:g} s."
                )
                send_now(conn.sock, error_reply(408, "Request Timeout", message))
                self.count_shed(shedding.HEADER_TIMEOUT)
            self._finish(conn, keep_alive=False)

    def _cap_keepalive(self, deadline: float) -> None:
        # gthread calls this once, as its drain starts. Heads being read get as long as
        # kept-alive connections, no longer.
        super()._cap_keepalive(deadline)
        for conn in self.reading:
            conn.head_deadline = min(conn.head_deadline, deadline)
        if self.drain is None:
            self._start_drain()

    def _start_drain(self) -> None:
        """No new request from now on: idle connections are closed at once."""
        self.drain = Drain(self.cfg.graceful_timeout, time.monotonic())
        idle = len(self.keepalived_conns)
        self.murder_keepalived(force=True)
        for conn in [c for c in self.reading if not c.head]:
            self._stop_reading(conn)
            self._finish(conn, keep_alive=False)
            idle += 1
        self.log.info(
            "draining: %d idle connection(s) closed, %d request(s) in flight have until "
            "graceful_timeout (%g s)",
            idle,
            self.in_flight,
            self.cfg.graceful_timeout,
        )

    def finish_request(self, conn: Any, fs: futures.Future[Any]) -> None:
        # Draining: a connection is never kept for another request, which this worker
        # (retired by a reload: old keys, old routes) must not serve.
        if not self.alive and _kept_alive(fs):
            fs = futures.Future()
            fs.set_result(False)
        super().finish_request(conn, fs)

    # -- probes, answered on the main loop ----------------------------------------------

    def _answer_probe(self, conn: GatewayConn) -> None:
        try:
            req = next(conn.parser)  # from the bytes already read: no socket read
            keep_alive = self.alive and bool(self.cfg.keepalive)
            reply, keep_alive = render_probe(
                self.wsgi, self.cfg, req, conn.client, conn.server, keep_alive=keep_alive
            )
        except Exception as exc:  # noqa: BLE001 - as gthread: gunicorn's own error answer
            self.handle_error(None, conn.sock, conn.client, exc)
            self._finish(conn, keep_alive=False)
            return
        self._finish(conn, keep_alive=send_now(conn.sock, reply) and keep_alive)

    # -- scrapes, rendered on their own thread -----------------------------------------

    def _scrape(self, conn: GatewayConn) -> None:
        if self.scrapes.full():
            send_now(conn.sock, scrape_busy_reply())
            self.count_shed(shedding.SCRAPE_BUSY)
            self._finish(conn, keep_alive=False)
            return
        keep_alive = self.alive and bool(self.cfg.keepalive)
        self.scrapes.submit(
            partial(self._render_scrape, conn, keep_alive),
            lambda done: self.method_queue.defer(self._scraped, conn, done),
        )

    def _render_scrape(self, conn: GatewayConn, keep_alive: bool) -> tuple[bytes, bool]:
        """On the scrape thread: the main loop leaves `conn` alone until `_scraped`."""
        req = next(conn.parser)  # from the bytes already read: no socket read
        return render_probe(
            self.wsgi, self.cfg, req, conn.client, conn.server, keep_alive=keep_alive
        )

    def _scraped(self, conn: GatewayConn, done: futures.Future[tuple[bytes, bool]]) -> None:
        self.scrapes.ended()
        error = None if done.cancelled() else done.exception()
        if done.cancelled() or error is not None:
            if error is not None:  # as gthread: gunicorn's own error answer
                self.handle_error(None, conn.sock, conn.client, error)
            self._finish(conn, keep_alive=False)
            return
        reply, keep_alive = done.result()
        self.sending.send(
            conn.sock, reply, lambda sent: self._finish(conn, keep_alive=sent and keep_alive)
        )

    def _finish(self, conn: GatewayConn, *, keep_alive: bool) -> None:
        """gthread's own end of a request: keep the connection alive, or close it."""
        done: futures.Future[Any] = futures.Future()
        done.set_result(keep_alive)
        self.finish_request(conn, done)

    # -- the bounded queue ----------------------------------------------------------------

    def _submit(self, conn: GatewayConn) -> None:
        future = self.tpool.submit(self.handle, conn)
        self.in_flight += 1
        future.add_done_callback(lambda done: self.method_queue.defer(self._ended, conn, done))
        self.waiting.append((time.monotonic() + self.settings.queue_timeout, future, conn))

    def _ended(self, conn: GatewayConn, done: futures.Future[Any]) -> None:
        self.in_flight -= 1
        self.finish_request(conn, done)

    def _expire_waiting(self, now: float) -> None:
        while self.waiting:
            deadline, future, conn = self.waiting[0]
            if not (future.running() or future.done()) and deadline > now:
                return
            self.waiting.popleft()
            # Not started, yet no more requests than threads: a thread is free and only the
            # CPU is late (a burst of streams starting at once). That one is served.
            if self.in_flight <= self.cfg.threads:
                continue
            # cancel() only succeeds for work no thread has started; gthread's
            # finish_request then closes the connection (a cancelled future means "close").
            if future.cancel():
                send_now(conn.sock, busy_reply(self.settings.queue_timeout))
                self.count_shed(shedding.QUEUE_TIMEOUT)
                self.refused += 1

    def _log_refusals(self, now: float) -> None:
        # One line a second at most: under overload, a line per refusal would have the
        # main loop wait on the log sink (and on the GIL behind the threads writing to it).
        if self.refused and now - self.refused_logged_at >= 1.0:
            self.log.warning(
                "no free thread for %.3g s: answered 503 to %d request(s)",
                self.settings.queue_timeout,
                self.refused,
            )
            self.refused = 0
            self.refused_logged_at = now

    # -- the loop -------------------------------------------------------------------------

    def wait_for_and_dispatch_events(self, timeout: float) -> None:
        super().wait_for_and_dispatch_events(min(timeout, self._until_next_deadline()))
        now = time.monotonic()
        self._expire_heads(now)
        self._expire_waiting(now)
        self.lingering.expire(now)
        self.sending.expire(now)
        self._log_refusals(now)
        if self.drain is not None:
            self._bound_drain(self.drain, now)

    def _bound_drain(self, drain: Drain, now: float) -> None:
        if not drain.streams_ended and now >= drain.end_streams_at:
            drain.streams_ended = True
            ended = end_streams(self.wsgi)
            if self.in_flight:
                self.log.warning(
                    "graceful_timeout (%g s) is ending: %d request(s) still in flight end "
                    "now (%d provider exchange(s) ended, streams with an error event)",
                    drain.graceful_timeout,
                    self.in_flight,
                    ended,
                )
        elif drain.streams_ended and now >= drain.leave_at and self.in_flight:
            leave_now(self.log, self.pid, self.in_flight)

    def _until_next_deadline(self) -> float:
        deadlines = [self.lingering.next_deadline(), self.sending.next_deadline()]
        if self.reading:
            deadlines.append(next(iter(self.reading)).head_deadline)
        if self.waiting:
            deadlines.append(self.waiting[0][0])
        if self.drain is not None:
            deadlines.append(self.drain.next_deadline())
        soonest = min((d for d in deadlines if d is not None), default=None)
        return 1.0 if soonest is None else max(0.0, soonest - time.monotonic())

    # -- request threads ------------------------------------------------------------------

    def _keepalive_after(self, conn: GatewayConn, keepalive: bool) -> bool:
        # gthread drains what the app left of the body before keeping the connection, and
        # sets the socket's timeout around the drain and back (two system calls, each a
        # GIL hand-off) even when nothing is left, as after nearly every request.
        if keepalive and _body_read_whole(conn.parser):
            return True
        return bool(super()._keepalive_after(conn, keepalive))

    def handle_request(self, req: Any, conn: GatewayConn) -> bool:
        try:
            return bool(super().handle_request(req, conn))
        except TimeoutError:
            # gthread has closed the response by now, and StreamRelay.close() its upstream.
            self.count_shed(shedding.SLOW_CLIENT)
            self.log.warning(
                "client %s stopped reading (or sending) for %.3g s: connection dropped",
                conn.client,
                self.settings.client_write_timeout,
            )
            return False


def _body_read_whole(parser: Any) -> bool:
    """Whether the request body was read to its last byte: gthread's drain has nothing to do."""
    body: Any = getattr(parser.mesg, "body", None)
    if body is None or not isinstance(body.reader, LengthReader):
        return False  # chunked, or to the end of the stream: gthread drains it
    return body.reader.length == 0 and body.buf.tell() == 0 and not body.failed


def _kept_alive(fs: futures.Future[Any]) -> bool:
    """Whether gthread would keep the connection for another request after `fs`."""
    return fs.done() and not fs.cancelled() and fs.exception() is None and bool(fs.result())
