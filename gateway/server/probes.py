"""`GET /health` and `GET /ready` answered on the worker's main loop, by the app itself.

A probe queued behind busy threads would time out, and Kubernetes would restart a pod that
is only busy, dropping every stream. Calling the app keeps one source of truth for the
answer (draining after SIGTERM, the checks /ready makes); it only has to stay quick and
non-blocking, which those two views are.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from gunicorn.http import wsgi


class _Collected:
    """Stands in for the client socket: gunicorn's Response writes the answer here, and the
    worker sends it on without blocking."""

    def __init__(self) -> None:
        self.data = bytearray()

    def sendall(self, data: bytes) -> None:
        self.data += data

    def send(self, data: bytes) -> int:
        self.data += data
        return len(data)


def render_probe(
    app: Callable[..., Iterable[bytes]],
    cfg: Any,
    req: Any,
    client: Any,
    server: Any,
    *,
    keep_alive: bool,
) -> tuple[bytes, bool]:
    """Run the WSGI app for a parsed probe request: the response bytes, and whether the
    connection may be kept open (gunicorn's own rules, through its Response)."""
    sink = _Collected()
    resp, environ = wsgi.create(req, sink, client, server, cfg)
    environ["wsgi.multithread"] = True
    if not keep_alive:
        resp.force_close()
    body = app(environ, resp.start_response)
    try:
        for item in body:
            resp.write(item)
        resp.close()
    finally:
        close = getattr(body, "close", None)
        if close is not None:
            close()
    return bytes(sink.data), not resp.should_close()
