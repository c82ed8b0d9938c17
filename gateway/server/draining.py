"""A worker's drain (SIGTERM: a shutdown, or a reload retiring it), within graceful_timeout.

gthread waits up to graceful_timeout for its connections and returns; but its request
threads are not daemons, so the interpreter's exit then waits for every one still
streaming, the arbiter sees no heartbeat, and ~30 s later SIGABRTs the worker (WORKER
TIMEOUT, a plain-text traceback). The worker (worker.py) uses this instead:

- from the drain's start it serves no new request: idle kept-alive connections are closed,
  a connection is closed after its request in progress, and a request that arrives anyway
  is answered 503 (a reload retired this worker: its keys and routes are the old ones);
- shortly before graceful_timeout, every provider exchange still running is ended as at
  its deadline (`DisconnectWatcher.end_all`): each stream ends with its dialect's error
  event, and its thread returns;
- a thread that still has not (blocked on a client that does not read, for up to
  CLIENT_WRITE_TIMEOUT) is left behind: the worker logs it and exits at once, in time.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from gateway import logs
from gateway.server.replies import error_reply

# Streams still open this long before graceful_timeout are ended (at most a quarter of
# it): their error events and the threads' return take milliseconds; the rest is margin
# before the arbiter's own deadline (it SIGKILLs at graceful_timeout).
_END_MARGIN_SECONDS = 2.0


class Drain:
    """The drain's deadlines, from the moment it started."""

    def __init__(self, graceful_timeout: float, started: float) -> None:
        margin = min(_END_MARGIN_SECONDS, graceful_timeout / 4)
        self.graceful_timeout = graceful_timeout
        self.end_streams_at = started + graceful_timeout - margin
        self.leave_at = started + graceful_timeout - margin / 2
        self.streams_ended = False

    def next_deadline(self) -> float:
        return self.leave_at if self.streams_ended else self.end_streams_at


def end_streams(app: Any) -> int:
    """End every provider exchange of `app` still running; how many there were.

    The app's upstream client owns the watcher (the server package imports no app module:
    it is reached through the app's extensions, as the worker reaches its settings)."""
    upstream = getattr(app, "extensions", {}).get("gateway.upstream")
    watcher = getattr(upstream, "disconnects", None)
    return int(watcher.end_all()) if watcher is not None else 0


def leave_now(log: Any, pid: int, abandoned: int) -> None:
    """Exit the worker without waiting for its request threads (the drain is over)."""
    log.warning(
        "drain over: %d request(s) still running are abandoned (their clients stopped "
        "reading); the worker exits within graceful_timeout",
        abandoned,
    )
    log.info("Worker exiting (pid: %s)", pid)
    logs.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def draining_reply() -> bytes:
    """The answer to a request that reaches a draining worker: retry on a new connection."""
    message = (
        "The gateway is restarting or shutting down: this connection serves no new "
        "request. Retry on a new connection."
    )
    return error_reply(503, "Service Unavailable", message, [("Retry-After", "0")])
