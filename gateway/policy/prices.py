"""What an answer costs in money: the file's `prices:` and exact arithmetic over them.

Amounts are whole nano-units of the file's currency (1e-9): integers, so the counters add
them exactly in Redis, SQLite and memory, and a million answers drift by nothing. A price
is per million tokens, so one token at price p costs p x 1000 nano-units; an answer's cost
is computed in Decimal and rounded up to the nano-unit once.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Context, Decimal

from gateway.config import ModelRoute, Price, Pricing
from gateway.config.schema import PriceTier

NANOS = 10**9
# Enough digits for 1e8 tokens at any price the schema allows, with every decimal kept.
_EXACT = Context(prec=60)


@dataclass(frozen=True)
class Rates:
    """The per-million prices that apply to one answer (its tier chosen)."""

    input: Decimal
    cached_input: Decimal
    output: Decimal


def rates_for(price: Price, prompt_tokens: int) -> Rates:
    """The tier the prompt's size falls in: the last whose `above` it passes, else the base."""
    chosen: Price | PriceTier = price
    for tier in price.tiers:
        if prompt_tokens > tier.above:
            chosen = tier
    cached = chosen.input if chosen.cached_input is None else chosen.cached_input
    return Rates(chosen.input, cached, chosen.output)


def cost_nanos(price: Price, prompt: int, completion: int, cached: int = 0) -> int:
    """The cost of `prompt` tokens (of which `cached` from the provider's cache) and
    `completion` tokens, in nano-units, rounded up."""
    rates = rates_for(price, prompt)
    cached = min(max(0, cached), prompt)
    per_million = _EXACT.add(
        _EXACT.add(
            _EXACT.multiply(Decimal(prompt - cached), rates.input),
            _EXACT.multiply(Decimal(cached), rates.cached_input),
        ),
        _EXACT.multiply(Decimal(completion), rates.output),
    )
    return math.ceil(_EXACT.multiply(per_million, Decimal(NANOS // 10**6)))


def usage_cost(price: Price, usage: Mapping[str, int], extra_prompt: int = 0) -> int:
    """The cost of an answer's usage (the gateway's names), plus `extra_prompt` tokens of
    abandoned attempts charged at the input price."""
    prompt = usage.get("prompt_tokens", 0)
    completion = max(usage.get("completion_tokens", 0), usage.get("total_tokens", 0) - prompt)
    cost = cost_nanos(price, prompt, completion, usage.get("cached_tokens", 0))
    return cost + (cost_nanos(price, extra_prompt, 0) if extra_prompt else 0)


def money(nanos: int) -> str:
    """An amount as an exact decimal string: 1234500 -> "0.0012345"."""
    text = format(Decimal(nanos).scaleb(-9), "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


def to_nanos(amount: Decimal | None) -> int:
    return 0 if amount is None else math.ceil(_EXACT.multiply(amount, Decimal(NANOS)))


class PriceBook:
    """The prices of the file, looked up by deployment first, then by public model."""

    def __init__(self, pricing: Pricing, routes: tuple[ModelRoute, ...] = ()) -> None:
        self.currency = pricing.currency
        self.default_max_tokens = pricing.default_max_tokens
        self._models = dict(pricing.models)
        self._deployments = {(p.provider, p.model): p for p in pricing.deployments}
        self._routes = routes

    def price(self, model: str | None, provider: str | None, upstream: str | None) -> Price:
        """The price of the deployment that served (provider + its model name), else the
        public model's; raises KeyError naming what has none."""
        found: Price | None = self._deployments.get((provider or "", upstream or ""))
        if found is None:
            found = self._models.get(model or "")
        if found is None:
            raise KeyError(model or "")
        return found

    def candidates(self, model: str) -> list[Price]:
        """The prices of every deployment that may serve `model` (the first route that
        matches it, as the router picks); raises KeyError when one of them has none."""
        route = self._route(model)
        if route is None:
            return [self.price(model, None, None)]
        return [self.price(model, d.provider, d.model or model) for d in route.deployments]

    def _route(self, model: str) -> ModelRoute | None:
        """The route the router picks: the exact name, else the most specific pattern."""
        exact = next((r for r in self._routes if r.name == model and not r.is_pattern), None)
        patterns = sorted(
            (r for r in self._routes if r.is_pattern), key=lambda r: -len(r.name.replace("*", ""))
        )
        return exact or next((r for r in patterns if _matches(r.name, model)), None)

    def max_cost(self, model: str, prompt: int, output: int) -> int:
        """The most a request may cost wherever it is served: its prompt estimate at the
        input price plus its output limit at the output price."""
        return max(cost_nanos(price, prompt, output) for price in self.candidates(model))


def _matches(pattern: str, model: str) -> bool:
    """`*` is any run of characters; linear in the name (no regex to backtrack)."""
    first, *middle, last = pattern.split("*")
    if len(model) < len(first) + len(last) or not model.startswith(first):
        return False
    if not model.endswith(last):
        return False
    at, end = len(first), len(model) - len(last)
    for part in middle:
        found = model.find(part, at, end)
        if found < 0:
            return False
        at = found + len(part)
    return True
