"""CORS: browsers from allowed origins can call the API and read our headers; others get none."""

from __future__ import annotations

import responses

from tests.constants import UNIT_UPSTREAM
from tests.unit.support import MakeApp

ALLOWED = "https://app.example"


def _get_models(make_app: MakeApp, headers: dict[str, str]) -> dict[str, str]:
    app = make_app(cors_allowed_origins=(ALLOWED,))
    response = app.test_client().get("/v1/models", headers=headers)
    response.close()
    return dict(response.headers)


def test_allowed_origin_may_read_the_request_id_and_limits(
    make_app: MakeApp, auth: dict[str, str], upstream: responses.RequestsMock
) -> None:
    upstream.get(f"{UNIT_UPSTREAM}/models", json={"object": "list", "data": []})

    headers = _get_models(make_app, {**auth, "Origin": ALLOWED})

    assert headers["Access-Control-Allow-Origin"] == ALLOWED
    exposed = headers["Access-Control-Expose-Headers"].lower()
    assert "x-request-id" in exposed and "x-ratelimit-remaining-requests" in exposed


def test_other_origin_gets_no_cors_headers(
    make_app: MakeApp, auth: dict[str, str], upstream: responses.RequestsMock
) -> None:
    upstream.get(f"{UNIT_UPSTREAM}/models", json={"object": "list", "data": []})

    headers = _get_models(make_app, {**auth, "Origin": "https://evil.example"})

    assert "Access-Control-Allow-Origin" not in headers


def test_non_browser_requests_get_no_cors_headers(
    make_app: MakeApp, auth: dict[str, str], upstream: responses.RequestsMock
) -> None:
    upstream.get(f"{UNIT_UPSTREAM}/models", json={"object": "list", "data": []})

    headers = _get_models(make_app, auth)

    assert not [name for name in headers if name.lower().startswith("access-control-")]
