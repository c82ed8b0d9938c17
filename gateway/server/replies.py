"""The answers the worker writes itself, all in the gateway's OpenAI error shape.

gunicorn's rejections (400, 414, 431... through `util.write_error`), a head that took too
long (408), a head too large (431) and a request no thread took in time (503).
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Sequence
from http import HTTPStatus
from typing import Any

import orjson
from gunicorn import util

from gateway.errors import error_body


def error_reply(
    status: int, reason: str, message: str, headers: Sequence[tuple[str, str]] = ()
) -> bytes:
    """A complete HTTP/1.1 error response that closes the connection."""
    body = orjson.dumps(error_body(status, message))
    lines = [
        f"HTTP/1.1 {status} {reason}",
        "Connection: close",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
        *(f"{name}: {value}" for name, value in headers),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


# Capacity frees as streams end; the SDKs retry a 503 after Retry-After seconds.
RETRY_AFTER_SECONDS = 1


def busy_reply(waited: float) -> bytes:
    """The 503 for a request that no thread took within `waited` seconds."""
    message = (
        f"The gateway is at capacity: no request thread became free within {waited:g} s. "
        "Retry after Retry-After seconds."
    )
    return error_reply(
        503, "Service Unavailable", message, [("Retry-After", str(RETRY_AFTER_SECONDS))]
    )


def write_openai_error(sock: socket.socket, status_int: int, reason: str, mesg: Any) -> None:
    """gunicorn's `util.write_error`, with the gateway's error body instead of HTML."""
    # gunicorn keeps "Bad Request" when it changes the status (501 for a transfer coding).
    with contextlib.suppress(ValueError):
        reason = HTTPStatus(status_int).phrase
    util.write_nonblock(sock, error_reply(status_int, reason, str(mesg) or reason))


def send_now(sock: socket.socket, data: bytes) -> bool:
    """Send without blocking; False if not all of it fit (the client is not reading).

    The main loop must never wait on one client. Replies here are a few hundred bytes, which
    an empty send buffer always takes.
    """
    try:
        return sock.send(data, socket.MSG_DONTWAIT) == len(data)
    except OSError:
        return False
