"""Gateway keys: which requests need one, what a refusal looks like, and key ids."""

from __future__ import annotations

import pytest
import responses
from flask.testing import FlaskClient

from gateway.auth import KeyRing, key_id
from tests.constants import GATEWAY_KEY, SECOND_GATEWAY_KEY, UNIT_UPSTREAM, UPSTREAM_KEY
from tests.unit.support import assert_openai_error

WRONG_KEY = "gw-wrong-key-1a2b3c4d5e6f"


def test_missing_key_is_401(client: FlaskClient, upstream: responses.RequestsMock) -> None:
    response = client.post("/v1/chat/completions", json={"model": "qwen-plus"})

    error = assert_openai_error(response, 401, "missing_api_key")
    assert error["type"] == "invalid_request_error"
    assert "Bearer" in error["message"]
    assert len(upstream.calls) == 0


@pytest.mark.parametrize(
    "authorization",
    [
        f"Basic {GATEWAY_KEY}",
        f"Token {GATEWAY_KEY}",
        GATEWAY_KEY,
        "Bearer",
        "Bearer    ",
    ],
)
def test_non_bearer_authorization_is_401(
    client: FlaskClient, upstream: responses.RequestsMock, authorization: str
) -> None:
    response = client.get("/v1/models", headers={"Authorization": authorization})

    error = assert_openai_error(response, 401, "missing_api_key")
    assert GATEWAY_KEY not in error["message"]
    assert len(upstream.calls) == 0


def test_unknown_key_is_401_without_echoing_it(
    client: FlaskClient, upstream: responses.RequestsMock
) -> None:
    response = client.get("/v1/models", headers={"Authorization": f"Bearer {WRONG_KEY}"})

    error = assert_openai_error(response, 401, "invalid_api_key")
    assert error["type"] == "invalid_request_error"
    assert error["param"] is None
    assert WRONG_KEY not in response.get_data(as_text=True)
    assert len(upstream.calls) == 0


def test_upstream_key_is_not_a_gateway_key(
    client: FlaskClient, upstream: responses.RequestsMock
) -> None:
    response = client.get("/v1/models", headers={"Authorization": f"Bearer {UPSTREAM_KEY}"})

    assert_openai_error(response, 401, "invalid_api_key")
    assert UPSTREAM_KEY not in response.get_data(as_text=True)


@pytest.mark.parametrize("key", [GATEWAY_KEY, SECOND_GATEWAY_KEY])
def test_every_configured_key_is_accepted(
    client: FlaskClient, upstream: responses.RequestsMock, key: str
) -> None:
    upstream.get(f"{UNIT_UPSTREAM}/models", json={"object": "list", "data": []})

    response = client.get("/v1/models", headers={"Authorization": f"Bearer {key}"})

    assert response.status_code == 200
    assert response.get_json() == {"object": "list", "data": []}


def test_scheme_is_case_insensitive(client: FlaskClient, upstream: responses.RequestsMock) -> None:
    upstream.get(f"{UNIT_UPSTREAM}/models", json={"data": []})

    response = client.get("/v1/models", headers={"Authorization": f"bearer {GATEWAY_KEY}"})

    assert response.status_code == 200


@pytest.mark.parametrize(
    ("path", "status"),
    [("/health", 200), ("/ready", 200), ("/metrics", 200), ("/nope", 404), ("/v1/nope", 404)],
)
def test_public_routes_need_no_key(client: FlaskClient, path: str, status: int) -> None:
    response = client.get(path)

    assert response.status_code == status


def test_cors_preflight_needs_no_key(client: FlaskClient, upstream: responses.RequestsMock) -> None:
    response = client.options(
        "/v1/chat/completions",
        headers={
            "Origin": "https://app.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        },
    )

    assert response.status_code == 200
    assert response.headers["Access-Control-Allow-Origin"] in ("*", "https://app.example")
    assert "authorization" in response.headers["Access-Control-Allow-Headers"].lower()
    assert len(upstream.calls) == 0


def test_key_id_is_short_stable_and_not_the_key() -> None:
    first = key_id(GATEWAY_KEY)

    assert first == key_id(GATEWAY_KEY)
    assert first != key_id(SECOND_GATEWAY_KEY)
    assert first.startswith("key_")
    assert len(first) <= 20
    assert GATEWAY_KEY not in first
    assert GATEWAY_KEY[-8:] not in first


def test_key_ring_identifies_only_configured_keys() -> None:
    ring = KeyRing((GATEWAY_KEY, SECOND_GATEWAY_KEY))

    caller = ring.identify(SECOND_GATEWAY_KEY)

    assert caller is not None
    assert caller.key_id == key_id(SECOND_GATEWAY_KEY)
    assert ring.identify(WRONG_KEY) is None
    assert ring.identify("") is None
