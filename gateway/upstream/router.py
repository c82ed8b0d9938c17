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
  key cools every deployment of that provider: the account serves no one, and a
  credential rarely fixes itself. A failure given with a `fingerprint` (of the request
  body: a 5xx, a read timeout) counts only if no failure of this run had that fingerprint:
  one request that a provider cannot serve, sent again and again, is not the provider
  being down. Any answer that is not a failure resets the count (unless its request was
  sent before the last failure); the client tells a stream's verdict once it has ended,
  so one broken mid-body counts as one failure. Which answers are failures is attempts.py's.
- **Capacity.** A provider with `max_concurrent` requests in flight is skipped, as if it
  were cooling down, but without a penalty; the client answers 503 when all are full.

The state is this process's own (see the README on several replicas). Deployments whose
provider model is the client's own (wildcards) are keyed by the route's pattern (bounded
gauge labels), and keep, besides, a state per upstream model (the last `MODEL_STATES` used,
since the names are the clients'): one model's 429 or 5xx cools that model there, not
every model behind the route. A connection failure, a refused key or `Arrearage` is the
deployment's, whatever the model.
"""

from __future__ import annotations

import random
import threading
import time
import weakref
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from gateway.config import Deployment, ModelRoute, Provider, RoutingPolicy, Settings

# (provider name, provider model or the route's pattern): one deployment's state and labels.
DeploymentKey = tuple[str, str]
OnCooldown = Callable[[DeploymentKey, bool], None]
# Failures that say the provider serves no one with this account: all its deployments cool.
_WHOLE_PROVIDER = frozenset({"arrearage", "provider_auth"})
# Failures that are the deployment's whatever model it was asked for.
_DEPLOYMENT_WIDE = frozenset({"connect"})
# Upstream models of wildcard deployments with a state of their own, least recently used
# dropped first: the names are the clients' choice.
MODEL_STATES = 1024
# Fingerprints remembered per run of failures: enough to tell "the same request again".
_FINGERPRINTS = 16


@dataclass(frozen=True)
class Candidate:
    """One deployment of the request's route, ready to be tried."""

    provider: Provider
    upstream_model: str  # the model name the provider is asked for
    rewrite: bool  # the request body's `model` has to be replaced by upstream_model
    key: DeploymentKey
    weight: float
    # A wildcard deployment (the client's model sent upstream): health kept per model too.
    per_model: bool = False
    max_output_tokens: int | None = None  # the deployment's, if configured


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
    # The request bodies whose failure this run has counted (see Router.failed).
    fingerprints: list[int] = field(default_factory=list)

    def reset(self, now: float) -> None:
        self.failures = 0
        self.fingerprints.clear()
        if self.cooling_until > now:
            self.cooling_until = float("-inf")


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
        # Wildcard deployments: the client's model is sent, each with a state of its own.
        self._per_model = frozenset(
            _key(r, d) for r in patterns for d in r.deployments if d.model is None
        )
        self._lock = threading.Lock()
        self._health: dict[DeploymentKey, _Health] = {key: _Health() for key in self.keys}
        # Wildcard deployments' state per upstream model, bounded (least recently used out).
        self._models: OrderedDict[tuple[DeploymentKey, str], _Health] = OrderedDict()
        # Until when each deployment's gauge is on (its own cooldown or one of its models').
        self._gauged: dict[DeploymentKey, float] = {}
        # Deployments that refused stream_options once: never sent it again (a fixed set).
        self._no_stream_options: set[DeploymentKey] = set()
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

    def succeeded(
        self, key: DeploymentKey, started: float | None = None, *, model: str | None = None
    ) -> None:
        """Reset the count (and a cooldown), unless the attempt began before the last failure:
        a slow answer to a request sent before a 429 says nothing about the deployment now.
        `model`: the upstream model, whose own state (a wildcard deployment's) is reset too."""
        with self._lock:
            now = self._clock()
            states = [self._health[key]]
            if model is not None and (state := self._models.get((key, model))) is not None:
                states.append(state)
            for health in states:
                if started is None or started >= health.last_failure:
                    health.reset(now)
            self._regauge(key, now)
            self._refresh(now)

    def failed(
        self,
        key: DeploymentKey,
        outcome: str,
        retry_after: float | None = None,
        *,
        model: str | None = None,
        fingerprint: int | None = None,
    ) -> None:
        """Count a failure; `outcome` is rate_limited, arrearage, provider_auth or another.

        `model`: the upstream model (a wildcard deployment then counts it against that
        model alone); `fingerprint`: the request body's, for failures a request can cause
        by itself (the same body failing again in this run is not counted again)."""
        policy = self.policy
        with self._lock:
            now = self._clock()
            if outcome in _WHOLE_PROVIDER:
                same_provider = [k for k in self.keys if k[0] == key[0]]
                self._cool(same_provider, now, policy.cooldown)
                return
            health = self._state(key, model, outcome)
            if fingerprint is not None:
                if fingerprint in health.fingerprints:
                    return  # the same request again: nothing new about the deployment
                health.fingerprints = [*health.fingerprints[-_FINGERPRINTS + 1 :], fingerprint]
            health.failures += 1
            health.last_failure = now
            if outcome == "rate_limited":
                seconds = policy.rate_limited_cooldown
                if retry_after is not None:
                    seconds = min(max(retry_after, 0.0), policy.max_cooldown)
                self._cool_state(key, health, now, seconds)
            elif health.failures >= policy.failures_before_cooldown:
                # The count is kept: after the cooldown, one more failure cools it again.
                self._cool_state(key, health, now, policy.cooldown)

    def sends_stream_options(self, key: DeploymentKey) -> bool:
        """Whether the gateway may add stream_options to this deployment's streams."""
        with self._lock:
            return key not in self._no_stream_options

    def refuses_stream_options(self, key: DeploymentKey) -> None:
        """The deployment answered 400 to the stream_options the gateway added, and served
        the same request without it: never add it there again (this process)."""
        with self._lock:
            self._no_stream_options.add(key)

    def cooling(self) -> list[DeploymentKey]:
        """The deployments cooling down now (and the gauge brought up to date)."""
        with self._lock:
            now = self._clock()
            self._refresh(now)
            return [k for k, until in self._gauged.items() if until > now]

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
        ready = [c for c in candidates if self._cooling_until(c) <= now]
        if not ready:
            return (min(candidates, key=self._last_failure),)
        ordered = self._weighted_order(ready)
        if self.policy.strategy == "least-in-flight":
            ordered.sort(key=lambda c: self._in_flight[c.key])  # stable: random among equals
        return tuple(ordered)

    def _states(self, candidate: Candidate) -> list[_Health]:
        states = [self._health[candidate.key]]
        if candidate.per_model:
            state = self._models.get((candidate.key, candidate.upstream_model))
            if state is not None:
                states.append(state)
        return states

    def _cooling_until(self, candidate: Candidate) -> float:
        return max(h.cooling_until for h in self._states(candidate))

    def _last_failure(self, candidate: Candidate) -> float:
        return max(h.last_failure for h in self._states(candidate))

    def _state(self, key: DeploymentKey, model: str | None, outcome: str) -> _Health:
        """The state a failure counts against: a wildcard deployment's model's, unless the
        failure is the deployment's whatever the model (a connection refused)."""
        if model is None or key not in self._per_model or outcome in _DEPLOYMENT_WIDE:
            return self._health[key]
        state = self._models.get((key, model))
        if state is None:
            state = self._models[(key, model)] = _Health()
            if len(self._models) > MODEL_STATES:
                self._models.popitem(last=False)
        else:
            self._models.move_to_end((key, model))
        return state

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
            self._cool_state(key, self._health[key], now, seconds)

    def _cool_state(self, key: DeploymentKey, health: _Health, now: float, seconds: float) -> None:
        health.last_failure = now
        health.cooling_until = max(health.cooling_until, now + seconds)
        if key not in self._gauged:
            self._on_cooldown(key, True)
        self._gauged[key] = max(self._gauged.get(key, now), health.cooling_until)

    def _regauge(self, key: DeploymentKey, now: float) -> None:
        """After a reset: the gauge's end is the longest cooldown left at that deployment."""
        if key not in self._gauged:
            return
        until = self._health[key].cooling_until
        if key in self._per_model:
            for (deployment, _), state in self._models.items():
                if deployment == key:
                    until = max(until, state.cooling_until)
        self._gauged[key] = until

    def _refresh(self, now: float) -> None:
        for key in [k for k, until in self._gauged.items() if until <= now]:
            del self._gauged[key]
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
            per_model=_key(route, deployment) in self._per_model,
            max_output_tokens=deployment.max_output_tokens,
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


def keep_cooldowns_fresh(router: Router, every: float = 1.0) -> threading.Thread:
    """A worker's thread that turns its cooldown gauge off when a cooldown ends.

    With several workers (PROMETHEUS_MULTIPROC_DIR) a scrape reaches one of them, and
    `refresh` before a scrape updates only that one: another worker's ended cooldown would
    read 1 (and fire the shipped alert) until that worker happened to be scraped. The thread
    holds the router weakly and ends with it.
    """
    ref = weakref.ref(router)
    del router

    def run() -> None:
        while (alive := ref()) is not None:
            alive.refresh()
            del alive
            time.sleep(every)

    thread = threading.Thread(target=run, name="cooldown-gauge", daemon=True)
    thread.start()
    return thread
