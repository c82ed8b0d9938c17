"""Token windows per key: reserved before the call, charged after, refused when spent."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import pytest
import responses
from flask.testing import FlaskClient
from loguru import logger
from werkzeug.test import TestResponse

from gateway.config import KeyPolicy
from gateway.policy import tokens
from gateway.policy.keys import Caller
from gateway.policy.tokens import MemoryCounters, TokenBudget, windows_at
from gateway.policy.usage import charge, reservation
from tests.constants import GATEWAY_KEY, UNIT_UPSTREAM
from tests.unit.support import MakeApp, assert_openai_error

TEAM_KEY = "team-a-key-0123456789"
ADMIN_KEY = "admin-key-0123456789"
CHAT = "/v1/chat/completions"
UPSTREAM_CHAT = f"{UNIT_UPSTREAM}/chat/completions"
TEN = {"prompt_tokens": 4, "completion_tokens": 6, "total_tokens": 10}
REQUEST = {"model": "qwen-plus", "messages": []}


def policy(**fields: Any) -> KeyPolicy:
    digest = hashlib.sha256(TEAM_KEY.encode()).hexdigest()
    return KeyPolicy.model_validate({"name": "team-a", "key": f"sha256:{digest}", **fields})


TEAM = {"Authorization": f"Bearer {TEAM_KEY}"}
SEVEN = {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}


def post(client: FlaskClient, body: bytes, headers: dict[str, str] = TEAM) -> TestResponse:
    """A request whose response is closed, as a server closes it: its tokens are settled."""
    response = client.post(CHAT, data=body, headers={**headers, "Content-Type": "application/json"})
    response.close()
    return response


def test_tpm_admits_until_the_window_is_spent_then_429_without_an_upstream_call(
    make_app: MakeApp, upstream: responses.RequestsMock
) -> None:
    upstream.post(UPSTREAM_CHAT, json={"id": "c", "usage": SEVEN})
    client = make_app(key_policies=(policy(tpm=30),)).test_client()
    body = json.dumps(REQUEST).encode()
    estimate = reservation(len(body), None)
    assert estimate > 7  # so that only settling with the real tokens admits a fifth

    answers = [post(client, body) for _ in range(6)]

    # 0, 7, 14, 21 and 28 used before each: the fifth is allowed to finish, reaching 35.
    assert [a.status_code for a in answers] == [200] * 5 + [429]
    assert len(upstream.calls) == 5
    error = assert_openai_error(answers[5], 429, "rate_limit_exceeded")
    assert error["type"] == "tokens" and "35 of 30" in error["message"]
    assert 1 <= int(answers[5].headers["Retry-After"]) <= 60
    assert answers[5].headers["x-ratelimit-remaining-tokens"] == "0"
    first = answers[0].headers
    assert first["x-ratelimit-limit-tokens"] == "30"
    assert first["x-ratelimit-remaining-tokens"] == str(30 - estimate)  # the reservation
    assert first["x-ratelimit-reset-tokens"].endswith("s")


@pytest.mark.parametrize(
    ("max_tokens", "held"),
    # As a lenient provider (vLLM) reads them: 1e2, 100.0 and "60" are counts too.
    [
        (b"50", 50),
        (b'"lots"', 0),
        (b"-3", 0),
        (b"1e2", 100),
        (b"100.0", 100),
        (b'"60"', 60),
        (b"null", 0),
        (b"true", 0),
    ],
)
def test_max_tokens_is_held_while_in_flight_and_odd_values_are_the_providers(
    make_app: MakeApp, upstream: responses.RequestsMock, max_tokens: bytes, held: int
) -> None:
    upstream.post(UPSTREAM_CHAT, json={"id": "c", "usage": SEVEN})
    client = make_app(key_policies=(policy(tpm=1000),)).test_client()
    body = b'{"model":"qwen-plus","max_tokens":' + max_tokens + b"}"

    answer = post(client, body)

    assert answer.status_code == 200 and upstream.calls[0].request.body == body
    remaining = int(answer.headers["x-ratelimit-remaining-tokens"])
    assert remaining == 1000 - reservation(len(body), None) - held


def test_a_daily_quota_is_insufficient_quota_saying_when_it_resets(
    make_app: MakeApp, upstream: responses.RequestsMock
) -> None:
    upstream.post(UPSTREAM_CHAT, json={"id": "c", "usage": TEN})
    client = make_app(key_policies=(policy(tokens_per_day=15),)).test_client()
    body = json.dumps(REQUEST).encode()

    statuses = [post(client, body).status_code for _ in range(2)]
    refused = post(client, body)

    assert statuses == [200, 200]  # the second started below the quota: allowed to finish
    error = assert_openai_error(refused, 429, "insufficient_quota")
    assert error["type"] == "insufficient_quota"
    assert "20 of 15" in error["message"] and "day" in error["message"]
    tomorrow = datetime.fromtimestamp(windows_at(time.time())[1].resets_at, UTC)
    assert f"resets at {tomorrow:%Y-%m-%d}T00:00:00Z" in error["message"]
    assert refused.headers["x-should-retry"] == "false"
    assert len(upstream.calls) == 2
    scraped = client.get("/metrics").get_data(as_text=True)
    assert 'gateway_key_rejections_total{key="team-a",reason="quota"} 1.0' in scraped
    assert 'gateway_key_quota_used_tokens{key="team-a",window="day"} 20.0' in scraped
    assert 'gateway_key_quota_limit_tokens{key="team-a",window="day"} 15.0' in scraped


def test_a_key_without_tpm_gets_no_token_headers(
    client: FlaskClient, auth: dict[str, str], upstream: responses.RequestsMock
) -> None:
    upstream.post(UPSTREAM_CHAT, json={"id": "c", "usage": TEN})
    response = client.post(CHAT, json=REQUEST, headers=auth)

    assert response.status_code == 200
    assert "x-ratelimit-limit-tokens" not in response.headers
    assert "x-ratelimit-limit-requests" in response.headers


def test_an_answer_without_usage_is_estimated_and_charged(
    make_app: MakeApp, upstream: responses.RequestsMock, capsys: pytest.CaptureFixture[str]
) -> None:
    answer = b'{"id":"c","choices":[{"message":{"content":"hello"}}]}'
    upstream.post(UPSTREAM_CHAT, body=answer, content_type="application/json")
    app = make_app(key_policies=(policy(tpm=1000),), admin_api_key=ADMIN_KEY)
    client = app.test_client()
    body = json.dumps(REQUEST).encode()

    post(client, body)

    line = next(json.loads(x) for x in capsys.readouterr().out.splitlines() if '"access"' in x)
    prompt, completion = -(-len(body) // 4), -(-len(answer) // 4)
    assert line["usage"] == {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }
    assert line["usage_estimated"] is True and line["key_name"] == "team-a"
    report = client.get("/v1/usage", headers={"Authorization": f"Bearer {ADMIN_KEY}"}).get_json()
    team = next(k for k in report["keys"] if k["key"] == "team-a")
    assert team["minute"]["tokens"] == prompt + completion


def test_an_upstream_error_without_usage_costs_nothing(
    make_app: MakeApp, upstream: responses.RequestsMock
) -> None:
    upstream.post(UPSTREAM_CHAT, status=400, json={"error": {"message": "bad"}})
    client = make_app(key_policies=(policy(tpm=1000),)).test_client()

    assert post(client, json.dumps(REQUEST).encode()).status_code == 400
    models = client.get("/v1/models", headers=TEAM)
    assert models.headers["x-ratelimit-remaining-tokens"] == "1000"


def test_the_usage_api_needs_the_admin_key(
    make_app: MakeApp, upstream: responses.RequestsMock
) -> None:
    assert make_app().test_client().get("/v1/usage").status_code == 404
    client = make_app(admin_api_key=ADMIN_KEY, key_policies=(policy(tokens_per_day=50),))
    client = client.test_client()
    assert_openai_error(client.get("/v1/usage"), 401, "missing_api_key")
    wrong = {"Authorization": "Bearer not-the-admin-key"}
    assert_openai_error(client.get("/v1/usage", headers=wrong), 401, "invalid_api_key")
    for gateway_key in (TEAM_KEY, GATEWAY_KEY):
        as_key = {"Authorization": f"Bearer {gateway_key}"}
        assert_openai_error(client.get("/v1/usage", headers=as_key), 403, "permission_denied")

    upstream.post(UPSTREAM_CHAT, json={"id": "c", "usage": TEN})
    post(client, json.dumps(REQUEST).encode())
    response = client.get("/v1/usage", headers={"Authorization": f"Bearer {ADMIN_KEY}"})

    assert response.status_code == 200 and response.headers["Cache-Control"] == "no-store"
    keys = {k["key"]: k for k in response.get_json()["keys"]}
    assert keys["team-a"]["day"] == {
        "tokens": 10,
        "limit": 50,
        "remaining": 40,
        "resets_at": keys["team-a"]["day"]["resets_at"],
    }
    assert keys["team-a"]["minute"]["limit"] is None
    assert len(keys) == 3  # both environment keys, by id, and team-a


def test_concurrent_reservations_admit_exactly_the_limit_in_memory() -> None:
    budget = TokenBudget("memory://")
    caller = Caller("key_burst", tpm=100)
    admitted: list[int] = []
    barrier = threading.Barrier(20)

    def one() -> None:
        barrier.wait()
        for _ in range(10):
            if budget.reserve(caller, 7).full is None:
                admitted.append(7)

    threads = [threading.Thread(target=one) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)

    assert sum(admitted) == 105  # 15 admitted: the 15th found 98 < 100


def test_a_settlement_charges_the_window_the_answer_ends_in() -> None:
    budget = TokenBudget("memory://")
    caller = Caller("key_late", tpm=100)
    start = 1_800_000_000.0 - 1  # one second before a minute (and day) ends
    held = budget.reserve(caller, 40, now=start)

    budget.settle(held, 25, now=start + 2)

    assert budget.read([caller], now=start)[0][0] == 0  # the reservation released
    assert budget.read([caller], now=start + 2)[0][0] == 25


def test_a_dead_redis_fails_open_with_one_log_line() -> None:
    lines: list[str] = []
    sink = logger.add(lambda message: lines.append(str(message)), level="WARNING")
    try:
        budget = TokenBudget("redis://127.0.0.1:1/0")
        caller = Caller("key_dead", tpm=10)
        results = [budget.reserve(caller, 4).full for _ in range(4)]
    finally:
        logger.remove(sink)

    assert results == [None, None, None, "minute"]  # held in this process meanwhile
    assert not budget.up
    assert len([x for x in lines if "unreachable" in x]) == 1
    assert "Traceback" not in "".join(lines)


@pytest.mark.parametrize(
    ("usage", "tokens"),
    [
        ({"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}, 7),
        ({"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 0}, 7),
        ({"prompt_tokens": 3, "total_tokens": 3}, 3),
        ({"total_tokens": 9}, 9),
        ({"prompt_tokens": 10**8, "completion_tokens": 10**8}, 10**8),
    ],
)
def test_what_an_answer_costs(usage: dict[str, int], tokens: int) -> None:
    assert charge(usage) == tokens


class _FlakyRedis(MemoryCounters):
    """Stands in for RedisCounters: the same counters, and an outage at will."""

    down = False

    def __init__(self, uri: str) -> None:
        super().__init__()

    def _check(self) -> None:
        if type(self).down:
            raise ConnectionError("redis is down")

    def reserve(self, *args: Any) -> list[int]:
        self._check()
        return super().reserve(*args)

    def settle(self, *args: Any) -> None:
        self._check()
        super().settle(*args)

    def read(self, *args: Any) -> list[int]:
        self._check()
        return super().read(*args)


@pytest.fixture
def flaky(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[float]]:
    """A redis:// budget's storage that goes down at will; the clock its retries follow."""
    clock = [1000.0]
    monkeypatch.setattr(_FlakyRedis, "down", False)
    monkeypatch.setattr(tokens, "RedisCounters", _FlakyRedis)
    monkeypatch.setattr(tokens, "time", SimpleNamespace(time=time.time, monotonic=lambda: clock[0]))
    yield clock


def test_a_reservation_the_storage_could_not_release_is_released_when_it_is_back(
    flaky: list[float],
) -> None:
    budget = TokenBudget("redis://127.0.0.1:6379/0")
    caller = Caller("key_blip", tpm=1000, tokens_per_month=10_000)
    held = budget.reserve(caller, 400)  # held in Redis: the day and month hold 400 too
    _FlakyRedis.down = True
    budget.settle(held, 10)  # Redis is down as the answer ends
    _FlakyRedis.down, flaky[0] = False, flaky[0] + 60  # back, and past the backoff

    assert budget.read([caller]) == [[0, 0, 0]]  # not 400 for the rest of the month
    assert budget.up


def test_a_reservation_made_during_an_outage_never_lowers_the_storages_counts(
    flaky: list[float],
) -> None:
    budget = TokenBudget("redis://127.0.0.1:6379/0")
    caller = Caller("key_blip", tpm=1000)
    budget.reserve(caller, 300)  # another request, in flight, held in Redis
    _FlakyRedis.down = True
    during = budget.reserve(caller, 400)  # held in this process's memory
    _FlakyRedis.down, flaky[0] = False, flaky[0] + 60

    budget.settle(during, 5)

    assert budget.read([caller])[0][0] == 305  # the other's 300 kept, these 5 charged
    _FlakyRedis.down, flaky[0] = True, flaky[0] + 60
    assert budget.read([caller])[0][0] == 0  # memory no longer holds the 400 either
