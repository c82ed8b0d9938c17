"""The upstream client: every byte to and from the provider passes through here.

One `UpstreamClient` per app holds one pooled `requests` HTTPAdapter (thread-safe, never
mutated after start-up). Requests go straight to the adapter rather than through a Session:
a shared Session would keep the provider's cookies and hand them to every caller, and its
per-call merging of environment settings is work done once here instead.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable, Iterator, Mapping
from functools import partial
from typing import Any

import orjson
import requests
import urllib3
from flask import Response, current_app
from loguru import logger
from requests.adapters import HTTPAdapter
from requests.structures import CaseInsensitiveDict
from werkzeug.datastructures import Headers

from gateway.config import Settings
from gateway.disconnects import DisconnectWatcher, Unwatch
from gateway.errors import GatewayError, error_body
from gateway.record import RequestRecord

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)
# The only client headers sent upstream: an allow-list, because anything else could steer
# the provider account the gateway pays with (OpenAI-Organization, OpenAI-Project,
# X-DashScope-WorkSpace...) or smuggle hop-by-hop and credential headers through.
_FORWARDED_FROM_CLIENT = frozenset({"content-type", "accept", "user-agent", "openai-beta"})
# The openai SDKs' telemetry headers (X-Stainless-Lang, -Retry-Count...): harmless, useful.
_FORWARDED_PREFIXES = ("x-stainless-",)
# Never relayed to the client: framing that no longer matches (requests decoded the body),
# the provider's cookies, and headers the gateway sets itself (request id, CORS, limits).
_DROP_FROM_UPSTREAM = HOP_BY_HOP | {
    "content-length",
    "content-encoding",
    "set-cookie",
    "server",
    "date",
    "x-request-id",
}
_DROP_PREFIXES = ("access-control-", "x-ratelimit-")
_STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
_UPSTREAM_ID_HEADERS = (
    "x-request-id",
    "x-dashscope-request-id",
    "request-id",
    "x-amzn-requestid",
)


class UpstreamClient:
    """Relays requests to one OpenAI-compatible base URL."""

    def __init__(self, settings: Settings) -> None:
        self.base_url = _normalized_url(settings.target_api_url)
        self.timeout = (
            settings.upstream_connect_timeout,
            settings.upstream_read_timeout,
        )
        self.proxies = dict(settings.upstream_proxies)
        self.verify: bool | str = settings.upstream_ca_bundle or True
        self._authorization = f"Bearer {settings.target_api_key}"
        # Pool as large as the thread count: each thread can hold one upstream connection;
        # max_retries=0 because a POST to a model must never be silently sent twice.
        self.adapter = RelayAdapter(
            pool_connections=4,
            pool_maxsize=settings.gunicorn_threads,
            max_retries=0,
            pool_block=False,
        )
        self.disconnects = DisconnectWatcher()

    def close(self) -> None:
        self.adapter.close()
        self.disconnects.close()

    def relay(
        self,
        method: str,
        path: str,
        record: RequestRecord,
        client_headers: Mapping[str, str] | Headers,
        *,
        body: bytes | None = None,
        query: bytes = b"",
        client_socket: socket.socket | None = None,
    ) -> Response:
        """Send one request upstream and turn its answer into the client's response."""
        if query:  # as the client sent it, still percent-encoded
            path = f"{path}?{query.decode('latin-1')}"
        prepared = self._prepare(method, path, self._headers_for(client_headers, record), body)
        upstream = self._send(prepared, record)
        headers = relayable_headers(upstream.headers)
        if upstream.headers.get("Content-Type", "").startswith("text/event-stream"):
            headers.update(_STREAM_HEADERS)
            watch = partial(self.disconnects.watch, client_socket) if client_socket else None
            stream = StreamRelay(upstream, record, self._translate, watch)
            return Response(stream, status=upstream.status_code, headers=headers)
        with upstream:
            try:
                content = upstream.content
            except requests.RequestException as exc:
                raise self._translate(exc, record) from None
        if upstream.ok:
            record.note_usage(content)
        return Response(content, status=upstream.status_code, headers=headers)

    def _send(self, prepared: requests.PreparedRequest, record: RequestRecord) -> requests.Response:
        """The provider's status and headers (the body is still to be read), or a GatewayError."""
        try:
            upstream = self.adapter.send(
                prepared,
                stream=True,
                timeout=self.timeout,
                verify=self.verify,
                proxies=self.proxies,
            )
        except requests.RequestException as exc:
            raise self._translate(exc, record) from None
        except ValueError:
            # http.client refuses a header value it could not send (CR, LF, NUL...).
            raise GatewayError(400, "A request header has an invalid value.") from None
        record.upstream_status = upstream.status_code
        record.upstream_request_id = _upstream_request_id(upstream.headers)
        if upstream.is_redirect:
            # Never relayed: a redirect would send the client (and its key) somewhere else.
            upstream.close()
            record.upstream_error = "redirect"
            raise GatewayError(502, "The upstream answered with a redirect.")
        return upstream

    def _prepare(
        self, method: str, path: str, headers: dict[str, str], body: bytes | None
    ) -> requests.PreparedRequest:
        # Built directly rather than with PreparedRequest.prepare(): the base URL was
        # normalised once at start-up and the path is ours, so re-parsing both on every
        # request (and merging hooks, cookies and auth that a relay never has) is waste.
        prepared = requests.PreparedRequest()
        prepared.method = method
        prepared.url = self.base_url + path
        if body is not None:
            headers["Content-Length"] = str(len(body))
        prepared.headers = CaseInsensitiveDict(headers)
        prepared.body = body
        return prepared

    def _headers_for(
        self, client_headers: Mapping[str, str] | Headers, record: RequestRecord
    ) -> dict[str, str]:
        headers = {k: v for k, v in client_headers.items() if _forwarded(k.lower())}
        headers["Authorization"] = self._authorization
        headers["X-Request-ID"] = record.request_id
        # Compressed JSON saves bandwidth to a remote provider; an SSE stream is sent plain so
        # that no decompressor sits between the provider's chunks and the client's.
        headers["Accept-Encoding"] = "identity" if record.stream else "gzip, deflate"
        return headers

    def _translate(
        self, exc: Exception, record: RequestRecord, mid_stream: bool = False
    ) -> GatewayError:
        """requests' exceptions become the gateway's 502/504, in this one place."""
        timed_out = isinstance(exc, requests.Timeout) or _caused_by_read_timeout(exc)
        if timed_out:
            record.upstream_error = "timeout"
            seconds = (
                self.timeout[0] if isinstance(exc, requests.ConnectTimeout) else self.timeout[1]
            )
            error = GatewayError(504, f"The upstream did not answer within {seconds:g} s.")
        elif mid_stream:
            record.upstream_error = "stream_broken"
            error = GatewayError(502, "The upstream closed the stream before it was complete.")
        elif isinstance(exc, requests.ConnectionError):
            record.upstream_error = "connect"
            error = GatewayError(502, "The upstream could not be reached or closed the connection.")
        else:
            record.upstream_error = "protocol"
            error = GatewayError(502, "The upstream sent an invalid response.")
        logger.bind(upstream_error=record.upstream_error).warning(
            "upstream failure: {}: {}", type(exc).__name__, exc
        )
        return error


class RelayAdapter(HTTPAdapter):
    """requests' pooled adapter without the cookie jar a relay never uses.

    The stock `build_response` parses every answer's cookies into a jar; the gateway drops
    the provider's cookies anyway, so that work (about 5% of a request's CPU) is skipped.
    """

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


def _normalized_url(url: str) -> str:
    """The base URL as requests would send it (IDNA host, quoted path), computed once."""
    prepared = requests.PreparedRequest()
    prepared.prepare_url(url, None)
    return (prepared.url or url).rstrip("/")


class StreamRelay:
    """The body of a streamed answer: the provider's chunks, relayed as they arrive.

    An object rather than a bare generator so that `close()` (called by the WSGI server
    when the client goes away, even before the first chunk) always closes the upstream
    response, and the provider stops generating (and billing) at once.
    """

    def __init__(
        self,
        upstream: requests.Response,
        record: RequestRecord,
        translate: Callable[..., GatewayError],
        watch: Callable[[Callable[[], None]], Unwatch] | None = None,
    ) -> None:
        self._upstream = upstream
        self._record = record
        self._translate = translate
        self._finished = False
        self._client_gone = False
        self._unwatch: Unwatch = _no_watch
        self._pool: Any = None
        if watch is not None:
            self._watch_client(watch)

    def _watch_client(self, watch: Callable[[Callable[[], None]], Unwatch]) -> None:
        """While the provider is silent, a watcher notices the client leaving (disconnects.py).

        The connection stays out of urllib3's pool while watched: urllib3 hands it back at
        the stream's last byte, before close() ends the watch, and a late callback would then
        shut down a connection that another request has taken. close() hands it back.
        """
        raw: Any = self._upstream.raw
        self._pool, raw._pool = getattr(raw, "_pool", None), None
        try:
            self._unwatch = watch(self._on_client_gone)
        except OSError:
            logger.opt(exception=True).warning("cannot watch this client for disconnects")
            raw._pool, self._pool = self._pool, None

    def __iter__(self) -> Iterator[bytes]:
        record = self._record
        try:
            for chunk in _chunks_as_they_arrive(self._upstream):
                if record.ttfb is None:
                    record.ttfb = record.elapsed()
                if b'"usage"' in chunk:
                    record.note_usage(chunk)
                yield chunk
        except (requests.RequestException, urllib3.exceptions.HTTPError) as exc:
            if self._client_gone:  # our own shutdown ended the read; nobody is listening
                return
            error = self._translate(exc, record, mid_stream=True)
            yield b"data: " + orjson.dumps(error_body(error.status, error.message)) + b"\n\n"
        # A close-delimited stream ends "normally" when our shutdown ends its read.
        self._finished = not self._client_gone

    def close(self) -> None:
        self._unwatch()
        if self._pool is not None:
            self._upstream.raw._pool = self._pool
        if not self._finished:
            self._record.client_disconnected = True
        self._upstream.close()

    def _on_client_gone(self) -> None:
        """Called by the watcher thread: end the blocked read and the provider's work now."""
        self._client_gone = True
        # urllib3's shutdown() keeps the socket even where http.client has let go of it
        # (a Connection: close answer); the read then ends and close() closes the socket.
        with contextlib.suppress(OSError, RuntimeError, ValueError):
            self._upstream.raw.shutdown()


def _no_watch() -> None:
    return None


def _chunks_as_they_arrive(upstream: requests.Response) -> Iterator[bytes]:
    """Yield the body as the provider sends it, never waiting to fill a buffer.

    For chunked transfer (what providers use for SSE) that is `iter_content(None)`, one HTTP
    chunk at a time. A stream framed by Content-Length or by closing the connection would
    make `iter_content` wait for a full buffer, so it is read with `read1` instead.
    """
    raw: Any = upstream.raw
    if raw.chunked:
        yield from upstream.iter_content(chunk_size=None)
        return
    while True:
        chunk = raw.read1(65536, decode_content=True)
        if not chunk:
            return
        yield chunk


def _caused_by_read_timeout(exc: Exception) -> bool:
    if isinstance(exc, urllib3.exceptions.ReadTimeoutError):
        return True
    reason = exc.args[0] if exc.args else None
    return isinstance(reason, urllib3.exceptions.ReadTimeoutError)


def _forwarded(lowered_name: str) -> bool:
    return lowered_name in _FORWARDED_FROM_CLIENT or lowered_name.startswith(_FORWARDED_PREFIXES)


def relayable_headers(headers: Mapping[str, str]) -> dict[str, str]:
    # Headers the provider names in its Connection header are hop-by-hop too (RFC 9110 7.6.1).
    listed = {name.strip().lower() for name in headers.get("Connection", "").split(",")}
    kept = {}
    for name, value in headers.items():
        lowered = name.lower()
        if lowered in _DROP_FROM_UPSTREAM or lowered in listed:
            continue
        if not lowered.startswith(_DROP_PREFIXES):
            kept[name] = value
    return kept


def _upstream_request_id(headers: Mapping[str, str]) -> str | None:
    for name in _UPSTREAM_ID_HEADERS:
        if value := headers.get(name):
            return value[:128]
    return None


def upstream_for(model: str | None) -> UpstreamClient:
    """The one place that picks the upstream for a request (model routing goes here)."""
    del model  # a single upstream for now
    return current_app.extensions["gateway.upstream"]
