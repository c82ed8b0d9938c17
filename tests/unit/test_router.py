"""The router's choices, with an injected clock and random source: no network, no sleeping."""

from __future__ import annotations

import random
import subprocess
import sys
from collections import Counter

import pytest

from gateway.config import Deployment, ModelRoute, Provider, RoutingPolicy, Settings
from gateway.upstream.router import DeploymentKey, Router
from tests.constants import GATEWAY_KEY


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def provider(name: str, **fields: object) -> Provider:
    return Provider(
        name=name, base_url=f"http://{name}.test/v1", api_key=f"sk-{name}-key-0123456789", **fields
    )


def settings(
    routes: dict[str, list[Deployment]],
    providers: tuple[Provider, ...] = (),
    **policy: object,
) -> Settings:
    names = {d.provider for deployments in routes.values() for d in deployments}
    known = {p.name for p in providers}
    providers = providers + tuple(provider(n) for n in sorted(names - known))
    return Settings(
        target_api_key="",
        gateway_api_keys=(GATEWAY_KEY,),
        providers=providers,
        routes=tuple(ModelRoute(name=n, deployments=tuple(d)) for n, d in routes.items()),
        routing=RoutingPolicy(**policy),
    )


def d(provider_name: str, model: str | None = None, weight: float = 1.0) -> Deployment:
    return Deployment(provider=provider_name, model=model, weight=weight)


def order(router: Router, model: str) -> list[str]:
    plan = router.plan(model)
    assert plan is not None
    return [c.provider.name for c in plan.candidates]


ROUTES = {
    "gpt-4o-mini": [d("cn", "qwen-plus")],
    "qwen-max-*": [d("intl")],
    "qwen-*": [d("cn")],
    "*": [d("vllm")],
}


@pytest.mark.parametrize(
    ("model", "route", "provider_name", "upstream_model"),
    [
        ("gpt-4o-mini", "gpt-4o-mini", "cn", "qwen-plus"),  # an alias: rewritten
        ("qwen-max-latest", "qwen-max-*", "intl", "qwen-max-latest"),  # most specific pattern
        ("qwen-plus", "qwen-*", "cn", "qwen-plus"),
        ("llama3", "*", "vllm", "llama3"),
        ("GPT-4O-MINI", "*", "vllm", "GPT-4O-MINI"),  # exact means exact: no case folding
        ("gpt-4o-mini ", "*", "vllm", "gpt-4o-mini "),  # nor trimming
    ],
)
def test_exact_names_then_the_most_specific_pattern(
    model: str, route: str, provider_name: str, upstream_model: str
) -> None:
    plan = Router(settings(ROUTES)).plan(model)

    assert plan is not None
    assert plan.route == route
    [candidate] = plan.candidates
    assert (candidate.provider.name, candidate.upstream_model) == (provider_name, upstream_model)
    assert candidate.rewrite == (upstream_model != model)


def test_equally_specific_patterns_keep_the_files_order() -> None:
    router = Router(settings({"a-*": [d("first")], "*-b": [d("second")]}))

    assert order(router, "a-b") == ["first"]


@pytest.mark.parametrize(
    "model",
    ["qwen-plus\r\nX-Injected: 1", "qwen-\x00plus", "qwen-.*", "qwen-plus\n", "qwen-ä"],
)
def test_odd_bytes_in_a_model_name_match_only_as_text(model: str) -> None:
    # Regex characters in names are literal, `*` spans anything, and nothing is stripped:
    # such a name reaches qwen-* (it starts with "qwen-") and never the alias.
    router = Router(settings({"gpt-4o-mini": [d("cn", "qwen-plus")], "qwen-*": [d("intl")]}))

    plan = router.plan(model)

    assert plan is not None
    assert plan.route == "qwen-*"
    assert plan.candidates[0].upstream_model == model


@pytest.mark.parametrize(
    ("model", "matched"),
    [
        ("a-x-b-y-c", True),
        ("abc", True),
        ("a-b", False),  # no "c" after the "b"
        ("a-c-b", False),  # the parts in order
        ("a-b-c-b", False),  # "c" must end it
        ("ab-cb-c", True),
        ("ac", False),
    ],
)
def test_a_pattern_with_several_stars_matches_its_parts_in_order(model: str, matched: bool) -> None:
    router = Router(settings({"a*b*c": [d("first")]}))

    assert (router.plan(model) is not None) == matched


def test_matching_a_huge_model_name_does_not_backtrack() -> None:
    # A body may hold a 10 MB model name. A regex `a.*b.*c` against "a" + 1M "b"s backtracks
    # quadratically (hours, with the GIL held: the whole worker stalls): run it apart.
    code = (
        "from tests.unit.test_router import Router, settings, d\n"
        "router = Router(settings({'a*b*c': [d('first')], '*': [d('other')]}))\n"
        "print(router.plan('a' + 'b' * 1_000_000).route)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )

    assert done.stdout.strip() == "*"


@pytest.mark.parametrize("model", ["qwen", "xqwen-plus", "gpt-4o-mini\x00", ""])
def test_no_route_is_none(model: str) -> None:
    router = Router(settings({"gpt-4o-mini": [d("cn", "qwen-plus")], "qwen-*": [d("cn")]}))

    assert router.plan(model) is None


def test_weights_share_the_first_choice() -> None:
    # Seeded: the same draws every run; the tolerance covers any seed's 10,000 draws.
    routes = {"m": [d("a", weight=3), d("b", weight=1)]}
    router = Router(settings(routes), rand=random.Random(7))

    firsts = Counter(order(router, "m")[0] for _ in range(10_000))

    assert 0.72 <= firsts["a"] / 10_000 <= 0.78
    assert set(firsts) == {"a", "b"}


def test_every_deployment_is_in_the_plan_once() -> None:
    router = Router(settings({"m": [d("a"), d("b"), d("c")]}), rand=random.Random(1))

    for _ in range(50):
        assert sorted(order(router, "m")) == ["a", "b", "c"]


class Scripted(random.Random):
    def __init__(self, values: list[float]) -> None:
        super().__init__()
        self.values = values

    def random(self) -> float:
        return self.values.pop(0)


def test_a_draw_picks_by_cumulative_weight() -> None:
    routes = {"m": [d("a", weight=1), d("b", weight=3)]}

    # 0.2 * 4 = 0.8 < 1: a; then b is all that is left.
    assert order(Router(settings(routes), rand=Scripted([0.2, 0.0])), "m") == ["a", "b"]
    # 0.3 * 4 = 1.2 >= 1: b.
    assert order(Router(settings(routes), rand=Scripted([0.3, 0.0])), "m") == ["b", "a"]


def test_least_in_flight_prefers_the_idle_deployment() -> None:
    routes = {"m": [d("a"), d("b")]}
    router = Router(settings(routes, strategy="least-in-flight"), rand=random.Random(3))
    plan = router.plan("m")
    assert plan is not None
    busy = plan.candidates[0]
    slot = router.acquire(busy)
    assert slot is not None

    idle = "b" if busy.provider.name == "a" else "a"
    assert all(order(router, "m")[0] == idle for _ in range(20))
    slot.release()
    slot.release()  # twice is harmless
    assert router.in_flight(busy.key) == 0


def test_failures_in_a_row_cool_a_deployment_down_until_its_cooldown_ends() -> None:
    clock = Clock()
    routes = {"m": [d("a"), d("b")]}
    router = Router(
        settings(routes, failures_before_cooldown=2, cooldown=30),
        clock=clock,
        rand=random.Random(2),
    )
    a: DeploymentKey = ("a", "m")

    router.failed(a, "connect")
    assert "a" in order(router, "m")  # one failure is not enough
    router.failed(a, "connect")
    assert order(router, "m") == ["b"]
    clock.now += 29.9
    assert order(router, "m") == ["b"]
    clock.now += 0.2
    assert sorted(order(router, "m")) == ["a", "b"]


def test_a_success_resets_the_count() -> None:
    router = Router(settings({"m": [d("a"), d("b")]}, failures_before_cooldown=2), clock=Clock())
    a: DeploymentKey = ("a", "m")

    router.failed(a, "server_error")
    router.succeeded(a)
    router.failed(a, "server_error")

    assert router.cooling() == []


def test_429_cools_down_for_retry_after_capped_by_max_cooldown() -> None:
    clock = Clock()
    routes = {"m": [d("a"), d("b")]}
    router = Router(settings(routes, max_cooldown=60, rate_limited_cooldown=10), clock=clock)
    a: DeploymentKey = ("a", "m")

    router.failed(a, "rate_limited", retry_after=3600)
    clock.now += 59
    assert router.cooling() == [a]
    clock.now += 2
    assert router.cooling() == []

    router.failed(a, "rate_limited", retry_after=None)  # DashScope sends none
    clock.now += 9
    assert router.cooling() == [a]
    clock.now += 2
    assert router.cooling() == []


def test_a_success_begun_before_a_429_does_not_end_its_cooldown() -> None:
    clock = Clock()
    router = Router(settings({"m": [d("a"), d("b")]}), clock=clock)
    a: DeploymentKey = ("a", "m")
    plan = router.plan("m")
    assert plan is not None
    candidate = next(c for c in plan.candidates if c.key == a)
    slow = router.acquire(candidate)  # a long answer, sent before the 429
    assert slow is not None
    clock.now += 1
    router.failed(a, "rate_limited", retry_after=60)  # another request's 429
    clock.now += 1

    router.succeeded(a, slow.started)  # the slow one ends well: old news

    assert router.cooling() == [a]
    probe = router.acquire(candidate)  # sent after the 429: its success counts
    assert probe is not None
    router.succeeded(a, probe.started)
    assert router.cooling() == []


def test_arrearage_cools_every_deployment_of_that_provider() -> None:
    routes = {"m": [d("cn", "qwen-plus"), d("intl", "qwen-plus")], "n": [d("cn", "qwen-max")]}
    router = Router(settings(routes, cooldown=30), clock=Clock())

    router.failed(("cn", "qwen-plus"), "arrearage")

    assert sorted(router.cooling()) == [("cn", "qwen-max"), ("cn", "qwen-plus")]
    assert order(router, "m") == ["intl"]


def test_a_refused_key_cools_every_deployment_of_that_provider() -> None:
    routes = {"m": [d("cn", "qwen-plus"), d("intl", "qwen-plus")], "n": [d("cn", "qwen-max")]}
    router = Router(settings(routes, cooldown=30), clock=Clock())

    router.failed(("cn", "qwen-plus"), "provider_auth")  # once is enough

    assert sorted(router.cooling()) == [("cn", "qwen-max"), ("cn", "qwen-plus")]
    assert order(router, "m") == ["intl"]


def test_when_all_are_cooling_the_least_recently_failed_is_tried_alone() -> None:
    clock = Clock()
    routes = {"m": [d("a"), d("b"), d("c")]}
    router = Router(settings(routes, failures_before_cooldown=1, cooldown=300), clock=clock)

    for name in ("b", "a", "c"):  # b failed longest ago
        router.failed((name, "m"), "connect")
        clock.now += 1

    assert order(router, "m") == ["b"]


def test_the_cooldown_gauge_turns_on_and_off() -> None:
    clock = Clock()
    changes: list[tuple[DeploymentKey, bool]] = []
    router = Router(
        settings({"m": [d("a")]}, rate_limited_cooldown=5),
        clock=clock,
        on_cooldown=lambda key, on: changes.append((key, on)),
    )

    router.failed(("a", "m"), "rate_limited")
    router.failed(("a", "m"), "rate_limited")  # still cooling: no second "on"
    router.refresh()
    clock.now += 6
    router.refresh()
    router.refresh()

    assert changes == [(("a", "m"), True), (("a", "m"), False)]


def test_max_concurrent_is_per_provider_across_its_deployments() -> None:
    limited = provider("a", max_concurrent=2)
    routes = {"m": [d("a", "x")], "n": [d("a", "y")]}
    router = Router(settings(routes, providers=(limited,)))
    x = router.plan("m")
    y = router.plan("n")
    assert x is not None and y is not None

    first = router.acquire(x.candidates[0])
    second = router.acquire(y.candidates[0])
    assert first is not None and second is not None
    assert router.acquire(x.candidates[0]) is None
    second.release()
    assert router.acquire(x.candidates[0]) is not None


def test_wildcard_deployments_share_one_state_per_route() -> None:
    # Keyed by the pattern, not by each client model: bounded state and gauge labels.
    router = Router(settings({"qwen-*": [d("cn")]}, failures_before_cooldown=1), clock=Clock())
    plan = router.plan("qwen-turbo")
    assert plan is not None

    router.failed(plan.candidates[0].key, "connect")

    assert router.cooling() == [("cn", "qwen-*")]
    assert router.keys == (("cn", "qwen-*"),)


def test_a_failure_with_a_fingerprint_already_counted_is_not_counted_again() -> None:
    router = Router(settings({"m": [d("a"), d("b")]}, failures_before_cooldown=2), clock=Clock())
    a: DeploymentKey = ("a", "m")

    for _ in range(5):  # the same request body failing again and again
        router.failed(a, "server_error", fingerprint=1)
    assert router.cooling() == []
    router.failed(a, "server_error", fingerprint=2)  # another request fails too
    assert router.cooling() == [a]


def test_a_wildcard_deployment_cools_per_model_but_a_refused_connection_for_all() -> None:
    router = Router(settings({"*": [d("a"), d("b")]}, failures_before_cooldown=1), clock=Clock())

    router.failed(("a", "*"), "server_error", model="x")
    assert (order(router, "x"), sorted(order(router, "y"))) == (["b"], ["a", "b"])
    router.failed(("a", "*"), "connect", model="y")
    assert order(router, "z") == ["b"]
    assert router.cooling() == [("a", "*")]


def test_stream_options_are_dropped_for_a_deployment_that_refused_them() -> None:
    router = Router(settings({"m": [d("a"), d("b")]}))

    router.refuses_stream_options(("a", "m"))

    assert not router.sends_stream_options(("a", "m"))
    assert router.sends_stream_options(("b", "m"))


def test_a_worker_turns_its_cooldown_gauge_off_without_being_scraped() -> None:
    import gc
    import threading

    from gateway.upstream.router import keep_cooldowns_fresh

    clock = Clock()
    changes: list[tuple[DeploymentKey, bool]] = []
    off = threading.Event()

    def on_cooldown(key: DeploymentKey, on: bool) -> None:
        changes.append((key, on))
        if not on:
            off.set()

    router = Router(
        settings({"m": [d("a", "x")]}, rate_limited_cooldown=5),
        clock=clock,
        on_cooldown=on_cooldown,
    )
    router.failed(("a", "x"), "rate_limited")
    assert changes == [(("a", "x"), True)]
    thread = keep_cooldowns_fresh(router, every=0.01)
    clock.now += 6  # the cooldown has ended; nobody scrapes this worker
    assert off.wait(5), "the gauge stayed on"
    assert changes[-1] == (("a", "x"), False)
    del router
    gc.collect()
    thread.join(5)  # it holds the router weakly: gone with it
    assert not thread.is_alive()
