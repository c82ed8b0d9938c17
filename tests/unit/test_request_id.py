"""Request ids: a client's sane id is kept, anything else is replaced, every answer carries one."""

from __future__ import annotations

import re

import pytest
import responses
from flask.testing import FlaskClient

from tests.constants import UNIT_UPSTREAM
from tests.unit.support import MakeApp

GENERATED = re.compile(r"[0-9a-f]{32}")
CHAT = "/v1/chat/completions"
BODY = {"model": "qwen-plus", "messages": []}


@pytest.mark.parametrize(
    "offered",
    ["req-42", "5f0c6a1e-3b7d-4c2a-9e8f-1a2b3c4d5e6f", "trace.span:01_AB", "x" * 128],
)
def test_sane_client_id_is_echoed_and_forwarded(
    client: FlaskClient, auth: dict[str, str], upstream: responses.RequestsMock, offered: str
) -> None:
    upstream.post(f"{UNIT_UPSTREAM}/chat/completions", json={"id": "c"})

    response = client.post(CHAT, json=BODY, headers={**auth, "X-Request-ID": offered})

    assert response.headers["X-Request-ID"] == offered
    assert upstream.calls[0].request.headers["X-Request-ID"] == offered


@pytest.mark.parametrize(
    "offered",
    ["x" * 129, "has space", "semi;colon", "a/b", "<script>", "quote'd", "caf\xe9", ""],
)
def test_insane_client_id_is_replaced(
    client: FlaskClient, auth: dict[str, str], upstream: responses.RequestsMock, offered: str
) -> None:
    upstream.post(f"{UNIT_UPSTREAM}/chat/completions", json={"id": "c"})

    response = client.post(CHAT, json=BODY, headers={**auth, "X-Request-ID": offered})

    request_id = response.headers["X-Request-ID"]
    assert GENERATED.fullmatch(request_id)
    assert upstream.calls[0].request.headers["X-Request-ID"] == request_id


def test_id_is_generated_when_absent(client: FlaskClient) -> None:
    first = client.get("/health").headers["X-Request-ID"]
    second = client.get("/health").headers["X-Request-ID"]

    assert GENERATED.fullmatch(first)
    assert GENERATED.fullmatch(second)
    assert first != second


def test_error_responses_carry_the_id(
    make_app: MakeApp, auth: dict[str, str], upstream: responses.RequestsMock
) -> None:
    upstream.get(f"{UNIT_UPSTREAM}/models", json={"data": []})
    app = make_app(rate_limit_per_minute=1)

    @app.get("/explode")
    def explode() -> str:
        raise RuntimeError("a bug")

    client = app.test_client()
    client.get("/v1/models", headers=auth)  # spends the only request of the minute
    answers = {
        401: client.get("/v1/models", headers={"X-Request-ID": "id-401"}),
        404: client.get("/nope", headers={"X-Request-ID": "id-404"}),
        405: client.delete("/health", headers={"X-Request-ID": "id-405"}),
        429: client.get("/v1/models", headers={**auth, "X-Request-ID": "id-429"}),
        500: client.get("/explode", headers={"X-Request-ID": "id-500"}),
    }

    for status, response in answers.items():
        assert response.status_code == status
        assert response.headers["X-Request-ID"] == f"id-{status}"
