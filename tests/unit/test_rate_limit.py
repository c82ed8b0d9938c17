"""Rate limits per gateway key, answered like OpenAI: 429s and x-ratelimit-* headers."""

from __future__ import annotations

import re

import pytest
import responses
from flask.testing import FlaskClient

from gateway.limits import openai_duration
from tests.constants import GATEWAY_KEY, SECOND_GATEWAY_KEY, UNIT_UPSTREAM
from tests.unit.support import MakeApp, assert_openai_error

MODELS = f"{UNIT_UPSTREAM}/models"
RATE_HEADERS = (
    "x-ratelimit-limit-requests",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-reset-requests",
)
DURATION = re.compile(r"\d+ms|\d+s|\d+m\d+s")


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _limited_client(make_app: MakeApp, per_minute: int) -> FlaskClient:
    return make_app(rate_limit_per_minute=per_minute).test_client()


def test_request_over_the_limit_is_429(
    make_app: MakeApp, auth: dict[str, str], upstream: responses.RequestsMock
) -> None:
    upstream.get(MODELS, json={"data": []})
    client = _limited_client(make_app, 3)

    answers = [client.get("/v1/models", headers=auth) for _ in range(4)]

    assert [a.status_code for a in answers[:3]] == [200, 200, 200]
    error = assert_openai_error(answers[3], 429, "rate_limit_exceeded")
    assert error["type"] == "requests"
    assert "3 per 1 minute" in error["message"]
    assert len(upstream.calls) == 1  # the model list, fetched once and cached


def test_429_says_when_to_retry(
    make_app: MakeApp, auth: dict[str, str], upstream: responses.RequestsMock
) -> None:
    upstream.get(MODELS, json={"data": []})
    client = _limited_client(make_app, 1)
    client.get("/v1/models", headers=auth)

    refused = client.get("/v1/models", headers=auth)

    assert refused.status_code == 429
    retry_after = refused.headers["Retry-After"]
    assert retry_after.isdigit()
    assert 1 <= int(retry_after) <= 61  # the one-minute window, rounded up to whole seconds
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"


def test_every_authenticated_answer_counts_down(
    make_app: MakeApp, auth: dict[str, str], upstream: responses.RequestsMock
) -> None:
    upstream.get(MODELS, json={"data": []})
    client = _limited_client(make_app, 3)

    answers = [client.get("/v1/models", headers=auth) for _ in range(4)]

    for answer in answers:
        assert answer.headers["x-ratelimit-limit-requests"] == "3"
        assert DURATION.fullmatch(answer.headers["x-ratelimit-reset-requests"])
    remaining = [a.headers["x-ratelimit-remaining-requests"] for a in answers]
    assert remaining == ["2", "1", "0", "0"]


def test_gateway_errors_count_against_the_budget_too(
    make_app: MakeApp, auth: dict[str, str]
) -> None:
    client = _limited_client(make_app, 2)

    bad = client.post("/v1/chat/completions", data=b"not json", headers=auth)

    assert bad.status_code == 400
    assert bad.headers["x-ratelimit-remaining-requests"] == "1"


def test_each_key_has_its_own_budget(make_app: MakeApp, upstream: responses.RequestsMock) -> None:
    upstream.get(MODELS, json={"data": []})
    client = _limited_client(make_app, 1)

    first = client.get("/v1/models", headers=_bearer(GATEWAY_KEY))
    again = client.get("/v1/models", headers=_bearer(GATEWAY_KEY))
    other = client.get("/v1/models", headers=_bearer(SECOND_GATEWAY_KEY))

    assert (first.status_code, again.status_code, other.status_code) == (200, 429, 200)
    assert other.headers["x-ratelimit-remaining-requests"] == "0"


@pytest.mark.parametrize("path", ["/health", "/ready", "/metrics", "/nope"])
def test_public_routes_are_neither_limited_nor_labelled(
    make_app: MakeApp, auth: dict[str, str], upstream: responses.RequestsMock, path: str
) -> None:
    upstream.get(MODELS, json={"data": []})
    client = _limited_client(make_app, 1)

    public = [client.get(path) for _ in range(3)]
    keyed = client.get("/v1/models", headers=auth)

    assert len({a.status_code for a in public}) == 1
    assert public[0].status_code != 429
    for answer in public:
        assert not any(name in answer.headers for name in RATE_HEADERS)
    assert keyed.status_code == 200  # the key's budget is untouched


def test_refused_key_is_not_labelled(make_app: MakeApp) -> None:
    client = _limited_client(make_app, 1)

    response = client.get("/v1/models", headers=_bearer("gw-unknown-key-0000"))

    assert response.status_code == 401
    assert not any(name in response.headers for name in RATE_HEADERS)


def test_zero_per_minute_turns_limits_off(
    make_app: MakeApp, auth: dict[str, str], upstream: responses.RequestsMock
) -> None:
    upstream.get(MODELS, json={"data": []})
    client = _limited_client(make_app, 0)

    answers = [client.get("/v1/models", headers=auth) for _ in range(5)]

    assert [a.status_code for a in answers] == [200] * 5
    for answer in answers:
        assert not any(name in answer.headers for name in RATE_HEADERS)


def test_upstream_429_keeps_the_upstreams_retry_after(
    client: FlaskClient, auth: dict[str, str], upstream: responses.RequestsMock
) -> None:
    upstream.post(
        f"{UNIT_UPSTREAM}/chat/completions",
        status=429,
        json={"error": {"message": "Requests rate limit exceeded", "code": "limit_requests"}},
        headers={"Retry-After": "7"},
    )

    response = client.post("/v1/chat/completions", json={"model": "qwen-plus"}, headers=auth)

    assert response.status_code == 429
    assert response.headers["Retry-After"] == "7"


@pytest.mark.parametrize(
    ("seconds", "expected"),
    [
        (0, "0ms"),
        (0.02, "20ms"),
        (0.999, "999ms"),
        (1, "1s"),
        (1.2, "2s"),
        (59, "59s"),
        (60, "1m0s"),
        (61.5, "1m2s"),
        (360, "6m0s"),
    ],
)
def test_openai_duration(seconds: float, expected: str) -> None:
    assert openai_duration(seconds) == expected


def test_memory_storage_sweeps_once_a_second_instead_of_every_10_ms() -> None:
    # Guards the name-mangled override: if limits renames the method, this fails.
    from limits import parse
    from limits.strategies import MovingWindowRateLimiter

    from gateway.limits import GatewayMemoryStorage

    storage = GatewayMemoryStorage()
    storage.timer.join()  # the stock 10 ms timer started by __init__
    limiter = MovingWindowRateLimiter(storage)
    item = parse("5/minute")
    assert all(limiter.hit(item, "key") for _ in range(5))
    assert not limiter.hit(item, "key")
    assert storage.timer.interval == GatewayMemoryStorage.SWEEP_SECONDS
    storage.timer.cancel()
