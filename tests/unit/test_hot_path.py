"""What the per-request savings must not change: worker pinning, the token windows cached per
minute, metric children looked up once, Flask's hooks asked once whether they are async, and
flask-cors's step skipped for requests without an Origin."""

from __future__ import annotations

import inspect
import math
import random
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from functools import partial
from types import SimpleNamespace
from typing import Any

import flask.app
import pytest
import responses
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from gateway.factory import GatewayFlask
from gateway.metrics import Children, GatewayMetrics
from gateway.policy.tokens import Window, budget_windows_at, windows_at
from gateway.server import pinning
from tests.constants import UNIT_UPSTREAM
from tests.unit.support import MakeApp

# --- pinning -------------------------------------------------------------------------------


def _worker(core: int | None = None) -> SimpleNamespace:
    return SimpleNamespace() if core is None else SimpleNamespace(gateway_core=core)


@pytest.fixture
def four_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pinning.os, "sched_getaffinity", lambda pid: {3, 1, 0, 2})


@pytest.mark.parametrize(
    ("sibling_cores", "chosen"),
    [
        ([], 0),  # the first worker: the lowest CPU
        ([0], 1),
        ([0, 1, 2], 3),
        ([0, 1, 2, 3], 0),  # a second round starts again from the lowest
        ([0, 0, 1, 2, 3, 3], 1),
        ([1, 2, 3, 3, 2, 1], 0),
        ([2, 2, 2, 0, 1, 3, 1, 0], 3),
        ([None, None, 1], 0),  # a sibling not pinned (none chosen) takes no CPU
        ([7, 7, 0], 1),  # a CPU no longer allowed is not chosen whatever its count
    ],
)
def test_choose_core_picks_the_allowed_cpu_with_the_fewest_live_workers(
    four_cpus: None, sibling_cores: list[int | None], chosen: int
) -> None:
    worker = _worker()
    siblings = [_worker(core) for core in sibling_cores]

    pinning.choose_core(worker, siblings)

    assert worker.gateway_core == chosen


def test_choose_core_reads_the_cpus_this_process_may_use(monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[int] = []

    def affinity(pid: int) -> set[int]:
        asked.append(pid)
        return {5, 9}

    monkeypatch.setattr(pinning.os, "sched_getaffinity", affinity)
    first, second = _worker(), _worker()
    pinning.choose_core(first, [])
    pinning.choose_core(second, [first])

    assert (first.gateway_core, second.gateway_core) == (5, 9)
    assert asked == [0, 0]


def test_spawning_one_worker_after_another_spreads_them_over_the_cpus(four_cpus: None) -> None:
    workers: list[SimpleNamespace] = []
    for _ in range(10):
        worker = _worker()
        pinning.choose_core(worker, workers)  # gunicorn's WORKERS: the live ones before it
        workers.append(worker)

    assert [w.gateway_core for w in workers] == [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]


def test_pin_sets_the_affinity_of_the_new_worker_to_its_core(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[tuple[int, set[int]]] = []
    monkeypatch.setattr(
        pinning.os, "sched_setaffinity", lambda pid, cpus: calls.append((pid, cpus))
    )

    pinning.pin(_worker(2))
    pinning.pin(_worker(0))  # core 0 is a core, not "none"
    pinning.pin(_worker())  # no core chosen (pinning off): nothing

    assert calls == [(0, {2}), (0, {0})]


# --- token windows, cached per minute -----------------------------------------------------


def _windows_directly(now: float) -> tuple[Window, Window, Window]:
    """windows_at as it was before the cache (main), computed from `now` itself."""
    minute = int(now // 60)
    start = datetime.fromtimestamp(now, UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    next_month = (start.replace(day=1) + timedelta(days=32)).replace(day=1)
    return (
        Window("minute", f"minute:{minute}", (minute + 1) * 60.0),
        Window("day", f"day:{start:%Y%m%d}", (start + timedelta(days=1)).timestamp()),
        Window("month", f"month:{start:%Y%m}", next_month.timestamp()),
    )


def _at(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


BOUNDARIES = [
    "2026-12-31T23:59:59.999",
    "2026-12-31T23:59:00",
    "2026-12-31T23:58:59.999",
    "2027-01-01T00:00:00",
    "2027-01-01T00:00:00.001",
    "2027-01-31T23:59:59.999",
    "2027-02-01T00:00:00",
    "2027-02-28T23:59:59.999",
    "2027-03-01T00:00:00",
    "2028-02-28T23:59:59.999",
    "2028-02-29T00:00:00",
    "2028-02-29T12:34:56.789",
    "2028-02-29T23:59:59.999",
    "2028-03-01T00:00:00",
    "2027-06-30T23:59:59.5",
    "2027-07-01T00:00:30",
    "2027-12-31T23:59:59.999",
]


def _instants() -> list[float]:
    rng = random.Random(7)
    instants = [_at(text) for text in BOUNDARIES]
    instants += [
        rng.uniform(_at("2026-01-01T00:00:00"), _at("2030-01-01T00:00:00")) for _ in range(3000)
    ]
    # Every millisecond-ish step across one minute boundary, and whole minutes across a day.
    instants += [_at("2027-01-01T00:00:00") + k * 0.125 for k in range(-80, 80)]
    instants += [_at("2028-03-01T00:00:00") + k * 60.0 for k in range(-5, 5)]
    rng.shuffle(instants)  # in no order: the cache keeps 4 minutes, and must not care
    return instants


def test_windows_at_gives_what_computing_from_the_instant_gives() -> None:
    for now in _instants():
        assert windows_at(now) == _windows_directly(now), datetime.fromtimestamp(now, UTC)


def test_windows_at_across_the_new_year_and_a_leap_day() -> None:
    minute, day, month = windows_at(_at("2026-12-31T23:59:59.999"))
    assert minute.resets_at == day.resets_at == month.resets_at == _at("2027-01-01T00:00:00")
    assert (day.id, month.id) == ("day:20261231", "month:202612")

    minute, day, month = windows_at(_at("2027-01-01T00:00:00"))
    assert minute == Window(
        "minute", f"minute:{int(_at('2027-01-01T00:00:00')) // 60}", _at("2027-01-01T00:01:00")
    )
    assert day == Window("day", "day:20270101", _at("2027-01-02T00:00:00"))
    assert month == Window("month", "month:202701", _at("2027-02-01T00:00:00"))

    _, day, month = windows_at(_at("2028-02-29T23:59:59.999"))
    assert day == Window("day", "day:20280229", _at("2028-03-01T00:00:00"))
    assert month == Window("month", "month:202802", _at("2028-03-01T00:00:00"))
    _, day, month = windows_at(_at("2027-02-28T12:00:00"))
    assert month.resets_at == _at("2027-03-01T00:00:00")  # no 29th in 2027


def test_every_window_contains_its_instant_and_ends_when_it_says() -> None:
    for now in _instants():
        minute, day, month = windows_at(now)
        assert minute.resets_at - 60 <= now < minute.resets_at
        assert day.resets_at - 86400 <= now < day.resets_at
        assert now < month.resets_at
        end = datetime.fromtimestamp(month.resets_at, UTC)
        assert (end.day, end.hour, end.minute, end.second) == (1, 0, 0, 0)
        # The windows nest: a minute never straddles a day, a day never a month.
        assert minute.resets_at <= day.resets_at <= month.resets_at


def test_a_fraction_of_a_microsecond_before_midnight_is_still_the_old_day() -> None:
    # datetime rounds to the microsecond: 23:59:59.9999998 reads as the next midnight. The
    # windows follow the minute (as the cache computes them), so the day is still the old
    # one, as its minute window is.
    now = _at("2027-01-01T00:00:00") - 2e-7
    assert now < _at("2027-01-01T00:00:00")

    minute, day, month = windows_at(now)

    assert minute.resets_at == _at("2027-01-01T00:00:00")
    assert (day.id, month.id) == ("day:20261231", "month:202612")


def test_budget_windows_are_the_day_the_month_and_all_time() -> None:
    now = _at("2028-02-29T08:00:00")
    _, day, month = windows_at(now)

    assert budget_windows_at(now) == (day, month, Window("total", "total:all", math.inf))


# --- metric children, looked up once ------------------------------------------------------


def _samples(registry: CollectorRegistry) -> str:
    return generate_latest(registry).decode()


def test_children_are_the_metrics_own_children_and_count_where_a_scrape_reads() -> None:
    registry = CollectorRegistry()
    counter = Counter("things", "Things", ["kind", "where"], registry=registry)
    histogram = Histogram("waits", "Waits", ["kind"], buckets=(1, 10), registry=registry)
    things, waits = Children(counter), Children(histogram)

    assert things("a", "here") is counter.labels("a", "here")
    assert things("a", "here") is things("a", "here")
    assert things("a", "there") is not things("a", "here")
    assert waits("slow") is histogram.labels("slow")
    things("a", "here").inc()
    things("a", "here").inc(2)
    counter.labels("a", "here").inc()  # the same series, however it is reached
    things("b", "here").inc()
    waits("slow").observe(5)

    text = _samples(registry)
    assert 'things_total{kind="a",where="here"} 4.0' in text
    assert 'things_total{kind="b",where="here"} 1.0' in text
    assert 'waits_bucket{kind="slow",le="1.0"} 0.0' in text
    assert 'waits_bucket{kind="slow",le="10.0"} 1.0' in text
    assert 'waits_count{kind="slow"} 1.0' in text


def test_a_wrong_number_of_label_values_is_still_refused() -> None:
    things = Children(Counter("things", "Things", ["kind", "where"], registry=None))

    with pytest.raises(ValueError, match="label"):
        things("only one")


def test_gateway_metrics_children_are_its_metrics(make_app: MakeApp) -> None:
    metrics: GatewayMetrics = make_app().extensions["gateway.metrics"]
    pairs: list[tuple[Callable[..., Any], Any, tuple[str, ...]]] = [
        (metrics.requests_for, metrics.requests, ("/health", "GET", "200", "none", "none")),
        (metrics.latency_for, metrics.latency, ("/health", "none", "none")),
        (metrics.stream_ttfb_for, metrics.stream_ttfb, ("p", "m")),
        (metrics.key_requests_for, metrics.key_requests, ("k", "m", "p", "200")),
        (metrics.tokens_for, metrics.tokens, ("prompt", "k", "m", "p")),
        (metrics.cost_for, metrics.cost, ("k", "t", "m", "p")),
    ]
    for children, metric, values in pairs:
        assert children(*values) is metric.labels(*values)
    metrics.attempted("p", "unknown-model", "ok")
    metrics.attempted("p", "unknown-model", "ok")

    text = metrics.exposition().decode()
    assert 'gateway_upstream_attempts_total{model="other",outcome="ok",provider="p"} 2.0' in text


# --- Flask's async check, asked once per function -----------------------------------------


class Asked:
    """How often Flask asked inspect.iscoroutinefunction about each function (by identity)."""

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}
        self.keep: list[Any] = []  # the functions asked about stay alive: ids stay theirs

    def __call__(self, func: Any) -> None:
        self.counts[id(func)] = self.counts.get(id(func), 0) + 1
        self.keep.append(func)

    def of(self, func: Any) -> int:
        return self.counts.get(id(func), 0)


@pytest.fixture
def asked(monkeypatch: pytest.MonkeyPatch) -> Asked:
    asked = Asked()
    real = inspect.iscoroutinefunction

    def counted(func: Any) -> bool:
        asked(func)
        return real(func)

    assert flask.app.iscoroutinefunction is real  # where Flask.ensure_sync asks
    monkeypatch.setattr(flask.app, "iscoroutinefunction", counted)
    return asked


def test_a_plain_function_is_returned_as_is_and_asked_about_once(asked: Asked) -> None:
    app = GatewayFlask("probe")

    def view() -> str:
        return "ok"

    assert all(app.ensure_sync(view) is view for _ in range(5))
    assert asked.counts == {id(view): 1}


def test_each_hook_and_view_is_asked_about_once_over_many_requests(
    make_app: MakeApp, asked: Asked, upstream: responses.RequestsMock, auth: dict[str, str]
) -> None:
    upstream.get(f"{UNIT_UPSTREAM}/models", json={"data": []})
    app = make_app()
    assert isinstance(app, GatewayFlask)
    client = app.test_client()

    for _ in range(5):
        for response in (client.get("/health"), client.get("/v1/models", headers=auth)):
            assert response.status_code == 200
            response.close()

    assert len(asked.counts) >= 8  # the before/after hooks, teardowns and both views
    assert set(asked.counts.values()) == {1}


def test_a_coroutine_function_is_still_given_to_flask(asked: Asked) -> None:
    app = GatewayFlask("probe")

    async def view() -> str:
        return "ok"

    # Flask wraps it with asgiref, or says why it cannot: either way not returned as is.
    try:
        synced = app.ensure_sync(view)
    except RuntimeError as exc:
        assert "async" in str(exc).lower()
        with pytest.raises(RuntimeError):
            app.ensure_sync(view)  # a refusal is not remembered as an answer
    else:
        assert synced is not view
        assert not inspect.iscoroutinefunction(synced)
        assert app.ensure_sync(view) is synced


class _Unhashable:
    __hash__ = None  # type: ignore[assignment]

    def __call__(self) -> str:
        return "ok"


def test_an_unhashable_callable_is_asked_about_each_time(asked: Asked) -> None:
    app = GatewayFlask("probe")
    target = _Unhashable()

    assert app.ensure_sync(target) is target
    assert app.ensure_sync(target) is target
    assert asked.of(target) == 2


def test_many_distinct_functions_are_each_returned_as_themselves() -> None:
    # The memo is bounded; past its size functions are still answered, just not kept.
    app = GatewayFlask("probe")
    functions = [partial(str, n) for n in range(3000)]

    assert all(app.ensure_sync(f) is f for f in functions)
    assert all(app.ensure_sync(f) is f for f in reversed(functions))


# --- flask-cors only for requests with an Origin ------------------------------------------

ALLOWED = "https://app.example"


def _cors_headers(response: Any) -> dict[str, str]:
    return {k: v for k, v in response.headers.items() if k.lower().startswith("access-control-")}


def test_flask_cors_step_is_wrapped_not_left_twice(make_app: MakeApp) -> None:
    # Guards the name the wrapper looks for: if flask-cors renames its step, this fails.
    app = make_app()
    steps = app.after_request_funcs[None]
    names = [
        getattr(step.args[0] if isinstance(step, partial) else step, "__name__", "")
        for step in steps
    ]

    assert names.count("cors_after_request") == 1
    wrapped = steps[names.index("cors_after_request")]
    assert isinstance(wrapped, partial)


@pytest.mark.parametrize("origins", [(ALLOWED,), ("*",)])
def test_no_origin_no_cors_headers_and_an_allowed_origin_gets_them(
    make_app: MakeApp,
    upstream: responses.RequestsMock,
    auth: dict[str, str],
    origins: tuple[str, ...],
) -> None:
    upstream.get(f"{UNIT_UPSTREAM}/models", json={"data": []})
    client = make_app(cors_allowed_origins=origins).test_client()

    without = client.get("/v1/models", headers=auth)
    empty = client.get("/v1/models", headers={**auth, "Origin": ""})
    browser = client.get("/v1/models", headers={**auth, "Origin": ALLOWED})

    assert _cors_headers(without) == {} and "Vary" not in without.headers
    assert _cors_headers(empty) == {}
    # flask-cors answers the origin itself for "*" too (send_wildcard is off).
    assert browser.headers["Access-Control-Allow-Origin"] == ALLOWED
    assert "x-request-id" in browser.headers["Access-Control-Expose-Headers"].lower()


def test_a_browser_reads_the_gateways_own_errors_too(
    make_app: MakeApp, auth: dict[str, str], upstream: responses.RequestsMock
) -> None:
    upstream.get(f"{UNIT_UPSTREAM}/models", json={"data": []})
    client = make_app(cors_allowed_origins=(ALLOWED,), rate_limit_per_minute=1).test_client()
    browser = {"Origin": ALLOWED}

    unauthorized = client.get("/v1/models", headers=browser)
    client.get("/v1/models", headers={**auth, **browser})
    limited = client.get("/v1/models", headers={**auth, **browser})
    missing = client.get("/nope", headers=browser)

    for response, status in ((unauthorized, 401), (limited, 429), (missing, 404)):
        assert response.status_code == status
        assert response.headers["Access-Control-Allow-Origin"] == ALLOWED
    assert "retry-after" in limited.headers["Access-Control-Expose-Headers"].lower()


def test_a_preflight_is_answered_for_an_allowed_origin_only(make_app: MakeApp) -> None:
    client = make_app(cors_allowed_origins=(ALLOWED,)).test_client()
    asking = {
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization",
    }

    allowed = client.options("/v1/chat/completions", headers={**asking, "Origin": ALLOWED})
    other = client.options(
        "/v1/chat/completions", headers={**asking, "Origin": "https://evil.example"}
    )

    assert allowed.status_code < 400
    assert allowed.headers["Access-Control-Allow-Origin"] == ALLOWED
    assert "POST" in allowed.headers["Access-Control-Allow-Methods"]
    assert _cors_headers(other) == {}
