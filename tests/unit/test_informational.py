"""The provider's informational (1xx) answers are read past, never taken for the answer."""

from __future__ import annotations

import http.client
import io

import pytest

from gateway.upstream.connection import FinalResponse


class _Socket:
    def __init__(self, data: bytes) -> None:
        self._data = data

    def makefile(self, mode: str) -> io.BufferedReader:
        del mode
        return io.BufferedReader(io.BytesIO(self._data))  # type: ignore[arg-type]


def read(data: bytes) -> FinalResponse:
    response = FinalResponse(_Socket(data), method="POST")  # type: ignore[arg-type]
    response.begin()
    return response


FINAL = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"


def test_early_hints_and_processing_are_skipped_with_their_headers() -> None:
    response = read(
        b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n"
        b"HTTP/1.1 102 Processing\r\n\r\n"
        b"HTTP/1.1 100 Continue\r\n\r\n" + FINAL
    )
    assert response.status == 200
    assert response.getheader("Link") is None
    assert response.read() == b"{}"


@pytest.mark.parametrize(
    "first",
    [
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\n\r\n",
        b"HTTP/1.1 600 Beyond\r\n\r\n",
        b"HTTP/1.1 999 Invented\r\n\r\n",
        b"HTTP/1.1 103 Early Hints\r\n\r\n" * 9,  # hints without end
    ],
)
def test_answers_no_final_response_can_have_are_refused(first: bytes) -> None:
    with pytest.raises(http.client.BadStatusLine):
        read(first + FINAL)
