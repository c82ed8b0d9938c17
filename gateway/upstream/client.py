"""The upstream client: every byte to and from the provider passes through here.

One `UpstreamClient` per app holds one pooled `requests` HTTPAdapter (thread-safe, never
mutated after start-up). Requests go straight to the adapter rather than through a Session:
a shared Session would keep the provider's cookies and hand them to every caller, and its
per-call merging of environment settings is work done once here instead.
"""

from __future__ import annotations

import http.client
import time
from collections.abc import Iterator, Mapping

import requests
import urllib3
from flask import Response, current_app
from loguru import logger
from requests.structures import CaseInsensitiveDict
from werkzeug.datastructures import Headers

from gateway.config import Settings
from gateway.disconnects import CLIENT_GONE, DEADLINE, DisconnectWatcher
from gateway.errors import GatewayError
from gateway.record import RequestRecord
from gateway.upstream.bodies import (
    HEAD_BYTES,
    READ_ERRORS,
    AnswerTooLargeError,
    BodyRelay,
    Client,
    SseRelay,
    pieces,
)
from gateway.upstream.connection import Exchange, RelayAdapter, current_exchange
from gateway.upstream.headers import forwarded, relayable_headers, upstream_request_id
from gateway.upstream.scrub import Scrubber, SecretMask

NO_CLIENT = Client()  # the Flask test client and dev server hand over no socket
_STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class UpstreamClient:
    """Relays requests to one OpenAI-compatible base URL."""

    def __init__(self, settings: Settings) -> None:
        self.base_url = _normalized_url(settings.target_api_url)
        self.timeout = (
            settings.upstream_connect_timeout,
            settings.upstream_read_timeout,
        )
        self.total_timeout = settings.upstream_total_timeout
        self.max_body = settings.max_response_body_bytes
        self.proxies = dict(settings.upstream_proxies)
        self.verify: bool | str = settings.upstream_ca_bundle or True
        self._authorization = f"Bearer {settings.target_api_key}"
        self.mask = SecretMask(settings.upstream_secrets)
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
        client: Client = NO_CLIENT,
    ) -> Response:
        """Send one request upstream and turn its answer into the client's response."""
        if query:  # as the client sent it, still percent-encoded
            path = f"{path}?{query.decode('latin-1')}"
        prepared = self._prepare(method, path, self._headers_for(client_headers, record), body)
        exchange = Exchange()
        # A non-streamed answer has an overall deadline: a provider dripping it byte by
        # byte would never trip the read timeout. A stream may take as long as it streams.
        deadline = None if record.stream else time.monotonic() + self.total_timeout
        # gunicorn hands the client's socket to the app: watched from before the request is
        # sent, so a client that leaves (or left while queued) stops the provider's work.
        exchange.unwatch = self.disconnects.watch(client.socket, exchange.end, deadline)
        try:
            upstream = self._send(prepared, record, exchange)
            return self._answer(upstream, record, exchange, client)
        except BaseException:
            exchange.release()
            raise

    def _send(
        self, prepared: requests.PreparedRequest, record: RequestRecord, exchange: Exchange
    ) -> requests.Response:
        """The provider's status and headers (the body is still to be read), or a GatewayError."""
        if exchange.ended_by is not None:  # never sent: nobody is waiting for the answer
            raise self._translate(None, record, exchange)
        token = current_exchange.set(exchange)
        try:
            upstream = self.adapter.send(
                prepared,
                stream=True,
                timeout=self.timeout,
                verify=self.verify,
                proxies=self.proxies,
            )
        except requests.RequestException as exc:
            raise self._translate(exc, record, exchange) from None
        except ValueError:
            # http.client refuses a header value it could not send (CR, LF, NUL...).
            raise GatewayError(400, "A request header has an invalid value.") from None
        finally:
            current_exchange.reset(token)
        # Sent: a stream must not keep its (up to 10 MB) request body alive as long as it lasts.
        upstream.request = None  # type: ignore[assignment]
        exchange.hold(upstream)
        record.upstream_status = upstream.status_code
        record.upstream_request_id = upstream_request_id(upstream.headers)
        if upstream.is_redirect:
            # Never relayed: a redirect would send the client (and its key) somewhere else.
            record.upstream_error = "redirect"
            raise GatewayError(502, "The upstream answered with a redirect.")
        if (_declared_length(upstream) or 0) > self.max_body:
            raise self._translate(AnswerTooLargeError("declared length"), record, exchange)
        if not _decodable(upstream):
            # Relayed raw without its Content-Encoding, it would be opaque bytes to the
            # client (and unmasked): a coding the gateway never asked for is the provider's bug.
            record.upstream_error = "protocol"
            raise GatewayError(
                502, "The upstream answered in an encoding the gateway cannot decode."
            )
        return upstream

    def _answer(
        self,
        upstream: requests.Response,
        record: RequestRecord,
        exchange: Exchange,
        client: Client,
    ) -> Response:
        headers = relayable_headers(upstream.headers, self.mask)
        status = upstream.status_code
        body = pieces(upstream, self.max_body)
        fail = lambda exc: self._translate(exc, record, exchange, mid_body=True)  # noqa: E731
        if upstream.headers.get("Content-Type", "").startswith("text/event-stream"):
            headers.update(_STREAM_HEADERS)
            record.event_stream = True
            sse = SseRelay(exchange, body, record, Scrubber(self.mask), fail)
            return Response(sse, status=status, headers=headers)
        head, complete = self._read_head(body, record, exchange)
        if not complete:
            rest = BodyRelay(
                exchange,
                head,
                body,
                record=record,
                scrubber=Scrubber(self.mask),
                fail=fail,
                client=client,
                count_usage=upstream.ok,
            )
            return Response(rest, status=status, headers=headers)
        content = self.mask.whole(b"".join(head))
        exchange.release()
        if upstream.ok:
            record.note_usage(content)
        return Response(content, status=status, headers=headers)

    def _read_head(
        self, body: Iterator[bytes], record: RequestRecord, exchange: Exchange
    ) -> tuple[list[bytes], bool]:
        """A short answer read whole (True), or the first HEAD_BYTES of a long one (False)."""
        head: list[bytes] = []
        size = 0
        try:
            for piece in body:
                head.append(piece)
                size += len(piece)
                if size >= HEAD_BYTES:
                    return head, False
        except (*READ_ERRORS, AnswerTooLargeError) as exc:
            raise self._translate(exc, record, exchange) from None
        if exchange.ended_by is not None:  # a close-delimited body, cut by the watcher
            raise self._translate(None, record, exchange)
        return head, True

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
        headers = {k: v for k, v in client_headers.items() if forwarded(k.lower())}
        headers["Authorization"] = self._authorization
        headers["X-Request-ID"] = record.request_id
        # Compressed JSON saves bandwidth to a remote provider; an SSE stream is sent plain so
        # that no decompressor sits between the provider's chunks and the client's.
        headers["Accept-Encoding"] = "identity" if record.stream else "gzip, deflate"
        return headers

    def _translate(
        self,
        exc: Exception | None,
        record: RequestRecord,
        exchange: Exchange,
        mid_body: bool = False,
    ) -> GatewayError:
        """What went wrong with the provider becomes the gateway's 499/502/504, in this place."""
        if exchange.ended_by == CLIENT_GONE:
            record.client_disconnected = True
            return GatewayError(
                499, "The client closed the connection.", code="client_closed_request"
            )
        error = self._upstream_failure(exc, record, exchange, mid_body)
        logger.bind(upstream_error=record.upstream_error).warning(
            "upstream failure: {}: {}", type(exc).__name__, exc
        )
        return error

    def _upstream_failure(
        self, exc: Exception | None, record: RequestRecord, exchange: Exchange, mid_body: bool
    ) -> GatewayError:
        if exchange.ended_by == DEADLINE:
            record.upstream_error = "timeout"
            return GatewayError(
                504, f"The upstream did not complete its answer within {self.total_timeout:g} s."
            )
        if isinstance(exc, AnswerTooLargeError):
            record.upstream_error = "too_large"
            return GatewayError(502, "The upstream's answer is larger than the gateway relays.")
        if isinstance(exc, requests.Timeout) or _caused_by_read_timeout(exc):
            record.upstream_error = "timeout"
            connect = isinstance(exc, requests.ConnectTimeout)
            seconds = self.timeout[0] if connect else self.timeout[1]
            return GatewayError(504, f"The upstream did not answer within {seconds:g} s.")
        if mid_body:
            record.upstream_error = "stream_broken"
            return GatewayError(502, "The upstream closed the stream before it was complete.")
        if isinstance(exc, requests.ConnectionError) and not _protocol_error(exc):
            record.upstream_error = "connect"
            return GatewayError(502, "The upstream could not be reached or closed the connection.")
        record.upstream_error = "protocol"
        return GatewayError(502, "The upstream sent an invalid response.")


def _declared_length(upstream: requests.Response) -> int | None:
    """The body's length as the provider declares it, if that is its decoded length."""
    if upstream.headers.get("Content-Encoding", "identity") != "identity":
        return None
    try:
        return int(upstream.headers.get("Content-Length", ""))
    except ValueError:
        return None


def _decodable(upstream: requests.Response) -> bool:
    codings = upstream.headers.get("Content-Encoding", "identity").lower().split(",")
    known = {"identity", *urllib3.HTTPResponse.CONTENT_DECODERS}
    return all(coding.strip() in known for coding in codings)


def _normalized_url(url: str) -> str:
    """The base URL as requests would send it (IDNA host, quoted path), computed once."""
    prepared = requests.PreparedRequest()
    prepared.prepare_url(url, None)
    return (prepared.url or url).rstrip("/")


def _caused_by_read_timeout(exc: Exception | None) -> bool:
    if isinstance(exc, urllib3.exceptions.ReadTimeoutError):
        return True
    reason = exc.args[0] if exc is not None and exc.args else None
    return isinstance(reason, urllib3.exceptions.ReadTimeoutError)


def _protocol_error(exc: Exception) -> bool:
    """A connection that answered something that is not HTTP (http.client's BadStatusLine)."""
    reason = exc.args[0] if exc.args else None
    cause = reason.args[1] if isinstance(reason, urllib3.exceptions.ProtocolError) else None
    return isinstance(cause, (http.client.BadStatusLine, http.client.LineTooLong))


def upstream_for(model: str | None) -> UpstreamClient:
    """The one place that picks the upstream for a request (model routing goes here)."""
    del model  # a single upstream for now
    return current_app.extensions["gateway.upstream"]
