"""Picking where a request goes: routes, deployments, load sharing, cooldowns and capacity.

The rules, in the order they apply:
- **Route.** The client's `model` is looked up as given (no trimming, no case folding):
  an exact public name wins; otherwise the `*` patterns are tried, the one with the most
  characters besides `*` first, ties in the order of the file (so `qwen-max-*` before
  `qwen-*` before `*`). `*` matches any run of characters, nothing else is special. No
  match: None, which the client turns into a 404 `model_not_found` without calling anyone.
- **Order.** The route's deployments that are not cooling down, in weighted random order
  (`least-in-flight`: fewest requests in flight first, weighted random among equals). If
  every one is cooling down, only the least recently failed one is tried: a model is never
  refused with nothing tried, and a provider that is down gets one request, not a burst.
- **Cooldown.** A deployment is skipped for `cooldown` after `failures_before_cooldown`
  failures in a row; after a 429 for its `Retry-After` (at most `max_cooldown`), else
  `rate_limited_cooldown`. A DashScope `Arrearage` or a provider refusing the gateway's
  key (401/403) cools every deployment of that provider: the account serves no one, and a
  credential rarely fixes itself. Any answer that is not a failure resets the count
  (unless its request was sent before the last failure); the client tells a stream's
  verdict once it has ended, so one broken mid-body counts as one failure.
- **Capacity.** A provider with `max_concurrent` requests in flight is skipped, as if it
  were cooling down, but without a penalty; the client answers 503 when all are full.

The state is this process's own (see the README on several replicas). Deployments whose
provider model is the client's own (wildcards) share one state per route: their key is
the route's pattern, so that the state and the cooldown gauge stay bounded.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from gateway.config import Deployment, ModelRoute, Provider, RoutingPolicy, Settings

# (provider name, provider model or the route's pattern): one deployment's state and labels.
DeploymentKey = tuple[str, str]
OnCooldown = Callable[[DeploymentKey, bool], None]
# Failures that say the provider serves no one with this account: all its deployments cool.
_WHOLE_PROVIDER = frozenset({"arrearage", "provider_auth"})


@dataclass(frozen=True)
class Candidate:
    """One deployment of the request's route, ready to be tried."""

    provider: Provider
    upstream_model: str  # the model name the provider is asked for
    rewrite: bool  # the request body's `model` has to be replaced by upstream_model
    key: DeploymentKey
    weight: float


@dataclass(frozen=True)
class Plan:
    """Where one request may go: its route and the candidates in the order to try them."""

    model: str
    route: str
    candidates: tuple[Candidate, ...]
    policy: RoutingPolicy


@dataclass
class _Health:
    failures: int = 0  # in a row
    cooling_until: float = float("-inf")
    last_failure: float = float("-inf")


class Slot:
    """A request in flight at one deployment; `release()` may be called any number of times."""

    def __init__(self, router: Router, candidate: Candidate, started: float) -> None:
        self._router = router
        self.candidate = candidate
        self.started = started  # the router's clock when the attempt began
        self._released = False

    def release(self) -> None:
        with self._router._lock:
            if not self._released:
                self._released = True
                self._router._leave(self.candidate)


class Router:
    def __init__(
        self,
        settings: Settings,
        *,
        clock: Callable[[], float] = time.monotonic,
        rand: random.Random | None = None,
        on_cooldown: OnCooldown | None = None,
    ) -> None:
        self.policy = settings.routing
        self._clock = clock
        self._random = rand or random.Random()
        self._on_cooldown = on_cooldown or _ignore
        self._providers = {p.name: p for p in settings.providers}
        self._exact = {r.name: r for r in settings.routes if not r.is_pattern}
        patterns = [r for r in settings.routes if r.is_pattern]
        # sorted() is stable: equally specific patterns keep the file's order.
        patterns.sort(key=lambda r: -len(r.name.replace("*", "")))
        self._patterns = [(_glob(r.name), r) for r in patterns]
        self.keys = tuple(dict.fromkeys(_key(r, d) for r in settings.routes for d in r.deployments))
        self._lock = threading.Lock()
        self._health: dict[DeploymentKey, _Health] = {key: _Health() for key in self.keys}
        self._gauged: set[DeploymentKey] = set()
        self._in_flight: Counter[DeploymentKey] = Counter()
        self._provider_in_flight: Counter[str] = Counter()

    @property
    def pattern_routes(self) -> tuple[ModelRoute, ...]:
        return tuple(route for _, route in self._patterns)

    @property
    def exact_routes(self) -> tuple[ModelRoute, ...]:
        return tuple(self._exact.values())

    def route(self, model: str) -> ModelRoute | None:
        found = self._exact.get(model)
        if found is not None:
            return found
        return next((r for matches, r in self._patterns if matches(model)), None)

    def plan(self, model: str) -> Plan | None:
        route = self.route(model)
        if route is None:
            return None
        candidates = [self._candidate(route, d, model) for d in route.deployments]
        with self._lock:
            self._refresh(self._clock())
            ordered = self._order(candidates)
        return Plan(model, route.name, ordered, self.policy)

    def acquire(self, candidate: Candidate) -> Slot | None:
        """A slot at the candidate's provider, or None while it has max_concurrent in flight."""
        name = candidate.provider.name
        limit = candidate.provider.max_concurrent
        with self._lock:
            if limit is not None and self._provider_in_flight[name] >= limit:
                return None
            self._provider_in_flight[name] += 1
            self._in_flight[candidate.key] += 1
            return Slot(self, candidate, self._clock())

    def succeeded(self, key: DeploymentKey, started: float | None = None) -> None:
        """Reset the count (and a cooldown), unless the attempt began before the last failure:
        a slow answer to a request sent before a 429 says nothing about the deployment now."""
        with self._lock:
            health = self._health[key]
            if started is not None and started < health.last_failure:
                return
            health.failures = 0
            if health.cooling_until > self._clock():
                health.cooling_until = float("-inf")
            self._refresh(self._clock())

    def failed(self, key: DeploymentKey, outcome: str, retry_after: float | None = None) -> None:
        """Count a failure; `outcome` is rate_limited, arrearage, provider_auth or another."""
        policy = self.policy
        with self._lock:
            now = self._clock()
            if outcome in _WHOLE_PROVIDER:
                same_provider = [k for k in self.keys if k[0] == key[0]]
                self._cool(same_provider, now, policy.cooldown)
                return
            health = self._health[key]
            health.failures += 1
            health.last_failure = now
            if outcome == "rate_limited":
                seconds = policy.rate_limited_cooldown
                if retry_after is not None:
                    seconds = min(max(retry_after, 0.0), policy.max_cooldown)
                self._cool([key], now, seconds)
            elif health.failures >= policy.failures_before_cooldown:
                # The count is kept: after the cooldown, one more failure cools it again.
                self._cool([key], now, policy.cooldown)

    def cooling(self) -> list[DeploymentKey]:
        """The deployments cooling down now (and the gauge brought up to date)."""
        with self._lock:
            now = self._clock()
            self._refresh(now)
            return [k for k, h in self._health.items() if h.cooling_until > now]

    def in_flight(self, key: DeploymentKey) -> int:
        with self._lock:
            return self._in_flight[key]

    def refresh(self) -> None:
        """Turn the cooldown gauge off for deployments whose cooldown is over (before a scrape)."""
        with self._lock:
            self._refresh(self._clock())

    # --- under the lock --------------------------------------------------------------
    def _order(self, candidates: list[Candidate]) -> tuple[Candidate, ...]:
        now = self._clock()
        ready = [c for c in candidates if self._health[c.key].cooling_until <= now]
        if not ready:
            return (min(candidates, key=lambda c: self._health[c.key].last_failure),)
        ordered = self._weighted_order(ready)
        if self.policy.strategy == "least-in-flight":
            ordered.sort(key=lambda c: self._in_flight[c.key])  # stable: random among equals
        return tuple(ordered)

    def _weighted_order(self, pool: list[Candidate]) -> list[Candidate]:
        pool = list(pool)
        ordered = []
        while pool:
            point = self._random.random() * sum(c.weight for c in pool)
            chosen = len(pool) - 1  # float rounding may leave `point` just above the sum
            for index, candidate in enumerate(pool):
                point -= candidate.weight
                if point < 0:
                    chosen = index
                    break
            ordered.append(pool.pop(chosen))
        return ordered

    def _cool(self, keys: Iterable[DeploymentKey], now: float, seconds: float) -> None:
        for key in keys:
            health = self._health[key]
            health.last_failure = now
            health.cooling_until = max(health.cooling_until, now + seconds)
            if key not in self._gauged:
                self._gauged.add(key)
                self._on_cooldown(key, True)

    def _refresh(self, now: float) -> None:
        for key in [k for k in self._gauged if self._health[k].cooling_until <= now]:
            self._gauged.discard(key)
            self._on_cooldown(key, False)

    def _leave(self, candidate: Candidate) -> None:
        self._in_flight[candidate.key] -= 1
        self._provider_in_flight[candidate.provider.name] -= 1

    def _candidate(self, route: ModelRoute, deployment: Deployment, model: str) -> Candidate:
        upstream_model = deployment.model or model
        return Candidate(
            provider=self._providers[deployment.provider],
            upstream_model=upstream_model,
            rewrite=upstream_model != model,
            key=_key(route, deployment),
            weight=deployment.weight,
        )


def _key(route: ModelRoute, deployment: Deployment) -> DeploymentKey:
    return (deployment.provider, deployment.model or route.name)


def _glob(pattern: str) -> Callable[[str], bool]:
    """Whether a model name matches `pattern`, where `*` is any run of characters (newlines
    too) and nothing else is special. Linear in the name: a regex with several `.*`
    backtracks, and `a*b*c` against a 1 MB model name ran for hours holding the GIL."""
    first, *middle, last = pattern.split("*")

    def matches(model: str) -> bool:
        end = len(model) - len(last)
        if end < len(first) or not model.startswith(first) or not model.endswith(last):
            return False
        position = len(first)
        for part in middle:  # leftmost is always right when `*` is the only wildcard
            found = model.find(part, position, end)
            if found < 0:
                return False
            position = found + len(part)
        return True

    return matches


def _ignore(key: DeploymentKey, on: bool) -> None:
    del key, on
