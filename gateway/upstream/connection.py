"""The pooled connections to the provider, and the exchange that can end one from outside.

Two things stock requests/urllib3 connections do not do, and a multi-tenant relay must:
- Never take an informational answer (`103 Early Hints`, `102`) for the final one.
  http.client skips only `100 Continue`; any other 1xx became "the answer" (with no body)
  while the real one stayed unread on the pooled connection, for the next caller, from any
  key, to receive. `FinalResponse` reads past them, and refuses `101` (nobody asked to
  switch protocols) and statuses above 599: the connection is then discarded.
- Let another thread end the exchange. Each connection hands its socket to the request's
  `Exchange`, so the disconnect watcher can shut it down when the client leaves or the
  deadline passes, whether the thread is sending, waiting for headers or reading the body.
"""

from __future__ import annotations

import contextlib
import http.client
import socket
import threading
import time
from contextvars import ContextVar
from typing import Any

import requests
from requests.adapters import HTTPAdapter
from requests.structures import CaseInsensitiveDict
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from gateway.disconnects import CLIENT_GONE, Unwatch

# A provider may send a few hints; one that sends them without end is broken.
_MAX_INFORMATIONAL = 8
# A body up to this size is sent with the request's head, in one system call: copying it
# once costs less than the second call.
_WITH_HEAD_BYTES = 64 * 1024


class FinalResponse(http.client.HTTPResponse):
    """http.client's response, reading past every informational (1xx) answer."""

    def _read_status(self) -> tuple[str, int, str]:
        for _ in range(_MAX_INFORMATIONAL + 1):
            version, status, reason = super()._read_status()  # type: ignore[misc]
            if status == 101 or status > 599:
                raise http.client.BadStatusLine(f"unexpected status {status}")
            if status >= 200:
                return version, status, reason
            # 100 Continue, 102 Processing, 103 Early Hints...: skip its header block.
            http.client._read_headers(self.fp)  # type: ignore[attr-defined]
        raise http.client.BadStatusLine("too many informational responses")


class Exchange:
    """One request to the provider, from sending it to its last byte, endable from any thread.

    `end()` (the disconnect watcher's callback) shuts the provider socket down, so the
    thread blocked on it wakes with an error; `ended_by` then tells why. A watched answer's
    connection stays out of urllib3's pool until `release()`: urllib3 hands it back at
    the last byte, and a late `end()` would otherwise shut down a connection that another
    request has taken since.

    Once the provider has sent the whole answer (`answered()`), a client that leaves no
    longer ends it at once: the provider has nothing left to generate, only its usage to
    send, so the exchange is read on for a few seconds more and `end` returns when the
    watcher is to end it after all.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._socket: Any = None
        self.ended_by: str | None = None
        self.unwatch: Unwatch = _nothing
        self._response: requests.Response | None = None
        self._pool: Any = None
        self._read_on: float | None = None  # seconds to read on after the client left
        self.cut = False  # the provider socket has been shut down

    def attach(self, sock: Any) -> None:
        with self._lock:
            self._socket = sock
            if self.cut:
                _shut(sock)

    def answered(self, read_on_seconds: float) -> None:
        """The whole answer has come: a client leaving now leaves only the usage to read."""
        with self._lock:
            self._read_on = read_on_seconds

    def end(self, reason: str) -> float | None:
        """End the exchange for `reason`: at once, or (a client gone after the answer) at
        the time returned, by the watcher, if the provider's usage has not come by then."""
        with self._lock:
            if self.ended_by is None:
                self.ended_by = reason
                if reason == CLIENT_GONE and self._read_on is not None:
                    return time.monotonic() + self._read_on
            self.cut = True
            if self._socket is not None:
                _shut(self._socket)
            return None

    def limit_reads(self, seconds: float) -> None:
        """Bound the next reads of the answer to `seconds` each (on the reading thread)."""
        with self._lock:
            if self._socket is not None and not self.cut:
                with contextlib.suppress(OSError, AttributeError, ValueError):
                    self._socket.settimeout(max(0.001, seconds))

    def hold(self, response: requests.Response) -> None:
        raw: Any = response.raw
        self._response = response
        self._pool, raw._pool = getattr(raw, "_pool", None), None

    def release(self) -> None:
        """Stop watching, then give the connection back (or close it if unread)."""
        self.unwatch()
        response, self._response = self._response, None
        if response is None:
            return
        if self._pool is not None:
            response.raw._pool = self._pool
        response.close()


def _shut(sock: Any) -> None:
    # socket.socket's own shutdown, also for an SSLSocket: only the kernel's side is
    # touched, never the TLS state that the request thread is using. Through an HTTPS
    # proxy, TLS runs inside TLS and urllib3's SSLTransport holds the real socket.
    plain = getattr(sock, "socket", sock)
    with contextlib.suppress(OSError, TypeError, ValueError):
        socket.socket.shutdown(plain, socket.SHUT_RDWR)


def _nothing() -> None:
    return None


# The exchange of the request this thread is sending (set by the client around send()).
current_exchange: ContextVar[Exchange | None] = ContextVar("current_exchange", default=None)


def _attach(sock: Any) -> None:
    exchange = current_exchange.get()
    if exchange is not None and sock is not None:
        exchange.attach(sock)


class _Attaching:
    """Reads past 1xx answers; hands the socket to the request's Exchange on connecting and
    on every reuse of a pooled connection; sends a small body with the head (mixed into
    urllib3's two connection classes)."""

    response_class: type[http.client.HTTPResponse] = FinalResponse
    sock: Any
    # The head, held back until the body it goes out with (see request()).
    _held: bytes | None = None
    _hold_head = False

    def connect(self) -> None:
        super().connect()  # type: ignore[misc]
        _attach(self.sock)

    def request(self, *args: Any, **kwargs: Any) -> None:
        _attach(self.sock)  # a pooled connection: already connected
        # http.client sends the head in one send() and urllib3 then the body in another:
        # two system calls, each a GIL hand-off under load, where one does. A body that is
        # one small bytes object (nearly every model request) goes out with its head.
        body = kwargs.get("body")
        self._hold_head = (
            isinstance(body, bytes)
            and 0 < len(body) <= _WITH_HEAD_BYTES
            and not kwargs.get("chunked")
        )
        try:
            super().request(*args, **kwargs)  # type: ignore[misc]
        finally:
            self._hold_head, self._held = False, None

    def send(self, data: Any) -> None:
        if self._hold_head:
            if self._held is None:
                self._held = data  # the head: the body comes next
                return
            data, self._hold_head, self._held = self._held + data, False, None
        super().send(data)  # type: ignore[misc]


class _GatewayConnection(_Attaching, HTTPConnection):
    pass


class _GatewayTLSConnection(_Attaching, HTTPSConnection):
    pass


class _Pool(HTTPConnectionPool):
    ConnectionCls = _GatewayConnection


class _TLSPool(HTTPSConnectionPool):
    ConnectionCls = _GatewayTLSConnection


_POOLS = {"http": _Pool, "https": _TLSPool}


class RelayAdapter(HTTPAdapter):
    """requests' pooled adapter with the connections above and without a cookie jar.

    The stock `build_response` parses every answer's cookies into a jar; the gateway drops
    the provider's cookies anyway, so that work (about 5% of a request's CPU) is skipped.
    """

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = _POOLS

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:
        manager = super().proxy_manager_for(proxy, **proxy_kwargs)
        if not proxy.lower().startswith("socks"):  # SOCKS pools have classes of their own
            manager.pool_classes_by_scheme = _POOLS
        return manager

    def build_response(self, req: requests.PreparedRequest, resp: Any) -> requests.Response:
        response = requests.Response()
        response.status_code = resp.status
        response.headers = CaseInsensitiveDict(resp.headers)
        response.raw = resp
        response.reason = resp.reason
        response.url = req.url or ""
        response.request = req
        response.connection = self
        return response
