"""POST /v1/messages and /v1/messages/count_tokens: Anthropic's Messages API (Claude Code).

The same pipeline as chat (the caller's key, its models and token windows, routing,
fallback, usage), with one protocol step: each attempt is relayed as sent to a provider
that serves Messages itself, or translated to Chat Completions and back for any other.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import orjson
from flask import Blueprint, Response, g, request

from gateway.chat import read_body
from gateway.errors import GatewayError
from gateway.policy.enforce import admit, allow_model
from gateway.protocols import anthropic
from gateway.protocols.common import ProtocolError
from gateway.upstream import Client, Routed, upstream_for
from gateway.upstream.dialect import Leg, StreamTranslator
from gateway.upstream.router import Candidate

bp = Blueprint("messages", __name__)

PREFIX = "/v1/messages"
# What Anthropic's API expects when the client does not say (Claude Code always does).
_VERSION = "2023-06-01"
# Headers only a Messages provider understands: never sent to a Chat Completions one.
_ANTHROPIC_ONLY: dict[str, str | None] = {"anthropic-version": None, "anthropic-beta": None}


@bp.post("/messages")
def messages() -> Response:
    body = read_body()
    req = _parse(body)
    record = g.record
    record.model, record.stream = req.model, req.stream is True
    routed = upstream_for(record.model)
    admit(record, body, _most_output(req.max_tokens, routed))
    # A translated stream asks its provider for usage (message_delta reports it); a native
    # provider reports it unasked.
    record.inject_usage = record.stream
    reply = anthropic.reply_for(req)
    dialect = MessagesDialect(body, req, request.query_string, reply)
    return routed.relay(dialect, record, request.headers, client=Client.of(request.environ))


@bp.post("/messages/count_tokens")
def count_tokens() -> Response:
    """Relayed to a provider that serves Messages itself, else the gateway's estimate: never
    a 404 (Claude Code would fall back to 17 non-streamed calls)."""
    body = read_body()
    req = _parse(body, counting=True)
    record = g.record
    record.model = req.model
    allow_model(record)
    routed = upstream_for(record.model)
    # Only providers that serve Messages can count; the others get the estimate, and so
    # does a request whose native providers all failed: Claude Code would otherwise send
    # 17 full calls instead.
    native = tuple(c for c in routed.plan.candidates if c.provider.serves("messages"))
    if native:
        pinned = Routed(routed.client, replace(routed.plan, candidates=native))
        dialect = CountTokensDialect(body, request.query_string)
        try:
            answer = pinned.relay(
                dialect, record, request.headers, client=Client.of(request.environ)
            )
        except GatewayError as error:
            if error.status == 499 or error.status < 500:
                raise
        else:
            if answer.status_code < 500:
                return answer
            answer.close()
    counted = orjson.dumps({"input_tokens": anthropic.count_tokens(req)})
    return Response(counted, mimetype="application/json")


def _most_output(max_tokens: int, routed: Routed) -> int:
    """What the request may generate: its max_tokens, or less when every deployment that
    may serve it translates and lowers it (`max_output_tokens`). Claude Code asks 32,000-
    64,000: holding that against quotas and budgets would refuse it long before they end."""
    caps = [c.max_output_tokens for c in routed.plan.candidates]
    native = any(c.provider.serves("messages") for c in routed.plan.candidates)
    if native or not caps or None in caps:
        return max_tokens
    return min(max_tokens, max(cap for cap in caps if cap is not None))


def _parse(body: bytes, *, counting: bool = False) -> anthropic.MessagesRequest:
    try:
        return anthropic.parse(body, counting=counting)
    except ProtocolError as exc:
        raise GatewayError(400, exc.message, param=exc.param) from None


def error_shape(status: int, message: str, code: str | None) -> tuple[int, bytes]:
    """The gateway's own errors on these routes, in Anthropic's shape. With no provider left
    to try (all full: 503; the last one unreachable or broken: 502, a status Anthropic's API
    never answers), Anthropic's clients expect 529 overloaded_error, and retry it. A provider
    refusing the gateway's own key is configuration, not load: it stays a 502 api_error."""
    if status == 503 or (status == 502 and code != "provider_auth_failed"):
        status = 529
    return status, anthropic.error_body(status, message)


@dataclass(frozen=True)
class MessagesShape:
    """A Chat Completions answer turned into a Messages one."""

    reply: anthropic.Reply

    def answer(self, body: bytes) -> bytes:
        return anthropic.from_chat(body, self.reply)

    max_tokens: int | None

    def error(self, status: int, body: bytes) -> bytes:
        # With the request's numbers, a context-length refusal gets Anthropic's exact
        # wording, from which Claude Code recovers by itself with a smaller max_tokens.
        return anthropic.error_from_chat(
            status, body, max_tokens=self.max_tokens, input_estimate=self.reply.input_estimate
        )

    def stream(self) -> StreamTranslator:
        return anthropic.StreamTranslator(self.reply)


@dataclass(frozen=True)
class MessagesDialect:
    body: bytes
    req: anthropic.MessagesRequest
    query: bytes
    reply: anthropic.Reply

    def leg(self, candidate: Candidate, *, stream: bool, include_usage: bool) -> Leg:
        provider = candidate.provider
        if provider.serves("messages"):
            model = candidate.upstream_model if candidate.rewrite else None
            return Leg(
                "/v1/messages",
                anthropic.native_body(self.body, model=model),
                self.query,
                base_url=provider.anthropic_base_url,
                headers=_native_headers(candidate),
                stream_error=anthropic.error_event,
            )
        try:
            chat = anthropic.to_chat(
                self.req,
                model=candidate.upstream_model,
                provider_kind=provider.kind,
                include_usage=include_usage,
                max_tokens_cap=candidate.max_output_tokens,
            )
        except ProtocolError as exc:  # content Chat Completions cannot carry
            raise GatewayError(400, exc.message, param=exc.param) from None
        return Leg(
            "/chat/completions",
            chat,
            headers=_ANTHROPIC_ONLY,
            shape=MessagesShape(self.reply, self.req.max_tokens),
            usage_asked=include_usage,
        )


@dataclass(frozen=True)
class CountTokensDialect:
    body: bytes
    query: bytes

    def leg(self, candidate: Candidate, *, stream: bool, include_usage: bool) -> Leg:
        model = candidate.upstream_model if candidate.rewrite else None
        return Leg(
            "/v1/messages/count_tokens",
            anthropic.native_body(self.body, model=model),
            self.query,
            base_url=candidate.provider.anthropic_base_url,
            headers=_native_headers(candidate),
        )


def _native_headers(candidate: Candidate) -> dict[str, str | None]:
    """The provider's key as Anthropic's API takes it, the version, and the beta flags it
    knows. Anthropic itself wants `x-api-key` alone; the others take either."""
    provider = candidate.provider
    headers: dict[str, str | None] = {
        "anthropic-version": request.headers.get("anthropic-version") or _VERSION,
        "anthropic-beta": anthropic.known_betas(
            request.headers.get("anthropic-beta"), provider.kind
        ),
    }
    if provider.api_key:
        headers["x-api-key"] = provider.api_key
        if provider.kind == "anthropic":
            headers["Authorization"] = None
    return headers
