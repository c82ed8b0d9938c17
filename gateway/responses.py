"""/v1/responses: OpenAI's Responses API (Codex, the Agents SDK, the AI SDK).

The same pipeline as chat, with one protocol step per attempt: relayed as sent to a
provider that serves Responses itself, bridged to Chat Completions for any other. Bridged
responses are stored by the gateway (`gateway.stored`) so that `previous_response_id`,
retrieve, delete and `/input_items` work; a native provider's are relayed back to it.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import msgspec
from flask import Blueprint, Response, current_app, g, request
from loguru import logger

from gateway.chat import read_body
from gateway.errors import GatewayError
from gateway.policy.enforce import admit, allow_model
from gateway.policy.usage import tokens_for
from gateway.protocols import responses as bridge
from gateway.protocols.common import ProtocolError
from gateway.record import RequestRecord
from gateway.stored import ResponseStore, Stored, StoreUnavailableError
from gateway.upstream import Client, Routed, upstream_for
from gateway.upstream.dialect import Leg, StreamTranslator, output_limit_name
from gateway.upstream.edits import edited
from gateway.upstream.router import Candidate

bp = Blueprint("responses", __name__)

# A native provider's response id, from the first bytes of its answer: the first "id" of a
# JSON response, or of the `response` in a stream's response.created event.
_FIRST_ID = re.compile(rb'"id"\s*:\s*"([A-Za-z0-9_.:-]{1,200})"')
# Codex gives up at once on a 429 without Retry-After: every 429 here carries one.
_DEFAULT_RETRY_AFTER = "1"


@bp.post("/responses")
def create() -> Response:
    body = read_body()
    try:
        req = bridge.parse(body)
    except ProtocolError as exc:
        raise GatewayError(400, exc.message, param=exc.param) from None
    record: RequestRecord = g.record
    record.model, record.stream = req.model, req.stream is True
    _refuse_provider_references(body, req)
    previous = _previous(req)
    # A replayed conversation is prompt too: reserved and estimated with the body.
    history = _ENCODER.encode(previous.conversation) if previous and previous.conversation else b""
    admit(record, body, req.max_output_tokens, history=history)
    record.inject_usage = record.stream  # a bridged stream asks; a native one reports unasked
    routed = _pinned(upstream_for(record.model), previous)
    reply = bridge.Reply(
        response_id=bridge.new_id("resp"),
        model=req.model,
        created_at=int(time.time()),
        request=req,
        input_estimate=max(1, tokens_for(len(body))),
    )
    dialect = ResponsesDialect(
        body, req=req, reply=reply, store=_store(), owner=g.caller.key_id, previous=previous
    )
    dialect.output_cap = record.output_cap
    return routed.relay(dialect, record, request.headers, client=Client.of(request.environ))


@bp.get("/responses/<response_id>")
def retrieve(response_id: str) -> Response:
    entry = _owned(response_id)
    if entry.provider is not None:
        return _relay_native(entry, "GET", f"/responses/{response_id}")
    return _json(entry.response)


@bp.delete("/responses/<response_id>")
def delete(response_id: str) -> Response:
    entry = _owned(response_id)
    if entry.provider is not None:
        answer = _relay_native(entry, "DELETE", f"/responses/{response_id}")
        if answer.status_code < 300:
            _store().delete(response_id, g.caller.key_id)
        return answer
    _store().delete(response_id, g.caller.key_id)
    return _json({"id": response_id, "object": "response.deleted", "deleted": True})


@bp.get("/responses/<response_id>/input_items")
def input_items(response_id: str) -> Response:
    entry = _owned(response_id)
    if entry.provider is not None:
        return _relay_native(entry, "GET", f"/responses/{response_id}/input_items")
    return _json(_page(list(entry.input)))


def _page(items: list[dict[str, Any]]) -> dict[str, Any]:
    """One page of input items, as OpenAI pages them: `order` (desc by default), `limit`
    (1-100, 20), and the cursors `after` / `before` (an item id)."""
    args = request.args
    if args.get("order", "desc") != "asc":
        items.reverse()
    ids = [str(item.get("id")) for item in items]
    if (after := args.get("after")) is not None:
        items = items[ids.index(after) + 1 :] if after in ids else []
    elif (before := args.get("before")) is not None:
        items = items[: ids.index(before)] if before in ids else []
    limit = args.get("limit", "20")
    count = int(limit) if limit.isdigit() and 0 < int(limit) <= 100 else 20
    shown = items[:count]
    return {
        "object": "list",
        "data": shown,
        "first_id": shown[0]["id"] if shown else None,
        "last_id": shown[-1]["id"] if shown else None,
        "has_more": len(items) > len(shown),
    }


def add_retry_after(response: Response) -> Response:
    """after_request on these routes: a 429 without Retry-After gets one."""
    if response.status_code == 429 and "Retry-After" not in response.headers:
        response.headers["Retry-After"] = _DEFAULT_RETRY_AFTER
    return response


bp.after_request(add_retry_after)


def _store() -> ResponseStore:
    store: ResponseStore = current_app.extensions["gateway.responses"]
    return store


def _owned(response_id: str) -> Stored:
    try:
        entry = _store().get(response_id, g.caller.key_id)
    except StoreUnavailableError:
        raise GatewayError(503, "Stored responses are unavailable right now; retry.") from None
    if entry is None:
        raise GatewayError(
            404,
            f"No response found with id '{response_id[:100]}'.",
            param="response_id",
            code="not_found",
        )
    g.record.model = entry.model
    allow_model(g.record)
    return entry


class _References(msgspec.Struct):
    """Top-level fields that name state kept at the provider, outside the gateway's store."""

    conversation: msgspec.Raw = msgspec.Raw()


_REFERENCES = msgspec.json.Decoder(_References)


def _refuse_provider_references(body: bytes, req: bridge.ResponsesRequest) -> None:
    """Every key shares the gateway's provider account: a `conversation` or an
    `item_reference` would reach items another key made there. Turns are chained with
    `previous_response_id`, whose owner the gateway checks."""
    if bytes(_REFERENCES.decode(body).conversation) not in (b"", b"null"):
        raise GatewayError(
            400,
            "'conversation' is not supported through the gateway; chain turns with "
            "'previous_response_id'.",
            param="conversation",
            code="unsupported_parameter",
        )
    if isinstance(req.input, list) and any(i.type == "item_reference" for i in req.input):
        raise GatewayError(
            400,
            "Input items of type 'item_reference' are not supported through the gateway; "
            "send the items themselves or use 'previous_response_id'.",
            param="input",
            code="unsupported_parameter",
        )


def _previous(req: bridge.ResponsesRequest) -> Stored | None:
    if not req.previous_response_id:
        return None
    try:
        entry = _store().get(req.previous_response_id, g.caller.key_id)
    except StoreUnavailableError:
        raise GatewayError(503, "Stored responses are unavailable right now; retry.") from None
    if entry is None:
        raise GatewayError(
            404,
            f"Previous response with id '{req.previous_response_id[:100]}' not found.",
            param="previous_response_id",
            code="previous_response_not_found",
        )
    if entry.provider is None and entry.conversation is None:
        raise GatewayError(
            400,
            "The conversation up to that response is too long for the gateway to keep; "
            "send the items you need as input instead.",
            param="previous_response_id",
            code="conversation_too_long",
        )
    return entry


def _pinned(routed: Routed, previous: Stored | None) -> Routed:
    """Where the previous response lives decides who can continue it: a native provider
    holds its own (only its deployments), the gateway holds a bridged one (only providers
    it bridges to, which get the stored history; a native one would get an id it never made).
    """
    if previous is None:
        return routed
    candidates = routed.plan.candidates
    if previous.provider is not None:
        kept = tuple(c for c in candidates if c.provider.name == previous.provider)
    else:
        kept = tuple(c for c in candidates if not c.provider.serves("responses"))
    if not kept:
        raise GatewayError(
            400,
            "The previous response was made by a provider this model no longer routes to; "
            "send the whole conversation as input instead.",
            param="previous_response_id",
            code="previous_response_not_continuable",
        )
    return Routed(routed.client, replace(routed.plan, candidates=kept))


def _relay_native(entry: Stored, method: str, path: str) -> Response:
    routed = _pinned(upstream_for(entry.model), entry)
    dialect = NativeCallDialect(method, path, request.query_string)
    return routed.relay(dialect, g.record, request.headers, client=Client.of(request.environ))


def _json(value: Any) -> Response:
    # msgspec, not orjson: stored items come from clients and may nest deeper than
    # orjson's 254 levels; msgspec encodes what it decoded.
    return Response(_ENCODER.encode(value), mimetype="application/json")


_ENCODER = msgspec.json.Encoder()


@dataclass
class _Keeper:
    """Stores the finished response of one request, once, if it asked to be stored."""

    store: ResponseStore
    owner: str
    req: bridge.ResponsesRequest
    previous: Stored | None
    kept: bool = field(default=False)

    def bridged(self, response: Mapping[str, Any] | None) -> None:
        if self.kept or response is None or self.req.store is False:
            return
        if response.get("status") not in ("completed", "incomplete"):
            return  # a failed response is not one to continue from
        self.kept = True
        own_input = bridge.input_items(self.req)
        history = list(self.previous.conversation or []) if self.previous else []
        output = list(response.get("output") or [])
        entry = Stored(
            owner=self.owner,
            model=self.req.model,
            response=dict(response),
            input=own_input,
            conversation=[*history, *own_input, *output],
        )
        self.store.put(str(response["id"]), entry)

    def native(self, provider: str, first: bytes) -> None:
        if self.kept or self.req.store is False:
            return
        found = _FIRST_ID.search(first)
        if found is None:
            logger.debug("native response id not found in its first bytes")
            return
        self.kept = True
        entry = Stored(owner=self.owner, model=self.req.model, provider=provider)
        self.store.put(found.group(1).decode(), entry)


@dataclass(frozen=True)
class ResponsesShape:
    """A Chat Completions answer turned into a Responses one (and kept, when asked)."""

    reply: bridge.Reply
    keeper: _Keeper

    def answer(self, body: bytes) -> bytes:
        response = bridge.from_chat(body, self.reply)
        self.keeper.bridged(response)
        return _ENCODER.encode(response)

    def error(self, status: int, body: bytes) -> bytes:
        del status
        return body  # a Chat Completions provider's error is already in OpenAI's shape

    def stream(self) -> StreamTranslator:
        return _KeptStream(bridge.StreamTranslator(self.reply), self.keeper)


@dataclass
class _KeptStream:
    inner: bridge.StreamTranslator
    keeper: _Keeper

    def feed(self, data: bytes) -> bytes:
        return self.inner.feed(data)

    def finish(self) -> bytes:
        tail = self.inner.finish()
        self.keeper.bridged(self.inner.response)
        return tail

    def fail(self, status: int, message: str) -> bytes:
        return self.inner.fail(status, message)

    @property
    def failed(self) -> bool:
        return self.inner.failed

    @property
    def usage(self) -> Mapping[str, int] | None:
        return self.inner.usage


class ResponsesDialect:
    def __init__(
        self,
        body: bytes,
        *,
        req: bridge.ResponsesRequest,
        reply: bridge.Reply,
        store: ResponseStore,
        owner: str,
        previous: Stored | None,
    ) -> None:
        self.body = body
        self.req = req
        self.reply = reply
        self.previous = previous
        self.keeper = _Keeper(store, owner, req, previous)
        self.output_cap: int | None = None

    def leg(self, candidate: Candidate, *, stream: bool, include_usage: bool) -> Leg:
        provider = candidate.provider
        if provider.serves("responses"):
            model = candidate.upstream_model if candidate.rewrite else None
            name = provider.name
            cap = self.output_cap
            return Leg(
                "/responses",
                edited(
                    self.body,
                    model=model,
                    defaults={"max_output_tokens": cap} if cap is not None else None,
                    normalise=True,
                ),
                on_first=lambda first: self.keeper.native(name, first),
                stream_error=bridge.failed_event,
            )
        chat, dropped = bridge.to_chat(
            self.req,
            model=candidate.upstream_model,
            provider_kind=provider.kind,
            include_usage=include_usage,
            history=(self.previous.conversation or []) if self.previous else [],
        )
        if dropped:
            logger.debug("built-in tools dropped for {}: {}", provider.name, ", ".join(dropped))
        if self.output_cap is not None:
            limit = output_limit_name(provider.kind, chat=True)
            chat = edited(chat, defaults={limit: self.output_cap})
        return Leg(
            "/chat/completions",
            chat,
            shape=ResponsesShape(self.reply, self.keeper),
            usage_asked=include_usage,
        )


@dataclass(frozen=True)
class NativeCallDialect:
    """GET, DELETE and input_items of a response a native provider holds."""

    method: str
    path: str
    query: bytes

    def leg(self, candidate: Candidate, *, stream: bool, include_usage: bool) -> Leg:
        # Reading a stored response again costs nothing: its usage is not this call's.
        return Leg(self.path, None, self.query, method=self.method, counts_usage=False)
