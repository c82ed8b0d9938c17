"""The upstream client: every byte to and from the provider passes through here.

One `UpstreamClient` per app holds one pooled `requests` HTTPAdapter (thread-safe, never
mutated after start-up). Requests go straight to the adapter rather than through a Session:
a shared Session would keep the provider's cookies and hand them to every caller, and its
per-call merging of environment settings is work done once here instead.
"""

from __future__ import annotations

import http.client
import itertools
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

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
from gateway.upstream.providers import (
    FALLBACK_SETTING,
    AttemptObserver,
    NoObserver,
    Target,
    body_for,
    in_arrears,
    is_stream,
    retry_after,
    status_failure,
)
from gateway.upstream.router import Candidate, Plan, Router, Slot
from gateway.upstream.scrub import Scrubber, SecretMask

NO_CLIENT = Client()  # the Flask test client and dev server hand over no socket
_STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@dataclass
class _Failed:
    """An attempt that may fall back: its answer kept until the next attempt can start."""

    candidate: Candidate
    outcome: str
    error: GatewayError | None = None  # the gateway's own 502/504, if nothing was answered
    upstream: requests.Response | None = None
    exchange: Exchange | None = None
    body: Iterator[bytes] | None = None
    head: tuple[list[bytes], bool] | None = None
    verdict: _Verdict | None = None  # given already: relaying the answer adds nothing

    def discard(self) -> None:
        if self.exchange is not None:
            self.exchange.release()  # closes an unread body: its connection is not reused


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
        self.targets = {p.name: Target.of(p, settings) for p in settings.providers}
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

    def close(self) -> None:
        self.adapter.close()
        self.disconnects.close()

    def relay(
        self,
        plan: Plan,
        method: str,
        path: str,
        record: RequestRecord,
        client_headers: Mapping[str, str] | Headers,
        *,
        body: bytes | None = None,
        query: bytes = b"",
        client: Client = NO_CLIENT,
    ) -> Response:
        """Send one request to the plan's deployments in turn, until one answers.

        A deployment that cannot be reached, times out before its headers, answers 429 or
        5xx (or DashScope's `Arrearage`) is followed by the next, at most `max_attempts`
        in all and none started after `deadline`: all of it before the client has been
        sent a byte. The last attempt's answer is relayed as the provider sent it.
        """
        headers = self._headers_for(client_headers, record)
        # A non-streamed answer has an overall deadline: a provider dripping it byte by
        # byte would never trip the read timeout. A stream may take as long as it streams.
        deadline = None if record.stream else time.monotonic() + self.total_timeout
        policy = plan.policy
        inject_usage = record.inject_usage  # wished for the request; each attempt decides
        failed: _Failed | None = None
        tried = 0
        for candidate in plan.candidates:
            if tried >= policy.max_attempts or (tried and record.elapsed() >= policy.deadline):
                break
            slot = self.router.acquire(candidate)
            if slot is None:  # its provider has max_concurrent requests in flight
                self._fall_back(plan, record, candidate, "capacity")
                continue
            if failed is not None:
                failed.discard()
                self._fall_back(plan, record, failed.candidate, failed.outcome)
            tried += 1
            sent = _Sent(method, path, query, headers, body, deadline, client, inject_usage)
            result = self._attempt(plan, candidate, slot, sent, record)
            if isinstance(result, Response):
                return result
            failed = result
        if failed is None:
            raise GatewayError(
                503,
                f"Every provider of '{plan.model[:100]}' is at its concurrency limit; retry.",
                code="capacity_exceeded",
            )
        return self._relay_failure(failed, record, client)

    def _attempt(
        self, plan: Plan, candidate: Candidate, slot: Slot, sent: _Sent, record: RequestRecord
    ) -> Response | _Failed:
        """One deployment tried: its answer, or what failed if another may be tried."""
        provider = candidate.provider.name
        target = self.targets[provider]
        record.provider, record.upstream_model = provider, candidate.upstream_model
        record.upstream_error = record.upstream_status = record.upstream_request_id = None
        # What this attempt asks: the relay strips the usage chunk only when it was asked.
        record.inject_usage = sent.inject_usage and candidate.provider.stream_usage
        prepared = self._prepare(
            sent.method,
            target.base_url + sent.path_and_query,
            {**sent.headers, **target.headers},
            body_for(
                candidate,
                sent.path,
                sent.body,
                stream=record.stream,
                include_usage=record.inject_usage,
            ),
        )
        exchange = Exchange()
        # gunicorn hands the client's socket to the app: watched from before the request is
        # sent, so a client that leaves (or left while queued) stops the provider's work.
        unwatch = self.disconnects.watch(sent.client.socket, exchange.end, sent.deadline)
        exchange.unwatch = _both(unwatch, slot.release)
        try:
            try:
                upstream = self._send(prepared, record, exchange, target)
                body = pieces(upstream, self.max_body)
                outcome, retry_after, head = self._judge(
                    upstream, body, candidate, record, exchange
                )
            except GatewayError as error:
                failure = record.upstream_error
                if exchange.ended_by is not None or failure is None:
                    raise  # the client left, the deadline passed, or the request is invalid
                self._note(plan, slot, failure)  # a redirect or garbage counts too
                if not self._may_fall_back(plan, failure):
                    raise
                exchange.release()
                return _Failed(candidate, failure, error=error)
            verdict = self._note(plan, slot, outcome, retry_after)
            if outcome == "provider_auth" and not self._may_fall_back(plan, outcome):
                raise self._refused(candidate, record)  # never relayed: see _refused
            if outcome == "ok" or not self._may_fall_back(plan, outcome):
                return self._answer(
                    upstream,
                    body,
                    record,
                    exchange,
                    client=sent.client,
                    head_read=head,
                    verdict=verdict,
                )
            slot.release()  # it has answered: the answer kept is no work in flight there
            return _Failed(
                candidate,
                outcome,
                upstream=upstream,
                exchange=exchange,
                body=body,
                head=head,
                verdict=verdict,
            )
        except BaseException:
            exchange.release()
            raise

    def _judge(
        self,
        upstream: requests.Response,
        body: Iterator[bytes],
        candidate: Candidate,
        record: RequestRecord,
        exchange: Exchange,
    ) -> tuple[str, float | None, tuple[list[bytes], bool] | None]:
        """Whether the provider's answer is its failure: (outcome, Retry-After, body read).

        A stream's first piece is read here: a stream that breaks (or ends) before it has
        sent anything is a failure the next deployment can still make good, because the
        client has not been sent a byte yet (a GatewayError, as for a failed connection).
        """
        status = upstream.status_code
        if upstream.ok and is_stream(upstream):
            return "ok", None, self._first_piece(body, record, exchange)
        if status == 429:
            return "rate_limited", retry_after(upstream.headers.get("Retry-After")), None
        if (failure := status_failure(status)) is not None:
            return failure, None, None
        if status == 400 and candidate.provider.kind == "dashscope" and not is_stream(upstream):
            head = self._read_head(body, record, exchange)
            if head[1] and in_arrears(b"".join(head[0])):
                return "arrearage", None, head
            return "ok", None, head
        return "ok", None, None

    def _relay_failure(self, failed: _Failed, record: RequestRecord, client: Client) -> Response:
        """The last attempt failed: its answer as the provider sent it, or the gateway's error."""
        if failed.error is not None:
            raise failed.error
        if failed.outcome == "provider_auth":
            failed.discard()
            raise self._refused(failed.candidate, record)
        # A Response is falsy when its status is an error: compare with None.
        assert failed.upstream is not None and failed.exchange is not None
        assert failed.body is not None and failed.verdict is not None
        try:
            return self._answer(
                failed.upstream,
                failed.body,
                record,
                failed.exchange,
                client=client,
                head_read=failed.head,
                verdict=failed.verdict,
            )
        except BaseException:
            failed.exchange.release()
            raise

    @staticmethod
    def _refused(candidate: Candidate, record: RequestRecord) -> GatewayError:
        """A provider's 401/403 is about the gateway's key for it, not the client's: relayed,
        the client's SDK would report its own key as wrong. The provider is named, no key."""
        name = candidate.provider.name
        record.upstream_error = "provider_auth"
        logger.bind(provider=name, upstream_status=record.upstream_status).error(
            "provider {} refused the gateway's credentials (HTTP {}): check its key",
            name,
            record.upstream_status,
        )
        return GatewayError(
            502,
            f"The provider '{name}' refused the gateway's credentials for it; "
            "this is the gateway's configuration, not your API key.",
            code="provider_auth_failed",
        )

    def _note(
        self, plan: Plan, slot: Slot, outcome: str, retry_after: float | None = None
    ) -> _Verdict:
        """Count the attempt; a failure is the router's at once, a success once relayed."""
        self.observer.attempted(slot.candidate.provider.name, plan.route, outcome)
        verdict = _Verdict(self.router, slot)
        if outcome != "ok":
            verdict.failed(outcome, retry_after)
        return verdict

    def _fall_back(
        self, plan: Plan, record: RequestRecord, candidate: Candidate, reason: str
    ) -> None:
        record.attempts.append(f"{candidate.provider.name}: {reason}")
        self.observer.fell_back(candidate.provider.name, plan.route, reason)
        logger.bind(provider=candidate.provider.name, reason=reason).info(
            "falling back from {} ({})", candidate.provider.name, reason
        )

    @staticmethod
    def _may_fall_back(plan: Plan, outcome: str) -> bool:
        return FALLBACK_SETTING.get(outcome) in plan.policy.fallback_on

    def _send(
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

    def _answer(
        self,
        upstream: requests.Response,
        body: Iterator[bytes],
        record: RequestRecord,
        exchange: Exchange,
        *,
        client: Client,
        verdict: _Verdict,
        head_read: tuple[list[bytes], bool] | None = None,
    ) -> Response:
        """The provider's answer relayed; `verdict` is told how the relaying went (a stream
        broken mid-body is its deployment's failure too), unless it was given already."""
        headers = relayable_headers(upstream.headers, self.mask)
        status = upstream.status_code

        def fail(exc: Exception | None) -> GatewayError:
            error = self._translate(exc, record, exchange, mid_body=True)
            if error.status != 499:  # the provider's failure, not the client leaving
                verdict.failed(record.upstream_error or "stream_broken")
            return error

        if is_stream(upstream):
            headers.update(_STREAM_HEADERS)
            record.event_stream = True
            chunks = itertools.chain(head_read[0], body) if head_read else body
            scrubber = Scrubber(self.mask)
            sse = SseRelay(exchange, chunks, record, scrubber, fail, ended=verdict.succeeded)
            return Response(sse, status=status, headers=headers)
        try:
            head, complete = head_read or self._read_head(body, record, exchange)
        except GatewayError as error:
            if error.status != 499:
                verdict.failed(record.upstream_error or "protocol")
            raise
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
                count_usage=upstream.ok,
            )
            return Response(rest, status=status, headers=headers)
        content = self.mask.whole(b"".join(head))
        exchange.release()
        verdict.succeeded()
        if upstream.ok:
            record.note_usage(content)
        return Response(content, status=status, headers=headers)

    def _first_piece(
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

    @staticmethod
    def _prepare(
        method: str, url: str, headers: dict[str, str], body: bytes | None
    ) -> requests.PreparedRequest:
        # Built directly rather than with PreparedRequest.prepare(): the base URL was
        # normalised once at start-up and the path is ours, so re-parsing both on every
        # request (and merging hooks, cookies and auth that a relay never has) is waste.
        prepared = requests.PreparedRequest()
        prepared.method = method
        prepared.url = url
        if body is not None:
            headers["Content-Length"] = str(len(body))
        prepared.headers = CaseInsensitiveDict(headers)
        prepared.body = body
        return prepared

    def _headers_for(
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
class _Sent:
    """What every attempt of one request sends (the body before its per-provider edits)."""

    method: str
    path: str
    query: bytes
    headers: dict[str, str]
    body: bytes | None
    deadline: float | None
    client: Client
    # Usage is to be asked for (the client did not), where the provider takes stream_options.
    inject_usage: bool

    @property
    def path_and_query(self) -> str:
        if not self.query:
            return self.path
        return f"{self.path}?{self.query.decode('latin-1')}"  # as sent, still percent-encoded


@dataclass(frozen=True)
class Routed:
    """A request's plan, bound to the client that carries it out."""

    client: UpstreamClient
    plan: Plan

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
        return self.client.relay(
            self.plan, method, path, record, client_headers, body=body, query=query, client=client
        )


class _Verdict:
    """How one attempt's deployment did, told to the router once: a failure as soon as it
    is known, a success only once the answer has been relayed whole (a stream that breaks
    mid-body is a failure, never a success first and a failure after)."""

    def __init__(self, router: Router, slot: Slot) -> None:
        self._router = router
        self._slot = slot
        self._given = False

    def succeeded(self) -> None:
        if not self._given:
            self._given = True
            self._router.succeeded(self._slot.candidate.key, self._slot.started)

    def failed(self, outcome: str, retry_after: float | None = None) -> None:
        if not self._given:
            self._given = True
            self._router.failed(self._slot.candidate.key, outcome, retry_after)


def _both(first: Callable[[], None], second: Callable[[], None]) -> Callable[[], None]:
    def both() -> None:
        first()
        second()

    return both


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
