"""Server-sent events: relayed byte for byte, unbuffered, and ended cleanly when they break."""

from __future__ import annotations

import json
from typing import Any

import pytest
import responses
from flask.testing import FlaskClient

from tests.constants import UNIT_UPSTREAM
from tests.unit.support import ScriptedAnswer

CHAT = "/v1/chat/completions"
UPSTREAM_CHAT = f"{UNIT_UPSTREAM}/chat/completions"
# The client asks for usage itself: the provider's usage chunk is then the client's too.
STREAM_REQUEST = {
    "model": "qwen-plus",
    "stream": True,
    "stream_options": {"include_usage": True},
    "messages": [],
}
EVENTS = [
    b'data: {"id":"c1","choices":[{"delta":{"role":"assistant","content":""}}]}\n\n',
    b'data: {"id":"c1","choices":[{"delta":{"content":"Hel"}}]}\n\n',
    b'data: {"id":"c1","choices":[{"delta":{"content":"lo \\u00e9"}}]}\n\n',
    b'data: {"id":"c1","choices":[],"usage":{"prompt_tokens":5,"completion_tokens":2}}\n\n',
    b"data: [DONE]\n\n",
]
# The two ways a provider frames a stream: HTTP chunks (the usual) or until the connection closes.
FRAMINGS = pytest.mark.parametrize("chunked", [True, False], ids=["chunked", "until-close"])


def _last_event(body: bytes) -> dict:
    last = body.rstrip(b"\n").split(b"\n\n")[-1]
    assert last.startswith(b"data: ")
    return json.loads(last.removeprefix(b"data: "))


def test_stream_headers(
    client: FlaskClient, auth: dict[str, str], upstream: responses.RequestsMock
) -> None:
    upstream.post(UPSTREAM_CHAT, body=b"".join(EVENTS), content_type="text/event-stream")

    response = client.post(CHAT, json=STREAM_REQUEST, headers=auth)

    assert response.status_code == 200
    assert response.is_streamed
    assert response.mimetype == "text/event-stream"
    assert response.headers["Cache-Control"] == "no-cache"
    assert response.headers["X-Accel-Buffering"] == "no"
    assert "Content-Length" not in response.headers
    response.close()


def test_stream_asks_the_upstream_for_an_uncompressed_body(
    client: FlaskClient, auth: dict[str, str], upstream: responses.RequestsMock
) -> None:
    upstream.post(UPSTREAM_CHAT, body=b"".join(EVENTS), content_type="text/event-stream")

    client.post(CHAT, json=STREAM_REQUEST, headers=auth).close()

    assert upstream.calls[0].request.headers["Accept-Encoding"] == "identity"


@FRAMINGS
def test_stream_body_is_byte_identical(
    client: FlaskClient, auth: dict[str, str], upstream: responses.RequestsMock, chunked: bool
) -> None:
    upstream.add(ScriptedAnswer("POST", UPSTREAM_CHAT, EVENTS, chunked=chunked))

    response = client.post(CHAT, json=STREAM_REQUEST, headers=auth)

    assert response.get_data() == b"".join(EVENTS)
    assert "Transfer-Encoding" not in response.headers  # the server frames it anew
    response.close()


@FRAMINGS
def test_each_upstream_chunk_is_passed_on_as_it_arrives(
    client: FlaskClient, auth: dict[str, str], upstream: responses.RequestsMock, chunked: bool
) -> None:
    upstream.add(ScriptedAnswer("POST", UPSTREAM_CHAT, EVENTS, chunked=chunked))

    response = client.post(CHAT, json=STREAM_REQUEST, headers=auth)
    pieces = list(response.response)  # the WSGI body, piece by piece as the server gets it
    response.close()

    assert pieces == EVENTS  # not re-buffered into fewer, larger pieces


@FRAMINGS
def test_stream_broken_mid_way_ends_with_an_error_event(
    client: FlaskClient, auth: dict[str, str], upstream: responses.RequestsMock, chunked: bool
) -> None:
    failure = ConnectionResetError("connection reset by peer")
    upstream.add(ScriptedAnswer("POST", UPSTREAM_CHAT, EVENTS[:2], failure, chunked=chunked))

    response = client.post(CHAT, json=STREAM_REQUEST, headers=auth)
    body = response.get_data()
    response.close()

    assert response.status_code == 200  # already sent when the stream broke
    assert body.startswith(b"".join(EVENTS[:2]))
    assert body.endswith(b"\n\n")
    assert body.count(b"data: ") == 3  # the two relayed events, then the error
    error = _last_event(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "server_error"
    assert error["code"] == "upstream_unavailable"


@FRAMINGS
def test_stream_stalling_mid_way_ends_with_a_timeout_event(
    client: FlaskClient, auth: dict[str, str], upstream: responses.RequestsMock, chunked: bool
) -> None:
    failure = TimeoutError("timed out")
    upstream.add(ScriptedAnswer("POST", UPSTREAM_CHAT, EVENTS[:1], failure, chunked=chunked))

    response = client.post(CHAT, json=STREAM_REQUEST, headers=auth)
    body = response.get_data()
    response.close()

    assert body.startswith(EVENTS[0])
    error = _last_event(body)["error"]
    assert error["code"] == "upstream_timeout"
    assert "2 s" in error["message"]  # the read timeout of the `settings` fixture


def test_stream_request_answered_with_json_error_is_not_streamed(
    client: FlaskClient, auth: dict[str, str], upstream: responses.RequestsMock
) -> None:
    error = b'{"error":{"message":"Range of input length should be [1, 30720]","code":"x"}}'
    upstream.post(UPSTREAM_CHAT, status=400, body=error, content_type="application/json")

    response = client.post(CHAT, json=STREAM_REQUEST, headers=auth)

    assert response.status_code == 400
    assert response.data == error
    assert "X-Accel-Buffering" not in response.headers


class _RememberedAnswer(ScriptedAnswer):
    raw: Any = None

    def get_response(self, request: Any) -> Any:
        self.raw = super().get_response(request)
        return self.raw


def test_stream_closed_before_its_first_chunk_closes_the_upstream(
    client: FlaskClient, auth: dict[str, str], upstream: responses.RequestsMock
) -> None:
    answer = _RememberedAnswer("POST", UPSTREAM_CHAT, EVENTS)
    upstream.add(answer)

    response = client.post(CHAT, json=STREAM_REQUEST, headers=auth)
    assert answer.raw is not None and not answer.raw.closed
    response.close()  # what the WSGI server does when the client has already gone

    assert answer.raw.closed
