"""The one error path: every error the gateway makes itself is an OpenAI error object in JSON."""

from __future__ import annotations

import json

import pytest
import responses
from flask import Flask
from flask.testing import FlaskClient

from tests.constants import UNIT_UPSTREAM, UPSTREAM_KEY
from tests.unit.support import MakeApp, assert_openai_error

CHAT = "/v1/chat/completions"


def test_body_that_is_not_json_is_400(
    client: FlaskClient, auth: dict[str, str], upstream: responses.RequestsMock
) -> None:
    response = client.post(CHAT, data=b"model=qwen-plus", headers=auth)

    error = assert_openai_error(response, 400, "invalid_json")
    assert error["type"] == "invalid_request_error"
    assert len(upstream.calls) == 0


def test_empty_body_is_400(client: FlaskClient, auth: dict[str, str]) -> None:
    assert_openai_error(client.post(CHAT, headers=auth), 400, "invalid_json")


def test_json_array_body_is_400(client: FlaskClient, auth: dict[str, str]) -> None:
    response = client.post(CHAT, json=[{"model": "qwen-plus"}], headers=auth)

    assert_openai_error(response, 400, "invalid_body")


def test_missing_model_is_400_on_param_model(
    client: FlaskClient, auth: dict[str, str], upstream: responses.RequestsMock
) -> None:
    response = client.post(CHAT, json={"messages": []}, headers=auth)

    error = assert_openai_error(response, 400, "missing_model")
    assert error["param"] == "model"
    assert len(upstream.calls) == 0


@pytest.mark.parametrize("model", [42, ["qwen-plus"], {"id": "qwen-plus"}, True, "", "   "])
def test_model_that_is_not_a_string_is_400_on_param_model(
    client: FlaskClient, auth: dict[str, str], model: object
) -> None:
    response = client.post(CHAT, json={"model": model}, headers=auth)

    error = assert_openai_error(response, 400, "invalid_model")
    assert error["param"] == "model"


@pytest.mark.parametrize("stream", ["yes", 1, {"on": True}])
def test_stream_that_is_not_a_boolean_is_400_on_param_stream(
    client: FlaskClient, auth: dict[str, str], upstream: responses.RequestsMock, stream: object
) -> None:
    response = client.post(CHAT, json={"model": "qwen-plus", "stream": stream}, headers=auth)

    error = assert_openai_error(response, 400, "invalid_type")
    assert error["param"] == "stream"
    assert len(upstream.calls) == 0


@pytest.mark.parametrize(
    "body",
    [
        b'{"model": "qwen-plus", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        b'{"model": "qwen-plus"} trailing',
        b'{"model": "qwen-plus", "messages": [1, 2,]}',
    ],
    ids=["nested-100k-deep", "trailing-bytes", "broken-inside-a-skipped-value"],
)
def test_bodies_that_are_not_one_json_object_are_400(
    client: FlaskClient, auth: dict[str, str], upstream: responses.RequestsMock, body: bytes
) -> None:
    headers = {**auth, "Content-Type": "application/json"}

    assert_openai_error(client.post(CHAT, data=body, headers=headers), 400, "invalid_json")
    assert len(upstream.calls) == 0


def test_unknown_route_is_404(client: FlaskClient) -> None:
    error = assert_openai_error(client.get("/v2/chat/completions"), 404, "not_found")

    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [("GET", CHAT, "POST"), ("PUT", "/v1/embeddings", "POST"), ("DELETE", "/health", "GET")],
)
def test_wrong_method_is_405_with_allow(
    client: FlaskClient, method: str, path: str, allowed: str
) -> None:
    response = client.open(path, method=method)

    assert_openai_error(response, 405, "method_not_allowed")
    assert allowed in response.headers["Allow"]


def test_body_over_the_limit_is_413(
    make_app: MakeApp, auth: dict[str, str], upstream: responses.RequestsMock
) -> None:
    client = make_app(max_request_body_bytes=64).test_client()
    body = json.dumps({"model": "qwen-plus", "prompt": "x" * 64}).encode()

    response = client.post(CHAT, data=body, headers=auth, content_type="application/json")

    assert_openai_error(response, 413, "request_too_large")
    assert len(upstream.calls) == 0


def test_body_at_the_limit_is_relayed(
    make_app: MakeApp, auth: dict[str, str], upstream: responses.RequestsMock
) -> None:
    upstream.post(f"{UNIT_UPSTREAM}/chat/completions", json={"id": "ok"})
    client = make_app(max_request_body_bytes=64).test_client()
    head, tail = b'{"model": "qwen-plus", "prompt": "', b'"}'
    body = head + b"x" * (64 - len(head) - len(tail)) + tail

    response = client.post(CHAT, data=body, headers=auth, content_type="application/json")

    assert response.status_code == 200


def _app_with_a_bug(make_app: MakeApp) -> Flask:
    app = make_app()

    @app.get("/explode")
    def explode() -> str:
        raise RuntimeError(f"secret detail {UPSTREAM_KEY}")

    return app


def test_bug_is_500_without_details(make_app: MakeApp) -> None:
    response = _app_with_a_bug(make_app).test_client().get("/explode")

    error = assert_openai_error(response, 500, "internal_error")
    text = response.get_data(as_text=True)
    assert error["type"] == "server_error"
    assert "Traceback" not in text
    assert "RuntimeError" not in text
    assert "secret detail" not in text
    assert UPSTREAM_KEY not in text


def test_500_message_names_the_request_id(make_app: MakeApp) -> None:
    client = _app_with_a_bug(make_app).test_client()

    response = client.get("/explode", headers={"X-Request-ID": "trace-500-abc"})

    error = assert_openai_error(response, 500, "internal_error")
    assert response.headers["X-Request-ID"] == "trace-500-abc"
    assert "trace-500-abc" in error["message"]


def test_invalid_utf8_in_the_model_is_a_400_not_a_500(
    client: FlaskClient, auth: dict[str, str], upstream: responses.RequestsMock
) -> None:
    headers = {**auth, "Content-Type": "application/json"}
    response = client.post(CHAT, data=b'{"model": "m\xff"}', headers=headers)

    assert_openai_error(response, 400, "invalid_json")
    assert len(upstream.calls) == 0
