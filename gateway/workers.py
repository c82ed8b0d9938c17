"""gunicorn's gthread worker with two fixes for a gateway.

1. Refuse new connections while draining. On SIGTERM the stock gthread worker stops
   accepting but keeps its copy of the listening socket open until the drain ends, so for
   up to `graceful_timeout` the kernel still completes handshakes nobody will serve: clients
   hang instead of being refused and retrying elsewhere. This worker closes its copy when it
   stops accepting (the arbiter has already closed its own).
2. OpenAI-shaped errors for requests gunicorn rejects before the app sees them (a malformed
   request line, a 431 for oversized headers...): gunicorn writes an HTML page through
   `gunicorn.util.write_error`; this worker's process writes the gateway's JSON error instead.
"""

from __future__ import annotations

import contextlib
import socket
from http import HTTPStatus
from typing import Any

import orjson
from gunicorn import util
from gunicorn.workers.gthread import ThreadWorker

from gateway.errors import error_body


class GatewayThreadWorker(ThreadWorker):
    def init_process(self) -> None:
        # Only this worker process is affected: it answers every HTTP client through this.
        util.write_error = write_openai_error
        super().init_process()

    def set_accept_enabled(self, enabled: bool) -> None:
        super().set_accept_enabled(enabled)
        if not enabled and not self.alive:
            for listener in self.sockets:
                listener.close()


def write_openai_error(sock: socket.socket, status_int: int, reason: str, mesg: Any) -> None:
    """gunicorn's `util.write_error`, with the gateway's error body instead of HTML."""
    body = orjson.dumps(error_body(status_int, str(mesg) or reason))
    # gunicorn keeps "Bad Request" when it changes the status (501 for a transfer coding).
    with contextlib.suppress(ValueError):
        reason = HTTPStatus(status_int).phrase
    head = (
        f"HTTP/1.1 {status_int} {reason}\r\n"
        "Connection: close\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    util.write_nonblock(sock, head.encode("latin-1") + body)
