"""The upstream client: every byte to and from the provider passes through here.

One `UpstreamClient` per app holds one pooled `requests` HTTPAdapter (thread-safe, never
mutated after start-up). Requests go straight to the adapter rather than through a Session:
a shared Session would keep the provider's cookies and hand them to every caller, and its
per-call merging of environment settings is work done once here instead.
"""

from __future__ import annotations

import http.client
import itertools
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import requests
import urllib3
from flask import Response, current_app
from loguru import logger
from requests.structures import CaseInsensitiveDict
from werkzeug.datastructures import Headers

from gateway.config import Settings
from gateway.disconnects import CLIENT_GONE, DEADLINE, SHUTDOWN, DisconnectWatcher
from gateway.errors import GatewayError
from gateway.record import RequestRecord
from gateway.upstream.attempts import Attempts, Verdict
from gateway.upstream.bodies import (
    HEAD_BYTES,
    READ_ERRORS,
    AnswerTooLargeError,
    BodyRelay,
    Client,
)
from gateway.upstream.connection import Exchange, RelayAdapter, current_exchange
from gateway.upstream.dialect import AnswerShape, Dialect, Leg, as_chunk
from gateway.upstream.headers import forwarded, relayable_headers, upstream_request_id
from gateway.upstream.providers import (
    AttemptObserver,
    NoObserver,
    Target,
    is_stream,
)
from gateway.upstream.router import Plan, Router
from gateway.upstream.scrub import Scrubber, SecretMask
from gateway.upstream.sse import EventTooLargeError
from gateway.upstream.streams import SseRelay, TranslatedSseRelay

# A non-streamed answer is translated whole: held whole, so held to less than the relay
# limit (a provider's 256 MB answer would be 256 MB per thread).
MAX_TRANSLATED_ANSWER_BYTES = 32 * 1024 * 1024
NO_CLIENT = Client()  # the Flask test client and dev server hand over no socket
_STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class UpstreamClient:
    """Relays requests to the providers, trying a plan's deployments until one answers."""

    def __init__(
        self,
        settings: Settings,
        router: Router | None = None,
        observer: AttemptObserver | None = None,
    ) -> None:
        self.router = router or Router(settings)
        self.observer = observer or NoObserver()
        self.targets: Mapping[str, Target] = {
            p.name: Target.of(p, settings) for p in settings.providers
        }
        self.total_timeout = settings.upstream_total_timeout
        self.max_body = settings.max_response_body_bytes
        self.verify: bool | str = settings.upstream_ca_bundle or True
        # Every provider's key (and proxy password) is masked in every answer: provider A
        # could echo a key it should never have seen, or one that leaked to it some day.
        self.mask = SecretMask(settings.upstream_secrets)
        # Pool as large as the thread count: each thread can hold one upstream connection;
        # max_retries=0 because a POST to a model must never be silently sent twice.
        self.adapter = RelayAdapter(
            pool_connections=max(4, len(self.targets)),
            pool_maxsize=settings.gunicorn_threads,
            max_retries=0,
            pool_block=False,
        )
        self.disconnects = DisconnectWatcher()
        self.attempts = Attempts(self)

    def close(self) -> None:
        self.adapter.close()
        self.disconnects.close()

    def send(
        self,
        prepared: requests.PreparedRequest,
        record: RequestRecord,
        exchange: Exchange,
        target: Target,
    ) -> requests.Response:
        """The provider's status and headers (the body is still to be read), or a GatewayError."""
        if exchange.ended_by is not None:  # never sent: nobody is waiting for the answer
            raise self._translate(None, record, exchange)
        token = current_exchange.set(exchange)
        try:
            upstream = self.adapter.send(
                prepared,
                stream=True,
                timeout=target.timeout,
                verify=self.verify,
                proxies=dict(target.proxies),
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

    def answer(
        self,
        upstream: requests.Response,
        body: Iterator[bytes],
        record: RequestRecord,
        exchange: Exchange,
        *,
        client: Client,
        verdict: Verdict,
        head_read: tuple[list[bytes], bool] | None = None,
        leg: Leg | None = None,
    ) -> Response:
        """The provider's answer relayed; `verdict` is told how the relaying went (a stream
        broken mid-body is its deployment's failure too), unless it was given already.
        With a `shape`, the answer is translated into the client's dialect on the way."""
        headers = relayable_headers(upstream.headers, self.mask)
        status = upstream.status_code
        shape = leg.shape if leg is not None else None
        on_first = leg.on_first if leg is not None and upstream.ok else None
        counts_usage = upstream.ok and (leg is None or leg.counts_usage)

        def fail(exc: Exception | None) -> GatewayError:
            error = self._translate(exc, record, exchange, mid_body=True)
            if error.status != 499 and exchange.ended_by != SHUTDOWN:
                # the provider's failure, not the client leaving or the worker stopping
                verdict.failed(record.upstream_error or "stream_broken")
            return error

        if is_stream(upstream) and (shape is None or upstream.ok):
            headers.update(_STREAM_HEADERS)
            record.event_stream = True
            chunks = itertools.chain(head_read[0], body) if head_read else body
            if on_first is not None and head_read:
                on_first(b"".join(head_read[0]))
            scrubber = Scrubber(self.mask)
            if shape is not None:
                translated = TranslatedSseRelay(
                    exchange,
                    chunks,
                    record,
                    scrubber,
                    fail,
                    translator=shape.stream(),
                    ended=verdict.succeeded,
                )
                return Response(translated, status=status, headers=headers)
            sse = SseRelay(
                exchange,
                chunks,
                record,
                scrubber,
                fail,
                ended=verdict.succeeded,
                error_event=leg.stream_error if leg is not None else None,
            )
            return Response(sse, status=status, headers=headers)
        if shape is not None:
            return self._translated(
                upstream,
                body,
                record,
                exchange,
                verdict=verdict,
                head_read=head_read,
                shape=shape,
                leg_counts_usage=counts_usage,
            )
        try:
            head, complete = head_read or self.read_head(body, record, exchange)
        except GatewayError as error:
            if error.status != 499:
                verdict.failed(record.upstream_error or "protocol")
            raise
        if on_first is not None:
            on_first(b"".join(head[:1]))
        if not complete:
            rest = BodyRelay(
                exchange,
                head,
                body,
                record=record,
                scrubber=Scrubber(self.mask),
                fail=fail,
                ended=verdict.succeeded,
                client=client,
                count_usage=counts_usage,
            )
            return Response(rest, status=status, headers=headers)
        content = self.mask.whole(b"".join(head))
        exchange.release()
        verdict.succeeded()
        if counts_usage:
            record.note_usage(content)
        return Response(content, status=status, headers=headers)

    def _translated(
        self,
        upstream: requests.Response,
        body: Iterator[bytes],
        record: RequestRecord,
        exchange: Exchange,
        *,
        verdict: Verdict,
        head_read: tuple[list[bytes], bool] | None,
        shape: AnswerShape,
        leg_counts_usage: bool = True,
    ) -> Response:
        """A whole answer read (at most MAX_TRANSLATED_ANSWER_BYTES), then translated."""
        try:
            head, complete = head_read or self.read_head(body, record, exchange)
            if not complete:
                rest, complete = self.read_head(
                    body, record, exchange, limit=MAX_TRANSLATED_ANSWER_BYTES
                )
                head.extend(rest)
            if not complete:
                raise self._translate(AnswerTooLargeError("to translate"), record, exchange)
        except GatewayError as error:
            if error.status != 499:
                verdict.failed(record.upstream_error or "protocol")
            raise
        content = self.mask.whole(b"".join(head))
        exchange.release()
        status = upstream.status_code
        if not upstream.ok:
            verdict.succeeded()
            return _json(shape.error(status, content), status, upstream, self.mask)
        if leg_counts_usage:
            record.note_usage(content)
        try:
            if record.stream:  # a provider that ignored `stream`: the client still gets one
                stream = shape.stream()
                translated = b"".join(
                    [stream.feed(as_chunk(content)), stream.feed(b"[DONE]"), stream.finish()]
                )
            else:
                translated = shape.answer(content)
        except ValueError:
            verdict.failed("protocol")
            record.upstream_error = "protocol"
            raise GatewayError(
                502, "The upstream sent an answer the gateway could not read."
            ) from None
        verdict.succeeded()
        # Masked again: a translator decodes what the provider escaped (a key sent as
        # "\\u0073k-..." is plain once translated).
        translated = self.mask.whole(translated)
        if record.stream:
            headers = relayable_headers(upstream.headers, self.mask)
            headers.update({**_STREAM_HEADERS, "Content-Type": "text/event-stream"})
            return Response(translated, status=status, headers=headers)
        return _json(translated, status, upstream, self.mask)

    def first_piece(
        self, body: Iterator[bytes], record: RequestRecord, exchange: Exchange
    ) -> tuple[list[bytes], bool]:
        try:
            first = next(body, None)
        except (*READ_ERRORS, AnswerTooLargeError) as exc:
            raise self._translate(exc, record, exchange, mid_body=True) from None
        if first is None:
            if exchange.ended_by is not None:  # a close-delimited stream, cut by the watcher
                raise self._translate(None, record, exchange)
            record.upstream_error = "stream_broken"
            raise GatewayError(502, "The upstream ended the stream before sending anything.")
        return [first], False

    def read_head(
        self,
        body: Iterator[bytes],
        record: RequestRecord,
        exchange: Exchange,
        limit: int | None = HEAD_BYTES,
    ) -> tuple[list[bytes], bool]:
        """A short answer read whole (True), or the first HEAD_BYTES of a long one (False).
        With no `limit`, the whole answer (`pieces` stops it at MAX_RESPONSE_BODY_BYTES)."""
        head: list[bytes] = []
        size = 0
        try:
            for piece in body:
                head.append(piece)
                size += len(piece)
                if limit is not None and size >= limit:
                    return head, False
        except (*READ_ERRORS, AnswerTooLargeError) as exc:
            raise self._translate(exc, record, exchange) from None
        if exchange.ended_by is not None:  # a close-delimited body, cut by the watcher
            raise self._translate(None, record, exchange)
        return head, True

    @staticmethod
    def prepare(
        method: str, url: str, headers: Mapping[str, str], body: bytes | None
    ) -> requests.PreparedRequest:
        # Built directly rather than with PreparedRequest.prepare(): the base URL was
        # normalised once at start-up and the path is ours, so re-parsing both on every
        # request (and merging hooks, cookies and auth that a relay never has) is waste.
        prepared = requests.PreparedRequest()
        prepared.method = method
        prepared.url = url
        prepared.headers = CaseInsensitiveDict(headers)
        if body is not None:
            prepared.headers["Content-Length"] = str(len(body))
        prepared.body = body
        return prepared

    def headers_for(
        self, client_headers: Mapping[str, str] | Headers, record: RequestRecord
    ) -> dict[str, str]:
        # The provider's Authorization (and extra headers) are added per attempt: each
        # provider's key goes to that provider only.
        headers = {k: v for k, v in client_headers.items() if forwarded(k.lower())}
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
        if exchange.ended_by == SHUTDOWN:  # no one's failure: told apart, never counted
            return GatewayError(
                503, "The gateway is shutting down; retry the request.", code="shutting_down"
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
        if isinstance(exc, (AnswerTooLargeError, EventTooLargeError)):
            record.upstream_error = "too_large"
            return GatewayError(502, "The upstream's answer is larger than the gateway relays.")
        if isinstance(exc, requests.Timeout) or _caused_by_read_timeout(exc):
            record.upstream_error = "timeout"
            connect = isinstance(exc, requests.ConnectTimeout)
            target = self.targets.get(record.provider or "")
            timeout = target.timeout if target is not None else (0.0, 0.0)
            seconds = timeout[0] if connect else timeout[1]
            return GatewayError(504, f"The upstream did not answer within {seconds:g} s.")
        if mid_body:
            record.upstream_error = "stream_broken"
            return GatewayError(502, "The upstream closed the stream before it was complete.")
        if isinstance(exc, requests.ConnectionError) and not _protocol_error(exc):
            record.upstream_error = "connect"
            return GatewayError(502, "The upstream could not be reached or closed the connection.")
        record.upstream_error = "protocol"
        return GatewayError(502, "The upstream sent an invalid response.")


def _json(body: bytes, status: int, upstream: requests.Response, mask: SecretMask) -> Response:
    headers = relayable_headers(upstream.headers, mask)
    for name in [n for n in headers if n.lower() == "content-type"]:
        del headers[name]
    return Response(body, status=status, headers=headers, mimetype="application/json")


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


@dataclass(frozen=True)
class Routed:
    """A request's plan, bound to the client that carries it out."""

    client: UpstreamClient
    plan: Plan

    def relay(
        self,
        dialect: Dialect,
        record: RequestRecord,
        client_headers: Mapping[str, str] | Headers,
        *,
        client: Client = NO_CLIENT,
    ) -> Response:
        return self.client.attempts.relay(self.plan, dialect, record, client_headers, client=client)


def upstream_for(model: str | None) -> Routed:
    """The one place that picks where a request goes: its route's deployments, in order.

    A model without a route is a 404 `model_not_found`, before anything is sent anywhere.
    """
    client: UpstreamClient = current_app.extensions["gateway.upstream"]
    plan = client.router.plan(model) if model is not None else None
    if plan is None:
        shown = (model or "")[:100]
        raise GatewayError(
            404,
            f"The model '{shown}' does not exist or you do not have access to it.",
            param="model",
            code="model_not_found",
        )
    return Routed(client, plan)
