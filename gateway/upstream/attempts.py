"""Trying a plan's deployments in turn, until one answers: the attempt and fallback loop.

Each attempt is one exchange with one provider (`UpstreamClient.send` and `.answer`); here
is what its outcome means: fall back (connect, timeout, 429, 5xx, Arrearage, a refused
gateway key, a stream ended before its first chunk; a non-streamed read timeout only when
configured), the router told how the deployment did (only failures that say the provider
is unwell, see `Verdict`), the access line's `attempts` (with the estimated tokens of an
attempt the provider may have generated for), and what the client gets when the last
attempt fails too. The client's own mistakes (a 429 "request too large", a 401/403 about a
model) are relayed at once, never sent elsewhere nor held against the deployment.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Protocol

import requests
from flask import Response
from loguru import logger
from werkzeug.datastructures import Headers

from gateway.disconnects import DisconnectWatcher
from gateway.errors import GatewayError
from gateway.record import RequestRecord
from gateway.upstream.bodies import Client, pieces
from gateway.upstream.connection import Exchange
from gateway.upstream.dialect import Dialect, Leg
from gateway.upstream.providers import (
    BODY_DEPENDENT,
    FALLBACK_SETTING,
    AttemptObserver,
    Target,
    in_arrears,
    is_stream,
    refuses_gateway_key,
    request_too_large,
    retry_after,
    status_failure,
)
from gateway.upstream.router import Candidate, Plan, Router, Slot


class Exchanges(Protocol):
    """What the loop needs of the upstream client: single exchanges with one provider.

    A protocol rather than an import: the client drives the loop (`Attempts(client)`) and
    the loop drives exchanges, never the other way round.
    """

    router: Router
    observer: AttemptObserver
    targets: Mapping[str, Target]
    total_timeout: float
    max_body: int
    disconnects: DisconnectWatcher

    def headers_for(
        self, client_headers: Mapping[str, str] | Headers, record: RequestRecord
    ) -> dict[str, str]: ...

    def prepare(
        self, method: str, url: str, headers: Mapping[str, str], body: bytes | None
    ) -> requests.PreparedRequest: ...

    def send(
        self,
        prepared: requests.PreparedRequest,
        record: RequestRecord,
        exchange: Exchange,
        target: Target,
    ) -> requests.Response: ...

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
    ) -> Response: ...

    def first_piece(
        self, body: Iterator[bytes], record: RequestRecord, exchange: Exchange
    ) -> tuple[list[bytes], bool]: ...

    def read_head(
        self,
        body: Iterator[bytes],
        record: RequestRecord,
        exchange: Exchange,
        limit: int | None = ...,
    ) -> tuple[list[bytes], bool]: ...


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
    verdict: Verdict | None = None  # given already: relaying the answer adds nothing
    leg: Leg | None = None
    # Estimated tokens the provider may have spent on it (a read timeout): charged too.
    cost: int = 0

    def discard(self) -> None:
        if self.exchange is not None:
            self.exchange.release()  # closes an unread body: its connection is not reused


class Attempts:
    """The loop of one client: its exchanges, its router and its observer."""

    def __init__(self, client: Exchanges) -> None:
        self.client = client
        self.router = client.router
        self.observer = client.observer

    def relay(
        self,
        plan: Plan,
        dialect: Dialect,
        record: RequestRecord,
        client_headers: Mapping[str, str] | Headers,
        *,
        client: Client,
    ) -> Response:
        """Send one request to the plan's deployments in turn, until one answers.

        A deployment that cannot be reached, times out before its headers, answers 429 or
        5xx (or DashScope's `Arrearage`, or 401/403) is followed by the next, at most `max_attempts`
        in all and none started after `deadline`: all of it before the client has been
        sent a byte. The last attempt's answer is relayed as the provider sent it.
        """
        headers = self.client.headers_for(client_headers, record)
        # A non-streamed answer has an overall deadline: a provider dripping it byte by
        # byte would never trip the read timeout. A stream may take as long as it streams.
        deadline = None if record.stream else time.monotonic() + self.client.total_timeout
        policy = plan.policy
        inject_usage = record.inject_usage  # wished for the request; each attempt decides
        failed: _Failed | None = None
        tried = 0
        for candidate in plan.candidates:
            if tried >= policy.max_attempts or (tried and record.elapsed() >= policy.deadline):
                break
            # Built before a slot is taken: a body the dialect cannot build is refused (400)
            # with nothing held.
            usage = inject_usage and candidate.provider.stream_usage
            leg = dialect.leg(
                candidate,
                stream=record.stream,
                include_usage=usage and self.router.sends_stream_options(candidate.key),
            )
            slot = self.router.acquire(candidate)
            if slot is None:  # its provider has max_concurrent requests in flight
                self._fall_back(plan, record, candidate, "capacity")
                continue
            if failed is not None:
                failed.discard()  # closed before the next attempt is sent
                self._fall_back(plan, record, failed.candidate, failed.outcome, failed.cost)
            tried += 1
            sent = _Sent(headers, deadline, client)
            result = self._attempt(plan, candidate, slot, sent, record, leg=leg)
            if isinstance(result, _Failed) and result.outcome == _USAGE_REFUSED:
                # Not a failure of the deployment nor an attempt of its own: the same one
                # again, as the client sent it.
                record.attempts.append(f"{candidate.provider.name}: {_USAGE_REFUSED}")
                leg = dialect.leg(candidate, stream=record.stream, include_usage=False)
                slot = self.router.acquire(candidate)
                if slot is None:
                    self._fall_back(plan, record, candidate, "capacity")
                    continue
                result = self._attempt(plan, candidate, slot, sent, record, leg=leg)
                if isinstance(result, Response) and result.status_code < 400:
                    self.router.refuses_stream_options(candidate.key)
                    logger.bind(provider=candidate.provider.name).warning(
                        "provider {} refuses stream_options: not sent to {} again "
                        "(set stream_usage: false); its usage is estimated",
                        candidate.provider.name,
                        candidate.upstream_model,
                    )
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
        self,
        plan: Plan,
        candidate: Candidate,
        slot: Slot,
        sent: _Sent,
        record: RequestRecord,
        *,
        leg: Leg,
    ) -> Response | _Failed:
        """One deployment tried: its answer, or what failed if another may be tried."""
        provider = candidate.provider.name
        target = self.client.targets[provider]
        record.provider, record.upstream_model = provider, candidate.upstream_model
        record.upstream_error = record.upstream_status = record.upstream_request_id = None
        # What this attempt asked: the relay strips the usage chunk only when it was asked.
        record.inject_usage = leg.usage_asked
        prepared = self.client.prepare(
            leg.method,
            (leg.base_url or target.base_url) + _path_and_query(leg),
            _headers(sent.headers, target.headers, leg),
            leg.body,
        )
        exchange = Exchange()
        # gunicorn hands the client's socket to the app: watched from before the request is
        # sent, so a client that leaves (or left while queued) stops the provider's work.
        unwatch = self.client.disconnects.watch(sent.client.socket, exchange.end, sent.deadline)
        exchange.unwatch = _both(unwatch, slot.release)
        try:
            try:
                upstream = self.client.send(prepared, record, exchange, target)
                body = pieces(upstream, self.client.max_body)
                outcome, retry_after, head = self._judge(
                    upstream, body, candidate, record, exchange, leg=leg
                )
            except GatewayError as error:
                failure = record.upstream_error
                if exchange.ended_by is not None or failure is None:
                    raise  # the client left, the deadline passed, or the request is invalid
                if failure == "timeout" and _read_timeout(error, record):
                    # The provider had the whole request and may be generating the answer
                    # still: sent elsewhere, it would be generated (and billed) twice.
                    failure = "read_timeout"
                self._note(plan, slot, failure, body=leg.body)  # a redirect or garbage too
                if not self._may_fall_back(plan, failure):
                    raise
                # Closed now, before the next attempt starts: urllib3 has closed the
                # connection of a timed-out read, and an unread answer is closed here.
                exchange.release()
                cost = _estimate(leg.body) if failure == "read_timeout" else 0
                return _Failed(candidate, failure, error=error, cost=cost)
            if outcome == _USAGE_REFUSED:
                self.observer.attempted(provider, plan.route, outcome)
                exchange.release()
                slot.release()
                return _Failed(candidate, outcome)
            verdict = self._note(plan, slot, outcome, retry_after, body=leg.body)
            if outcome == "provider_auth" and not self._may_fall_back(plan, outcome):
                raise self._refused(candidate, record)  # never relayed: see _refused
            if outcome == "ok" or not self._may_fall_back(plan, outcome):
                return self.client.answer(
                    upstream,
                    body,
                    record,
                    exchange,
                    client=sent.client,
                    head_read=head,
                    verdict=verdict,
                    leg=leg,
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
                leg=leg,
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
        *,
        leg: Leg,
    ) -> _Judged:
        """Whether the provider's answer is its failure: (outcome, Retry-After, body read).

        A stream's first piece is read here: a stream that breaks (or ends) before it has
        sent anything is a failure the next deployment can still make good, because the
        client has not been sent a byte yet (a GatewayError, as for a failed connection).
        """
        status = upstream.status_code
        if upstream.ok and is_stream(upstream):
            return "ok", None, self.client.first_piece(body, record, exchange)
        if status in (401, 403, 429):
            return self._whose(upstream, self.client.read_head(body, record, exchange), candidate)
        if (failure := status_failure(status)) is not None:
            return failure, None, None
        head = None
        if status == 400 and candidate.provider.kind == "dashscope" and not is_stream(upstream):
            head = self.client.read_head(body, record, exchange)
            if head[1] and in_arrears(b"".join(head[0])):
                return "arrearage", None, head
        if status in (400, 422) and leg.usage_asked:
            # The gateway added stream_options, the client did not: the provider may not
            # know the field. Its 400 costs nothing; the same request is tried without it.
            return _USAGE_REFUSED, None, head
        return "ok", None, head

    @staticmethod
    def _whose(
        upstream: requests.Response, head: tuple[list[bytes], bool], candidate: Candidate
    ) -> _Judged:
        """A 401, 403 or 429, read (a short JSON error): the request's own ("request too
        large", "no access to model") is the client's answer, relayed and held against
        no one; the rest is the provider's (its rate) or the gateway's (its key)."""
        said = b"".join(head[0])
        model = candidate.upstream_model
        if upstream.status_code == 429:
            if request_too_large(said, model):
                return "ok", None, head
            return "rate_limited", retry_after(upstream.headers.get("Retry-After")), head
        if refuses_gateway_key(upstream.status_code, said, model):
            return "provider_auth", None, head
        return "ok", None, head

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
            return self.client.answer(
                failed.upstream,
                failed.body,
                record,
                failed.exchange,
                client=client,
                head_read=failed.head,
                verdict=failed.verdict,
                leg=failed.leg,
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
        self,
        plan: Plan,
        slot: Slot,
        outcome: str,
        retry_after: float | None = None,
        *,
        body: bytes | None = None,
    ) -> Verdict:
        """Count the attempt; a failure is the router's at once, a success once relayed."""
        self.observer.attempted(slot.candidate.provider.name, plan.route, outcome)
        verdict = Verdict(self.router, slot)
        if outcome != "ok":
            # Only failures the request itself can cause are fingerprinted, and only then
            # is the body hashed: nothing is spent on the requests that succeed.
            fingerprint = hash(body or b"") if outcome in BODY_DEPENDENT else None
            verdict.failed(outcome, retry_after, before_head=True, fingerprint=fingerprint)
        return verdict

    def _fall_back(
        self, plan: Plan, record: RequestRecord, candidate: Candidate, reason: str, cost: int = 0
    ) -> None:
        spent = f" (~{cost} tokens)" if cost else ""
        record.attempts.append(f"{candidate.provider.name}: {reason}{spent}")
        record.abandoned_tokens += cost
        self.observer.fell_back(candidate.provider.name, plan.route, reason)
        logger.bind(provider=candidate.provider.name, reason=reason).info(
            "falling back from {} ({})", candidate.provider.name, reason
        )

    @staticmethod
    def _may_fall_back(plan: Plan, outcome: str) -> bool:
        return FALLBACK_SETTING.get(outcome) in plan.policy.fallback_on


@dataclass(frozen=True)
class _Sent:
    """What every attempt of one request shares (each leg is the dialect's, per provider)."""

    headers: dict[str, str]
    deadline: float | None
    client: Client


# What _judge finds: the outcome, a 429's Retry-After, and the answer's head if it was read.
_Judged = tuple[str, float | None, tuple[list[bytes], bool] | None]
# The outcome of a 400 to the stream_options the gateway added (retried once without).
_USAGE_REFUSED = "stream_options_refused"


def _estimate(body: bytes | None) -> int:
    """An attempt's prompt, estimated as the policy does: a token per 4 bytes of its body."""
    return math.ceil(len(body or b"") / 4)


def _read_timeout(error: GatewayError, record: RequestRecord) -> bool:
    """A non-streamed request timed out after it was sent (not while connecting): the
    provider may be generating the answer. (The client raises its GatewayError while
    handling the requests exception: `__context__` is that exception.)"""
    cause = error.__cause__ or error.__context__
    return not record.stream and not isinstance(cause, requests.ConnectTimeout)


def _path_and_query(leg: Leg) -> str:
    if not leg.query:
        return leg.path
    return f"{leg.path}?{leg.query.decode('latin-1')}"  # as sent, still percent-encoded


def _headers(client: dict[str, str], provider: Mapping[str, str], leg: Leg) -> dict[str, str]:
    """The client's forwarded headers, then the provider's own, then the leg's changes."""
    headers = {**client, **provider}
    for name, value in leg.headers.items():
        for present in [k for k in headers if k.lower() == name.lower()]:
            del headers[present]
        if value is not None:
            headers[name] = value
    return headers


class Verdict:
    """How one attempt's deployment did, told to the router once: a failure as soon as it
    is known, a success only once the answer has been relayed whole (a stream that breaks
    mid-body is a failure, never a success first and a failure after).

    Not every failure is the deployment's: an answer over MAX_RESPONSE_BODY_BYTES, or a
    read timeout after the answer's head (a long generation), is the request's; nothing
    is told then."""

    def __init__(self, router: Router, slot: Slot) -> None:
        self._router = router
        self._slot = slot
        self._given = False

    def succeeded(self) -> None:
        if not self._given:
            self._given = True
            candidate = self._slot.candidate
            self._router.succeeded(
                candidate.key, self._slot.started, model=candidate.upstream_model
            )

    def failed(
        self,
        outcome: str,
        retry_after: float | None = None,
        *,
        before_head: bool = False,
        fingerprint: int | None = None,
    ) -> None:
        if self._given:
            return
        self._given = True
        if outcome in _NOT_THE_DEPLOYMENTS or (not before_head and outcome in _LONG_ANSWER):
            return
        candidate = self._slot.candidate
        self._router.failed(
            candidate.key,
            outcome,
            retry_after,
            model=candidate.upstream_model,
            fingerprint=fingerprint,
        )


# An answer larger than the gateway relays: the request asked for it.
_NOT_THE_DEPLOYMENTS = frozenset({"too_large"})
# Once the answer's head has come, a read timeout is a generation longer than read_timeout.
_LONG_ANSWER = frozenset({"timeout", "read_timeout"})


def _both(first: Callable[[], None], second: Callable[[], None]) -> Callable[[], None]:
    def both() -> None:
        first()
        second()

    return both
