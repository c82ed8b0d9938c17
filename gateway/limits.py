"""Request limits per gateway key (flask-limiter), with OpenAI's x-ratelimit-* headers.

The limit is one application limit keyed by the caller's key id, so every route counts
against the same budget; its size is the caller's own `rpm` (the key's, else the file's
defaults, else RATE_LIMIT_REQUESTS_PER_MINUTE), 0 meaning none. It is exact for the
deployment as long as all processes share one storage: memory:// inside one worker
process, redis:// across workers and pods. The default strategy is moving-window, whose
check-and-take is atomic in both storages.

A storage outage costs the limit, never an answer: flask-limiter then counts in this
process's memory (each process holds the limit on its own) and checks the storage again
with a backoff of up to 32 s; every storage call, including the header step, is inside
that fail-open path, and each change of state is one log line, not one per request.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Callable
from functools import lru_cache, partial

from flask import Flask, Response, g, request
from flask_limiter import Limiter, RequestLimit
from limits import RateLimitItem, RateLimitItemPerMinute, WindowStats
from limits.strategies import MovingWindowRateLimiter
from loguru import logger

from gateway.config import Settings
from gateway.limit_storage import GatewayMemoryStorage, storage_options, storage_uri
from gateway.metrics import GatewayMetrics

__all__ = ["GatewayLimiter", "GatewayMemoryStorage", "StorageState", "init_rate_limits"]


class GatewayLimiter(Limiter):
    """flask-limiter, taking the gateway's one limit straight to the storage.

    The gateway has a single application limit, the caller's rpm. flask-limiter resolves
    every request's limits generically (blueprint and decorated limits, exemption scopes,
    meta limits, ordered sets: measured at ~0.15 ms, a sixth of a request's CPU). With
    the storage up, a request with a limit is hit here instead: the same strategy, storage,
    key (`ai-gateway/<key id>/global`) and request context (the headers read it). A
    breach, a storage that fails or has failed, and requests without a caller take
    flask-limiter's own path, which answers, falls back and recovers as before.
    """

    def init_app(self, app: Flask) -> None:
        super().init_app(app)
        one_step = getattr(self._storage, "acquire_with_window", None)
        moving = isinstance(self._limiter, MovingWindowRateLimiter)
        self._one_step: Callable[[str, int, int], tuple[bool, WindowStats]] | None = (
            one_step if moving else None
        )

    def _check_request_limit(
        self, callable_name: str | None = None, in_middleware: bool = True
    ) -> None:
        caller = getattr(g, "caller", None)
        if caller is None or caller.rpm <= 0 or self._storage_dead or request.endpoint is None:
            return super()._check_request_limit(callable_name, in_middleware)
        item = _per_minute(caller.rpm)
        args = [self._key_prefix, caller.key_id, "global"]
        request_limit = RequestLimit(self, item, args, False, True)  # its .key: the storage's
        try:
            if self._one_step:  # the hit and the window the headers show, in one call
                allowed, request_limit._window = self._one_step(request_limit.key, item.amount, 60)
            else:
                allowed = self.limiter.hit(item, *args)
        except Exception:  # noqa: BLE001 - flask-limiter's path falls back to memory
            allowed = False
        if not allowed:  # refused (not counted again) or the storage failed: its own path
            return super()._check_request_limit(callable_name, in_middleware)
        context = self.context  # looked up through flask.g each time
        context.view_rate_limit = request_limit
        context.view_rate_limits = [request_limit]
        return None


@lru_cache(maxsize=1024)
def _per_minute(rpm: int) -> RateLimitItem:
    return RateLimitItemPerMinute(rpm)


def _caller_key() -> str:
    return g.caller.key_id


def _caller_limit() -> str:
    # Asked for before the exemption is: an exempt request gets a placeholder.
    caller = getattr(g, "caller", None)
    return f"{caller.rpm if caller is not None and caller.rpm > 0 else 1} per 1 minute"


def _is_exempt() -> bool:
    # Public routes (health, metrics, unknown paths, CORS preflight) have no caller and no
    # limit; a key with rpm 0 has none either.
    caller = getattr(g, "caller", None)
    return caller is None or caller.rpm <= 0


def init_rate_limits(
    app: Flask, settings: Settings, metrics: GatewayMetrics, any_rpm: bool
) -> Limiter:
    """Attach a limiter to `app`. Call after the key check is registered: auth runs first.

    `any_rpm`: whether any key has a request limit at all (else the limiter is off)."""

    def breached(_: object) -> None:
        metrics.key_rejections.labels(g.caller.label, "rpm").inc()

    limiter = GatewayLimiter(
        key_func=_caller_key,
        application_limits=[_caller_limit],
        application_limits_exempt_when=_is_exempt,
        on_breach=breached,
        storage_uri=storage_uri(settings.rate_limit_storage_uri),
        storage_options=storage_options(settings.rate_limit_storage_uri),
        strategy=settings.rate_limit_strategy,
        key_prefix="ai-gateway",
        headers_enabled=False,
        # Fail open: a storage outage costs the limit (held per process meanwhile), never
        # an answer; /ready and gateway_rate_limit_storage_up report it.
        swallow_errors=True,
        in_memory_fallback_enabled=True,
        enabled=any_rpm,
    )
    limiter.init_app(app)
    _drop_limiter_header_step(app)
    logging.getLogger("flask-limiter").addFilter(_no_traceback)
    state = StorageState(limiter, metrics)
    # The worker that answers a scrape has written its own value, whatever it served.
    metrics.before_scrape.append(state.observe)
    app.extensions["gateway.limiter"] = limiter
    app.extensions["gateway.limit_storage"] = state
    app.after_request(lambda response: _add_headers(limiter, state, response))
    return limiter


def _drop_limiter_header_step(app: Flask) -> None:
    """flask-limiter's own after_request: with its headers off (the gateway writes OpenAI's,
    below) and no `deduct_when` limit, it only reads the request's context; dropped."""
    inject = Limiter._Limiter__inject_headers  # type: ignore[attr-defined]
    steps = app.after_request_funcs.setdefault(None, [])
    steps[:] = [step for step in steps if not (isinstance(step, partial) and step.func is inject)]


class StorageState:
    """Whether the limit storage answers, as the limiter last found it (never a new query).

    A probe must not wait for a Redis that stopped answering; the limiter learns the state
    on every request, and the gauge follows it.

    Each process writes its own value the first time it observes, not only on a change:
    with PROMETHEUS_MULTIPROC_DIR a forked worker's first metric update gives every gauge
    of its file a 0, and the master's 1 is not in the files the workers share (they are
    emptied at start), so a worker that only wrote on a change reported "down" for a
    Redis that was up.
    """

    def __init__(self, limiter: Limiter, metrics: GatewayMetrics) -> None:
        self._limiter = limiter
        self._gauge = metrics.rate_limit_storage_up
        self._up = True
        self._written_by: int | None = None  # the process that last wrote the gauge
        self._lock = threading.Lock()

    @property
    def description(self) -> str:
        if not self._limiter.enabled:
            return "disabled"
        return "ok" if self.observe() else "unreachable (limits held per process)"

    def observe(self) -> bool:
        # flask-limiter's own flag: set when it falls back to memory, cleared on recovery.
        up = not getattr(self._limiter, "_storage_dead", False)
        if up != self._up or self._written_by != os.getpid():
            with self._lock:
                self._up, self._written_by = up, os.getpid()
                self._gauge.set(1 if up else 0)
        return up


def _no_traceback(record: logging.LogRecord) -> bool:
    """flask-limiter logs a swallowed storage error with its traceback, request after
    request; one line naming the error says as much."""
    if record.exc_info and record.exc_info[1] is not None:
        record.msg = f"{record.getMessage()}: {type(record.exc_info[1]).__name__}"
        record.args = None
        record.exc_info = None
        record.levelno, record.levelname = logging.WARNING, "WARNING"
    return True


def _add_headers(limiter: Limiter, state: StorageState, response: Response) -> Response:
    current = limiter.current_limit if limiter.enabled else None
    state.observe()
    if current is None:
        return response
    try:
        # The window is read from the storage: it may have gone since the check.
        window = current.window
    except Exception as exc:  # noqa: BLE001 - any storage failure: answer without headers
        logger.debug("rate limit headers skipped: {}", type(exc).__name__)
        return response
    # window.reset_time, not reset_at: flask-limiter rounds the latter up a whole second.
    reset_in = max(0.0, window.reset_time - time.time())
    headers = response.headers
    headers["x-ratelimit-limit-requests"] = str(current.limit.amount)
    headers["x-ratelimit-remaining-requests"] = str(window.remaining)
    headers["x-ratelimit-reset-requests"] = openai_duration(reset_in)
    # A relayed provider 429 keeps the provider's own Retry-After.
    if response.status_code == 429 and "Retry-After" not in headers:
        headers["Retry-After"] = str(max(1, math.ceil(reset_in)))
    return response


def openai_duration(seconds: float) -> str:
    """Format like OpenAI's reset headers: '20ms', '1s', '6m0s'."""
    if seconds < 1:
        return f"{int(seconds * 1000)}ms"
    minutes, secs = divmod(math.ceil(seconds), 60)
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"
