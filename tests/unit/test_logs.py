"""Logs: one JSON access line per request, and no key ever printed, whoever logs it."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest
import requests
import responses
from flask.testing import FlaskClient
from loguru import logger

from gateway.auth import key_id
from tests.constants import GATEWAY_KEY, SECOND_GATEWAY_KEY, UNIT_UPSTREAM, UPSTREAM_KEY
from tests.unit.support import MakeApp

CHAT = "/v1/chat/completions"
UPSTREAM_CHAT = f"{UNIT_UPSTREAM}/chat/completions"
KEYS = (GATEWAY_KEY, SECOND_GATEWAY_KEY, UPSTREAM_KEY)
ACCESS_FIELDS = {
    "request_id",
    "method",
    "path",
    "status",
    "duration_ms",
    "key_id",
    "model",
    "stream",
    "upstream_status",
}
ANSWER = {"id": "c1", "choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": 7}}


def _lines(capsys: pytest.CaptureFixture[str]) -> list[dict[str, Any]]:
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def _client(make_app: MakeApp) -> FlaskClient:
    # Built inside the test: the sink keeps the sys.stdout of app creation, and pytest gives
    # the test body another capsys stream than the fixtures it set up.
    return make_app().test_client()


def _access(capsys: pytest.CaptureFixture[str]) -> list[dict[str, Any]]:
    return [line for line in _lines(capsys) if line.get("event") == "access"]


def test_access_line_is_written_when_the_response_is_closed(
    make_app: MakeApp, capsys: pytest.CaptureFixture[str]
) -> None:
    # The test client closes nothing itself; a server closes every response it has sent.
    client = _client(make_app)
    response = client.get("/health")
    assert _access(capsys) == []

    response.close()

    assert len(_access(capsys)) == 1


def test_one_access_line_per_request(
    make_app: MakeApp,
    auth: dict[str, str],
    upstream: responses.RequestsMock,
    capsys: pytest.CaptureFixture[str],
) -> None:
    upstream.post(UPSTREAM_CHAT, json=ANSWER)
    client = _client(make_app)
    answers = [
        client.post(CHAT, json={"model": "qwen-plus"}, headers=auth),
        client.get("/health"),
        client.get("/v1/models"),
        client.get("/nope"),
    ]
    for answer in answers:
        answer.close()

    lines = _access(capsys)

    assert [line["request_id"] for line in lines] == [a.headers["X-Request-ID"] for a in answers]
    assert [line["status"] for line in lines] == [200, 200, 401, 404]
    for line in lines:
        assert set(line) >= ACCESS_FIELDS


def test_access_line_of_a_relayed_request(
    make_app: MakeApp,
    auth: dict[str, str],
    upstream: responses.RequestsMock,
    capsys: pytest.CaptureFixture[str],
) -> None:
    upstream.post(UPSTREAM_CHAT, json=ANSWER, headers={"x-dashscope-request-id": "ds-123"})
    client = _client(make_app)

    client.post(CHAT, json={"model": "qwen-plus"}, headers=auth).close()

    (line,) = _access(capsys)
    assert line["method"] == "POST"
    assert line["path"] == CHAT
    assert line["status"] == 200
    assert isinstance(line["duration_ms"], int | float)
    assert line["duration_ms"] >= 0
    assert line["key_id"] == key_id(GATEWAY_KEY)
    assert line["model"] == "qwen-plus"
    assert line["stream"] is False
    assert line["upstream_status"] == 200
    assert line["upstream_request_id"] == "ds-123"
    assert line["usage"] == {"prompt_tokens": 11, "completion_tokens": 7}
    assert line["level"] == "info"


def test_access_line_of_a_stream(
    make_app: MakeApp,
    auth: dict[str, str],
    upstream: responses.RequestsMock,
    capsys: pytest.CaptureFixture[str],
) -> None:
    events = (
        b'data: {"choices":[{"delta":{"content":"hi"}}]}\n\n'
        b'data: {"choices":[],"usage":{"prompt_tokens":4,"completion_tokens":1,"total_tokens":5}}'
        b"\n\ndata: [DONE]\n\n"
    )
    upstream.post(UPSTREAM_CHAT, body=events, content_type="text/event-stream")
    client = _client(make_app)

    asked = {"model": "qwen-max", "stream": True, "stream_options": {"include_usage": True}}
    response = client.post(CHAT, json=asked, headers=auth)
    assert response.get_data() == events
    response.close()

    (line,) = _access(capsys)
    assert line["stream"] is True
    assert line["model"] == "qwen-max"
    assert line["usage"] == {"prompt_tokens": 4, "completion_tokens": 1, "total_tokens": 5}
    assert line["ttfb_ms"] >= 0


def test_access_line_of_a_public_request_has_no_caller(
    make_app: MakeApp, capsys: pytest.CaptureFixture[str]
) -> None:
    _client(make_app).get("/health").close()

    (line,) = _access(capsys)
    assert line["key_id"] is None
    assert line["model"] is None
    assert line["upstream_status"] is None
    assert "usage" not in line


def test_access_line_of_an_upstream_failure(
    make_app: MakeApp,
    auth: dict[str, str],
    upstream: responses.RequestsMock,
    capsys: pytest.CaptureFixture[str],
) -> None:
    upstream.post(UPSTREAM_CHAT, body=requests.ConnectionError("connection refused"))
    client = _client(make_app)

    client.post(CHAT, json={"model": "qwen-plus"}, headers=auth).close()

    lines = _lines(capsys)
    (access,) = [line for line in lines if line.get("event") == "access"]
    assert access["status"] == 502
    assert access["upstream_error"] == "connect"
    assert access["upstream_status"] is None
    warnings = [line for line in lines if line["level"] == "warning"]
    assert warnings
    assert warnings[0]["request_id"] == access["request_id"]


def test_unhandled_error_is_logged_with_its_traceback_and_request_id(
    make_app: MakeApp, capsys: pytest.CaptureFixture[str]
) -> None:
    app = make_app()

    @app.get("/explode")
    def explode() -> str:
        raise RuntimeError("a bug")

    response = app.test_client().get("/explode", headers={"X-Request-ID": "bug-1"})
    response.close()

    (error,) = [line for line in _lines(capsys) if line["level"] == "error"]
    assert error["request_id"] == "bug-1"
    assert error["exception"] == "RuntimeError: a bug"
    assert "in explode" in error["traceback"]


def _log_every_key_every_way() -> None:
    logger.info("gateway key " + GATEWAY_KEY)
    logger.warning("upstream key {}", UPSTREAM_KEY)
    logger.bind(api_key=SECOND_GATEWAY_KEY).info("bound")
    logging.getLogger("some.library").warning("Authorization: Bearer %s", GATEWAY_KEY)
    try:
        raise ValueError(f"rejected {UPSTREAM_KEY}")
    except ValueError:
        logger.exception("failed for {}", SECOND_GATEWAY_KEY)


@pytest.mark.parametrize("log_format", ["json", "text"])
def test_keys_are_never_printed(
    make_app: MakeApp,
    auth: dict[str, str],
    upstream: responses.RequestsMock,
    capsys: pytest.CaptureFixture[str],
    log_format: str,
) -> None:
    failure = requests.ConnectionError(f"refused (sent Authorization: Bearer {UPSTREAM_KEY})")
    upstream.post(UPSTREAM_CHAT, body=failure)
    client = make_app(log_format=log_format).test_client()

    client.post(CHAT, json={"model": "qwen-plus"}, headers=auth).close()
    client.get("/v1/models", headers={"Authorization": f"Bearer {SECOND_GATEWAY_KEY}"}).close()
    _log_every_key_every_way()

    out, err = capsys.readouterr()
    printed = out + err
    for key in KEYS:
        assert key not in printed
    assert printed.count("[REDACTED]") >= 7  # each key was logged and caught
    if log_format == "json":
        for line in out.splitlines():
            json.loads(line)
