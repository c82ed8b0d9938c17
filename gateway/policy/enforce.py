"""The per-key checks a view asks for before relaying, and the token headers on answers.

Order for a request: the key (auth: unknown, disabled or expired is 401), its request
limit (limits: 429), then here its model (403: not allowed, or no price for a key with a
budget) and its token and money windows and its team's (429: `tpm` is a rate limit, a
quota or a spent budget is `insufficient_quota`), each refused without an upstream call.
"""

from __future__ import annotations

import math
import time
from datetime import UTC, datetime
from functools import partial

from flask import Flask, Response, current_app, g
from loguru import logger

from gateway.errors import GatewayError
from gateway.limits import openai_duration
from gateway.metrics import GatewayMetrics
from gateway.policy.estimate import prompt_tokens
from gateway.policy.keys import Caller
from gateway.policy.prices import PriceBook, money, usage_cost
from gateway.policy.tokens import Reservation, TokenBudget, windows_at
from gateway.policy.usage import reservation, settle_usage, worst_output
from gateway.record import RequestRecord


def allow_model(record: RequestRecord) -> None:
    """Refuse a model the key may not use (403)."""
    caller: Caller = g.caller
    model = record.model or ""
    if not caller.allows(model):
        metrics: GatewayMetrics = current_app.extensions["gateway.metrics"]
        metrics.key_rejections.labels(caller.label, "model_denied").inc()
        raise GatewayError(
            403,
            f"This API key is not allowed to use the model '{model[:100]}'.",
            code="model_not_allowed",
            param="model",
        )


def admit(
    record: RequestRecord,
    body: bytes,
    max_tokens: int | None,
    *,
    choices: int = 1,
    history: bytes = b"",
) -> None:
    """Refuse a model the key may not use, a key whose tokens are spent, or a request whose
    worst case (`choices` times `max_tokens`) is more than is left of a quota; else reserve.

    `history`: what the gateway adds to the prompt itself (a stored conversation replayed
    for previous_response_id), reserved and estimated as part of it."""
    allow_model(record)
    caller: Caller = g.caller
    metrics: GatewayMetrics = current_app.extensions["gateway.metrics"]
    budget: TokenBudget = current_app.extensions["gateway.tokens"]
    prices: PriceBook = current_app.extensions["gateway.prices"]
    record.prompt_bytes = len(body) + len(history)
    record.prompt_estimate = prompt_tokens(body) + prompt_tokens(history)
    worst = _worst_cost(prices, record, max_tokens, choices) if caller.budgeted else 0
    tokens = reservation(record.prompt_bytes, max_tokens, choices)
    held = g.tokens = budget.reserve(caller, tokens, money=worst)
    if caller.budgeted and not budget.up:
        # Token limits fail open during a storage outage; money does not: each worker's
        # memory would start every budget from zero and its charges would never reach
        # the storage.
        budget.settle(held, 0)
        g.tokens = None
        raise GatewayError(
            503,
            "This key's budget cannot be checked right now (the limits' storage is "
            "unreachable); retry shortly.",
            code="budget_unavailable",
            headers={"Retry-After": "5"},
        )
    # A budgeted request with no output limit gets the one its reservation assumed: the
    # dialects add it to what the provider is sent.
    record.output_cap = prices.default_max_tokens if caller.budgeted and not max_tokens else None
    if held.full_slot is not None:
        slot = held.full_slot
        reason = (
            "budget" if slot.unit == "cost" else "tpm" if slot.window.name == "minute" else "quota"
        )
        metrics.key_rejections.labels(caller.label, reason).inc()
        raise _over_budget(held, worst, prices.currency) if slot.unit == "cost" else _spent(held)
    if over := _over_quota(held, worst_output(max_tokens, choices)):
        # Released at once: the reservation is atomic, so a request that saw only what
        # came before it is exact; one that saw another's reservation about to be released
        # is refused too (rarely, and never the other way round).
        budget.settle(held, 0)
        g.tokens = None
        metrics.key_rejections.labels(caller.label, "quota").inc()
        raise over
    record.on_complete.append(partial(_settle, budget, prices, held))


def _worst_cost(
    prices: PriceBook, record: RequestRecord, max_tokens: int | None, choices: int
) -> int:
    """The most the request may cost (its prompt estimate at the input price, its output
    limit at the output price, wherever it may be served); 403 if a deployment that may
    serve it has no price: a key with a budget is never served uncounted."""
    output = worst_output(max_tokens, choices) or prices.default_max_tokens * max(1, choices)
    model = record.model or ""
    try:
        return prices.max_cost(model, record.prompt_estimate or 0, output)
    except KeyError:
        metrics: GatewayMetrics = current_app.extensions["gateway.metrics"]
        metrics.key_rejections.labels(g.caller.label, "no_price").inc()
        raise GatewayError(
            403,
            f"The model '{model[:100]}' has no price in this gateway's configuration, and "
            "this key has a budget: it cannot be served uncounted.",
            code="model_not_priced",
            param="model",
        ) from None


def answer_cost(prices: PriceBook, record: RequestRecord) -> int | None:
    """The answer's cost in nano-units, from its usage and the price of the deployment that
    served it; None when it has no price."""
    if not record.usage:
        return None
    try:
        price = prices.price(record.model, record.provider, record.upstream_model)
    except KeyError:
        return None
    return usage_cost(price, record.usage, record.abandoned_tokens)


def _over_quota(held: Reservation, output: int) -> GatewayError | None:
    """The day's or month's quota cannot cover what the request may generate.

    Only the declared output counts here: the prompt's estimate (a token per 4 bytes) is
    too rough to refuse on, and a request that declares no limit is admitted while the
    quota is not spent, then charged what it used."""
    for index, window in enumerate(held.windows):
        limit = held.caller.token_limit(window.name)
        if window.name == "minute" or not limit or not output:
            continue
        left = max(0, limit - (held.used[index] - held.reserved))
        if output > left:
            return GatewayError(
                429,
                f"This request may generate up to {output} tokens (max_tokens for each of "
                f"its choices), more than the {left} left of this key's token quota for "
                f"the {window.name} (UTC). Lower max_tokens or n.",
                code="insufficient_quota",
                kind="insufficient_quota",
                headers={"x-should-retry": "false"},
            )
    return None


def _settle(
    budget: TokenBudget, prices: PriceBook, held: Reservation, record: RequestRecord
) -> None:
    tokens = settle_usage(record)  # the usage estimated, if the provider reported none
    record.cost = answer_cost(prices, record)
    record.currency = prices.currency
    budget.settle(held, tokens, money=record.cost or 0)


def _over_budget(held: Reservation, worst: int, currency: str) -> GatewayError:
    slot = held.full_slot
    assert slot is not None
    limit = -slot.limit
    used = held.values[held.slots.index(slot)]
    whose = f"team '{slot.owner.name}'" if slot.team else "key"
    period = "in all" if slot.window.name == "total" else f"for the {slot.window.name} (UTC)"
    resets = (
        "It does not reset."
        if slot.window.name == "total"
        else "It resets at "
        + datetime.fromtimestamp(slot.window.resets_at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        + "."
    )
    return GatewayError(
        429,
        f"This {whose}'s budget {period} is {money(limit)} {currency}: {money(used)} "
        f"{currency} is spent or held by requests in flight, and this request may cost up "
        f"to {money(worst)} {currency}. {resets} Lower max_tokens to fit what is left.",
        code="insufficient_quota",
        kind="insufficient_quota",
        headers={"x-should-retry": "false"},
    )


def _spent(held: Reservation) -> GatewayError:
    slot = held.full_slot
    assert slot is not None
    window = slot.window
    limit = slot.owner.token_limit(window.name)
    used = held.values[held.slots.index(slot)]
    wait = max(1, math.ceil(window.resets_at - time.time()))
    whose = f"team '{slot.owner.name}'" if slot.team else "key"
    if window.name == "minute":
        of_team = f" of {whose}" if slot.team else ""
        return GatewayError(
            429,
            f"Rate limit reached for tokens per minute{of_team}: {used} of {limit} used. "
            f"Retry in {wait}s.",
            kind="tokens",
            headers={"Retry-After": str(wait)},
        )
    resets = datetime.fromtimestamp(window.resets_at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return GatewayError(
        429,
        f"You exceeded this {whose}'s token quota for the {window.name} (UTC): {used} of "
        f"{limit} tokens used. The quota resets at {resets}.",
        code="insufficient_quota",
        kind="insufficient_quota",
        # Retrying cannot help before the reset: the SDKs honour this and raise at once.
        headers={"Retry-After": str(wait), "x-should-retry": "false"},
    )


def add_token_headers(response: Response) -> Response:
    """after_request: OpenAI's x-ratelimit-*-tokens for a key with a `tpm`."""
    caller: Caller | None = g.get("caller")
    if caller is None or not caller.tpm:
        return response
    held: Reservation | None = g.get("tokens")
    now = time.time()
    if held is not None:
        used = held.used[0]
    else:  # a request that reserved nothing (/v1/models, a refusal): read the window
        try:
            used = current_app.extensions["gateway.tokens"].read([caller], now)[0][0]
        except Exception as exc:  # noqa: BLE001 - the headers are not worth an error
            logger.debug("token headers skipped: {}", type(exc).__name__)
            return response
    minute = windows_at(now)[0]
    headers = response.headers
    headers["x-ratelimit-limit-tokens"] = str(caller.tpm)
    headers["x-ratelimit-remaining-tokens"] = str(max(0, caller.tpm - used))
    headers["x-ratelimit-reset-tokens"] = openai_duration(max(0.0, minute.resets_at - now))
    return response


def add_cost_header(response: Response) -> Response:
    """after_request: `x-gateway-cost` on a non-streamed answer whose usage the provider
    reported (a stream's cost is known only after its last byte: never on streams)."""
    record: RequestRecord | None = g.get("record")
    if record is None or response.is_streamed or not record.usage or record.usage_estimated:
        return response
    cost = answer_cost(current_app.extensions["gateway.prices"], record)
    if cost is not None:
        response.headers["x-gateway-cost"] = money(cost)
        response.headers["x-gateway-cost-currency"] = current_app.extensions[
            "gateway.prices"
        ].currency
    return response


def init_policy(app: Flask, budget: TokenBudget, prices: PriceBook) -> None:
    """Attach the token budget and prices. Call after the rate limiter: its header step
    runs first."""
    app.extensions["gateway.tokens"] = budget
    app.extensions["gateway.prices"] = prices
    app.after_request(add_token_headers)
    app.after_request(add_cost_header)
