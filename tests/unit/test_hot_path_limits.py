"""The request limit's hot path: the oldest-first memory storage and GatewayLimiter's fast path.

GatewayMemoryStorage must answer as limits' own MemoryStorage does, hit for hit, on a clock
the test drives; GatewayLimiter must hit the key flask-limiter's generic path hits and answer
exactly as that path does (statuses and headers), and fail open as before.
"""

from __future__ import annotations

import bisect
import random
import sys
import types
from collections.abc import Callable, Iterator
from typing import Any

import limits.storage.memory
import pytest
import responses
from flask import Flask
from flask_limiter import Limiter
from limits import RateLimitItemPerMinute, RateLimitItemPerSecond, parse
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter
from prometheus_client.parser import text_string_to_metric_families

import gateway.limits
from gateway.auth import key_id
from gateway.limits import GatewayLimiter, GatewayMemoryStorage
from tests.constants import GATEWAY_KEY, UNIT_UPSTREAM
from tests.unit.support import MakeApp

# 2027-01-15T08:00:00Z
T0 = 1_800_000_000.0
MODELS = f"{UNIT_UPSTREAM}/models"
AUTH = {"Authorization": f"Bearer {GATEWAY_KEY}"}
RATE_HEADERS = (
    "x-ratelimit-limit-requests",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-reset-requests",
    "Retry-After",
)


class Clock:
    """Stands for the `time` module where the storages read `time.time()`."""

    def __init__(self, now: float) -> None:
        self.now = now

    def time(self) -> float:
        return self.now


STORAGE_MODULE = sys.modules[GatewayMemoryStorage.__module__]


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    """One clock for limits' Entry (it stamps hits), the gateway's storage and its headers."""
    clock = Clock(T0)
    monkeypatch.setattr(limits.storage.memory, "time", clock)
    monkeypatch.setattr(STORAGE_MODULE, "time", clock)
    monkeypatch.setattr(gateway.limits, "time", clock)
    return clock


def _quiet(storage: MemoryStorage) -> MemoryStorage:
    """No timer thread: a storage is swept only when the test says so."""
    storage.timer.cancel()
    storage.timer.join()
    storage._MemoryStorage__schedule_expiry = lambda: None  # type: ignore[attr-defined]
    return storage


def _sweep_stock(storage: MemoryStorage) -> None:
    storage._MemoryStorage__expire_events()  # type: ignore[attr-defined]


@pytest.fixture
def storages(clock: Clock) -> Iterator[tuple[MemoryStorage, GatewayMemoryStorage]]:
    stock = _quiet(MemoryStorage())
    ours = _quiet(GatewayMemoryStorage())
    assert isinstance(ours, GatewayMemoryStorage)
    yield stock, ours


# key: (limit, expiry). Real keys always come with one limit and one period.
KEYS = {"a": (5, 10), "b": (1, 3), "c": (20, 60), "d": (3, 1)}


def _amount(rng: random.Random, limit: int) -> int:
    return rng.choice([1, 1, 1, 1, 2, 3, limit, limit + 1])


def _tick(rng: random.Random) -> float:
    # Often no time at all (hits in the same instant), sometimes a long pause that empties
    # windows; continuous values, so no hit is ever exactly `expiry` old (see the test below
    # for that instant).
    return rng.choice([0.0, 0.0, rng.uniform(0, 0.5), rng.uniform(0, 3), rng.uniform(5, 70)])


def _same_window(
    stock: tuple[float, int], ours: tuple[float, int], now: float, expiry: int
) -> None:
    assert ours[1] == stock[1]
    if stock[1]:
        assert ours[0] == stock[0]
    else:
        # An empty window: limits answers the time of its oldest stale hit until its sweep
        # has run, then `now`; the gateway's storage answers `now` either way.
        assert ours[0] == now
        assert stock[0] == now or stock[0] <= now - expiry


@pytest.mark.parametrize("seed", range(6))
def test_gives_the_stock_storages_answers_over_a_long_random_run(
    storages: tuple[MemoryStorage, GatewayMemoryStorage], clock: Clock, seed: int
) -> None:
    stock, ours = storages
    rng = random.Random(seed)
    decisions = {True: 0, False: 0}
    for step in range(4000):
        clock.now += _tick(rng)
        key = rng.choice(list(KEYS))
        limit, expiry = KEYS[key]
        action = rng.random()
        if action < 0.6:
            amount = _amount(rng, limit)
            expected = stock.acquire_entry(key, limit, expiry, amount)
            assert ours.acquire_entry(key, limit, expiry, amount) == expected, (step, key)
            decisions[expected] += 1
        elif action < 0.9:
            _same_window(
                stock.get_moving_window(key, limit, expiry),
                ours.get_moving_window(key, limit, expiry),
                clock.now,
                expiry,
            )
        elif action < 0.95:  # both swept at the same instant
            _sweep_stock(stock)
            ours._sweep()
        else:  # only ours: its sweep is once a second, not every 10 ms
            ours._sweep()
    assert decisions[True] > 500 and decisions[False] > 500  # both answers were exercised


@pytest.mark.parametrize("seed", range(3))
def test_the_one_step_hit_is_the_stock_hit_then_its_window(
    storages: tuple[MemoryStorage, GatewayMemoryStorage], clock: Clock, seed: int
) -> None:
    stock, ours = storages
    rng = random.Random(100 + seed)
    for _ in range(2000):
        clock.now += _tick(rng)
        key = rng.choice(list(KEYS))
        limit, expiry = KEYS[key]
        acquired, window = ours.acquire_with_window(key, limit, expiry)
        expected = stock.acquire_entry(key, limit, expiry)
        start, count = stock.get_moving_window(key, limit, expiry)
        assert acquired == expected
        assert count >= 1  # just hit, or refused for a full window: never empty
        assert (window.reset_time, window.remaining) == (start + expiry, limit - count)
        if rng.random() < 0.05:
            ours._sweep()


@pytest.mark.parametrize("seed", range(3))
def test_sweeping_never_changes_a_decision(clock: Clock, seed: int) -> None:
    swept = _quiet(GatewayMemoryStorage())
    never = _quiet(GatewayMemoryStorage())
    assert isinstance(swept, GatewayMemoryStorage)
    assert isinstance(never, GatewayMemoryStorage)
    rng = random.Random(200 + seed)
    for _ in range(3000):
        clock.now += _tick(rng)
        key = rng.choice(list(KEYS))
        limit, expiry = KEYS[key]
        amount = _amount(rng, limit)
        assert swept.acquire_entry(key, limit, expiry, amount) == never.acquire_entry(
            key, limit, expiry, amount
        )
        assert swept.get_moving_window(key, limit, expiry) == never.get_moving_window(
            key, limit, expiry
        )
        swept._sweep()
        # What the sweep keeps: only hits that have not expired, oldest first.
        for events in swept.events.values():
            assert events
            assert all(e.expiry > clock.now for e in events)
            assert [e.atime for e in events] == sorted(e.atime for e in events)
    assert sum(len(e) for e in never.events.values()) > sum(len(e) for e in swept.events.values())


def test_the_sweep_drops_expired_hits_and_empty_keys(
    storages: tuple[MemoryStorage, GatewayMemoryStorage], clock: Clock
) -> None:
    _, ours = storages
    for _ in range(3):
        ours.acquire_entry("old", 5, 10)
    clock.now += 5
    ours.acquire_entry("young", 5, 10)
    ours.acquire_entry("old", 5, 10)

    clock.now += 6  # the first three hits are 11 s old, the others 6 s
    ours._sweep()

    assert [e.atime for e in ours.events["old"]] == [T0 + 5]
    assert [e.atime for e in ours.events["young"]] == [T0 + 5]
    clock.now += 5
    ours._sweep()
    assert ours.events == {}
    assert "old" not in ours.locks and "young" not in ours.locks
    assert ours.acquire_entry("old", 1, 10)  # a key swept away starts afresh


def test_at_the_exact_instant_a_hit_expires_both_storages_still_count_it_until_swept(
    storages: tuple[MemoryStorage, GatewayMemoryStorage], clock: Clock
) -> None:
    # A hit exactly `expiry` old is still in the window for acquire_entry (atime >= now -
    # expiry), and both sweeps drop it at that instant (expiry <= now). Both storages agree.
    stock, ours = storages
    for storage in (stock, ours):
        assert storage.acquire_entry("k", 1, 10)
    clock.now += 10
    assert ours.acquire_entry("k", 1, 10) == stock.acquire_entry("k", 1, 10) is False
    # The gateway's window counts that hit as its own acquire does; limits' get_moving_window
    # counts hits strictly younger than `expiry` (so says 0 here while refusing).
    assert ours.get_moving_window("k", 1, 10) == (T0, 1)
    _sweep_stock(stock)
    ours._sweep()
    assert ours.acquire_entry("k", 1, 10) == stock.acquire_entry("k", 1, 10) is True


def test_amount_above_the_limit_is_refused_and_takes_nothing(
    storages: tuple[MemoryStorage, GatewayMemoryStorage],
) -> None:
    stock, ours = storages
    for storage in (stock, ours):
        assert not storage.acquire_entry("k", 3, 10, amount=4)
        assert storage.get_moving_window("k", 3, 10)[1] == 0
        assert storage.acquire_entry("k", 3, 10, amount=3)
        assert not storage.acquire_entry("k", 3, 10, amount=1)
        assert storage.get_moving_window("k", 3, 10) == (T0, 3)


def test_a_sweep_between_the_search_and_the_read_does_not_change_the_window(
    storages: tuple[MemoryStorage, GatewayMemoryStorage],
    clock: Clock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # get_moving_window takes no lock, and the sweep runs in a timer thread: a thread switch
    # may come right after the reader's binary search. limits' own sweep puts a new list in
    # place, so its reader keeps a consistent one; the gateway's must be as safe, since
    # flask-limiter reads the window this way for a 429's headers (Retry-After).
    stock, ours = storages
    for offset in (0, 30, 40):
        clock.now = T0 + offset
        assert ours.acquire_entry("k", 3, 60)
        assert stock.acquire_entry("k", 3, 60)
    clock.now = T0 + 61  # the first hit has left the window and expired

    def sweep_once_after(sweep: Callable[[], None]) -> Callable[..., int]:
        pending = [sweep]

        def searched(*args: Any, **kwargs: Any) -> int:
            found = bisect.bisect_left(*args, **kwargs)
            if pending:
                pending.pop()()  # the timer thread's sweep runs here, once
            return found

        return searched

    answers = []
    for storage, module, sweep in (
        (stock, limits.storage.memory, lambda: _sweep_stock(stock)),
        (ours, STORAGE_MODULE, ours._sweep),
    ):
        with monkeypatch.context() as patch:
            patch.setattr(
                module,
                "bisect",
                types.SimpleNamespace(
                    bisect_left=sweep_once_after(sweep), bisect_right=bisect.bisect_right
                ),
            )
            answers.append(storage.get_moving_window("k", 3, 60))
        assert [e.atime for e in storage.events["k"]] in ([T0 + 30, T0 + 40], [T0 + 40, T0 + 30])

    assert answers[0] == (T0 + 30, 2)  # limits' MemoryStorage
    assert answers[1] == (T0 + 30, 2)  # the gateway's


def _rate_limiters(
    storages: tuple[MemoryStorage, GatewayMemoryStorage],
) -> tuple[MovingWindowRateLimiter, MovingWindowRateLimiter]:
    stock, ours = storages
    return MovingWindowRateLimiter(stock), MovingWindowRateLimiter(ours)


@pytest.mark.parametrize("seed", range(3))
def test_moving_window_rate_limiter_answers_the_same_on_both_storages(
    storages: tuple[MemoryStorage, GatewayMemoryStorage], clock: Clock, seed: int
) -> None:
    stock, ours = _rate_limiters(storages)
    items = [parse("5/minute"), RateLimitItemPerSecond(2), parse("1/10 seconds")]
    rng = random.Random(300 + seed)
    for step in range(3000):
        clock.now += rng.choice([0.0, rng.uniform(0, 0.7), rng.uniform(0, 12), rng.uniform(0, 61)])
        item = rng.choice(items)
        who = rng.choice(["alice", "bob"])
        cost = rng.choice([1, 1, 1, 2, item.amount + 1])
        action = rng.random()
        if action < 0.5:
            assert ours.hit(item, who, cost=cost) == stock.hit(item, who, cost=cost), step
        elif action < 0.7:
            assert ours.test(item, who, cost=cost) == stock.test(item, who, cost=cost), step
        else:
            mine, theirs = ours.get_window_stats(item, who), stock.get_window_stats(item, who)
            assert mine.remaining == theirs.remaining, step
            if theirs.remaining < item.amount:
                assert mine.reset_time == theirs.reset_time, step
            else:  # an empty window starts now (limits: now once swept)
                assert mine.reset_time == clock.now + item.get_expiry()
        if rng.random() < 0.03:
            storages[1]._sweep()


def test_exactly_the_limit_passes_per_window_through_the_rate_limiter(
    storages: tuple[MemoryStorage, GatewayMemoryStorage], clock: Clock
) -> None:
    _, ours = _rate_limiters(storages)
    item = RateLimitItemPerMinute(7)
    admitted: list[float] = []
    for _ in range(3 * 60 * 4):  # three minutes, four tries a second
        clock.now += 0.25
        if ours.hit(item, "k"):
            admitted.append(clock.now)
    for start in admitted:
        assert sum(1 for t in admitted if start <= t <= start + 60) <= 7
    # Every window of 60 s holds 7: the 8th hit waits for the first to be more than 60 s old.
    assert len(admitted) == 7 * 3
    assert admitted[7] == pytest.approx(admitted[0] + 60.25)


# --- GatewayLimiter's fast path --------------------------------------------------------


def _generic(monkeypatch: pytest.MonkeyPatch) -> None:
    """Apps built after this check every request through flask-limiter's own path."""
    monkeypatch.setattr(GatewayLimiter, "_check_request_limit", Limiter._check_request_limit)


def _storage_of(app: Flask) -> GatewayMemoryStorage:
    storage = app.extensions["gateway.limiter"].storage
    assert isinstance(storage, GatewayMemoryStorage)
    return storage


def _rate_headers(headers: Any) -> dict[str, str]:
    return {name: headers[name] for name in RATE_HEADERS if name in headers}


def _run(app: Flask, clock: Clock, times: list[float]) -> list[tuple[int, dict[str, str]]]:
    client = app.test_client()
    answers = []
    for at in times:
        clock.now = T0 + at
        response = client.get("/v1/models", headers=AUTH)
        response.close()
        answers.append((response.status_code, _rate_headers(response.headers)))
    return answers


def _rejections(app: Flask) -> float:
    text = app.test_client().get("/metrics").get_data(as_text=True)
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "gateway_key_rejections_total" and sample.labels["reason"] == "rpm"
    )


def test_the_fast_path_hits_the_key_of_flask_limiters_own_path(
    make_app: MakeApp,
    upstream: responses.RequestsMock,
    clock: Clock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    upstream.get(MODELS, json={"data": []})
    fast = make_app(rate_limit_per_minute=3)
    with monkeypatch.context() as patch:
        _generic(patch)
        generic = make_app(rate_limit_per_minute=3)

    _run(fast, clock, [0.0])
    _run(generic, clock, [0.0])

    expected = f"LIMITER/ai-gateway/{key_id(GATEWAY_KEY)}/global/3/1/minute"
    assert list(_storage_of(generic).events) == [expected]
    assert list(_storage_of(fast).events) == [expected]


def test_an_admitted_request_never_takes_flask_limiters_own_path(
    make_app: MakeApp,
    upstream: responses.RequestsMock,
    clock: Clock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    upstream.get(MODELS, json={"data": []})
    app = make_app(rate_limit_per_minute=2)
    generic_calls: list[str] = []
    own_path = Limiter._check_request_limit

    def counted(self: Limiter, *args: Any, **kwargs: Any) -> None:
        generic_calls.append("called")
        return own_path(self, *args, **kwargs)

    monkeypatch.setattr(Limiter, "_check_request_limit", counted)

    answers = _run(app, clock, [0.0, 1.0, 2.0])

    assert [status for status, _ in answers] == [200, 200, 429]
    assert generic_calls == ["called"]  # the breach only: it answers the 429
    assert len(_storage_of(app).events[next(iter(_storage_of(app).events))]) == 2


def test_the_fast_path_answers_exactly_as_flask_limiters_own_path_on_one_clock(
    make_app: MakeApp,
    upstream: responses.RequestsMock,
    clock: Clock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    upstream.get(MODELS, json={"data": []})
    fast = make_app(rate_limit_per_minute=3)
    with monkeypatch.context() as patch:
        _generic(patch)
        generic = make_app(rate_limit_per_minute=3)
    # Three minutes: a burst, tries every 1.5 s, and tries exactly at and just past the
    # moment the oldest hit leaves the window.
    times = [0.0, 0.0, 10.0, 20.0, 30.0, 59.5, 60.0, 60.25, 70.0, 70.25, 80.5]
    times += [90 + 1.5 * n for n in range(60)]

    fast_answers = _run(fast, clock, times)
    generic_answers = _run(generic, clock, times)

    assert fast_answers == generic_answers
    statuses = [status for status, _ in fast_answers]
    assert statuses[:11] == [200, 200, 200, 429, 429, 429, 429, 200, 200, 200, 429]
    admitted = [t for t, status in zip(times, statuses, strict=True) if status == 200]
    for start in admitted:  # never more than 3 in any 60 s
        assert sum(1 for t in admitted if start <= t <= start + 60) <= 3
    # The headers of a refusal say when to come back, from the oldest hit in the window.
    assert fast_answers[4][1] == {
        "x-ratelimit-limit-requests": "3",
        "x-ratelimit-remaining-requests": "0",
        "x-ratelimit-reset-requests": "30s",
        "Retry-After": "30",
    }
    assert fast_answers[5][1]["x-ratelimit-reset-requests"] == "500ms"
    assert fast_answers[5][1]["Retry-After"] == "1"
    # At 60 s the hits of 0 s are still in the window (it includes its edge); at 60.25 s
    # they are out, and the window starts at the hit of 10 s.
    assert fast_answers[6][1]["x-ratelimit-reset-requests"] == "0ms"
    assert fast_answers[7][1] == {
        "x-ratelimit-limit-requests": "3",
        "x-ratelimit-remaining-requests": "1",
        "x-ratelimit-reset-requests": "10s",
    }
    # Each refusal counted once in the key's rejections, on both paths.
    assert _rejections(fast) == _rejections(generic) == statuses.count(429)


def test_a_storage_that_fails_after_working_lets_requests_through_then_holds_in_memory(
    make_app: MakeApp, upstream: responses.RequestsMock, clock: Clock
) -> None:
    upstream.get(MODELS, json={"data": []})
    app = make_app(rate_limit_per_minute=2)
    storage = _storage_of(app)
    before = _run(app, clock, [0.0])

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise ConnectionError("storage gone")

    for name in ("acquire_with_window", "acquire_entry", "get_moving_window"):
        setattr(storage, name, broken)
    storage.check = lambda: False  # type: ignore[method-assign]
    app.extensions["gateway.limiter"]._one_step = broken  # bound at init_app

    after = _run(app, clock, [1.0, 2.0, 3.0])
    ready = app.test_client().get("/ready").get_json()

    assert [status for status, _ in before + after] == [200, 200, 200, 429]
    # The memory fallback counts from nothing: two more, then its own 429 with headers.
    assert [headers["x-ratelimit-remaining-requests"] for _, headers in after] == ["1", "0", "0"]
    assert "Retry-After" in after[2][1]
    assert ready["checks"]["rate_limit_storage"].startswith("unreachable")


def test_a_limit_storage_that_is_down_from_the_start_costs_the_limit_not_the_answers(
    make_app: MakeApp, upstream: responses.RequestsMock
) -> None:
    upstream.get(MODELS, json={"data": []})
    # A closed port: the one-step Redis hit of the fast path raises at once.
    app = make_app(rate_limit_per_minute=2, rate_limit_storage_uri="redis://127.0.0.1:1/0")
    client = app.test_client()

    statuses = [client.get("/v1/models", headers=AUTH).status_code for _ in range(3)]

    assert statuses == [200, 200, 429]  # held in this process's memory meanwhile
    assert app.extensions["gateway.limiter"]._storage_dead
