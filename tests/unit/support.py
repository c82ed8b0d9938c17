"""Helpers shared by the unit tests: the OpenAI error shape and upstream answers that break."""

from __future__ import annotations

import http.client
import io
from collections.abc import Callable
from typing import Any

import responses
import urllib3
from flask import Flask
from requests import PreparedRequest
from werkzeug.test import TestResponse

# The `make_app` fixture: `make_app(rate_limit_per_minute=2)` builds an app on changed settings.
MakeApp = Callable[..., Flask]

OPENAI_ERROR_FIELDS = {"message", "type", "param", "code"}


def assert_openai_error(
    response: TestResponse, status: int, code: str | None = None
) -> dict[str, Any]:
    """Check `{"error": {"message", "type", "param", "code"}}` as JSON; return the inner object."""
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.mimetype == "application/json"
    body = response.get_json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == OPENAI_ERROR_FIELDS
    assert isinstance(error["message"], str)
    assert error["message"]
    assert isinstance(error["type"], str)
    if code is not None:
        assert error["code"] == code
    return error


class _ScriptedSocket(io.RawIOBase):
    """Hands out `pieces` one read at a time, then raises `failure` (or reaches EOF)."""

    def __init__(self, pieces: list[bytes], failure: BaseException | None) -> None:
        super().__init__()
        self._pieces = list(pieces)
        self._failure = failure

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if not self._pieces:
            if self._failure is not None:
                raise self._failure
            return 0
        piece = self._pieces.pop(0)
        buffer[: len(piece)] = piece
        return len(piece)

    def makefile(self, mode: str) -> io.BufferedReader:
        del mode  # http.client only reads
        return io.BufferedReader(self)


class ScriptedAnswer(responses.BaseResponse):
    """A provider answer that real `http.client` and urllib3 read from a scripted socket.

    `responses` cannot frame a body as HTTP chunks nor break it half-way; this can. The
    body arrives as `chunks` (HTTP chunks with `chunked=True`, otherwise until the
    connection closes), then `failure` is raised by the socket: an `OSError` becomes
    urllib3's `ProtocolError`, a `socket.timeout` its `ReadTimeoutError`, as on a real
    dropped or stalled connection.
    """

    def __init__(
        self,
        method: str,
        url: str,
        chunks: list[bytes],
        failure: BaseException | None = None,
        *,
        chunked: bool = True,
        content_type: str = "text/event-stream",
        status: int = 200,
    ) -> None:
        super().__init__(method, url)
        framing = "Transfer-Encoding: chunked" if chunked else "Connection: close"
        head = f"HTTP/1.1 {status} X\r\nContent-Type: {content_type}\r\n{framing}\r\n\r\n"
        body = [b"%x\r\n%s\r\n" % (len(c), c) for c in chunks] if chunked else list(chunks)
        if chunked and failure is None:
            body.append(b"0\r\n\r\n")
        self._pieces = [head.encode(), *body]
        self._failure = failure

    def get_response(self, request: PreparedRequest) -> urllib3.HTTPResponse:
        answer = http.client.HTTPResponse(
            _ScriptedSocket(self._pieces, self._failure),  # type: ignore[arg-type]
            method=request.method,
        )
        answer.begin()
        return urllib3.HTTPResponse(
            body=answer,
            headers=urllib3.HTTPHeaderDict(answer.msg.items()),
            status=answer.status,
            version=answer.version,
            reason=answer.reason,
            preload_content=False,
            original_response=answer,
            request_method=request.method,
        )
