"""GET /v1/usage: every key's and team's tokens and spend, for GATEWAY_ADMIN_KEY only.

Gateway keys cannot read it (403), not even their own line; without GATEWAY_ADMIN_KEY the
route does not exist (404). A client address that sent `MAX_FAILURES` wrong keys within a
minute gets 429 until that minute is over, without its key being compared: unthrottled,
one client tried 456 keys a second. Each wrong key is logged with the address.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable

import orjson
from flask import Blueprint, Response, current_app, request
from flask.blueprints import BlueprintSetupState
from loguru import logger
from werkzeug.exceptions import NotFound

from gateway.auth import presented_key
from gateway.errors import GatewayError
from gateway.policy.report import usage_report

bp = Blueprint("usage", __name__)

# Wrong admin keys an address may send per window, per worker process.
MAX_FAILURES = 10
WINDOW_SECONDS = 60.0
# Addresses remembered at most (the oldest forgotten first): memory stays bounded however
# many addresses guess.
MAX_ADDRESSES = 10_000


class FailedAttempts:
    """Wrong admin keys per client address, in a sliding window."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def retry_after(self, address: str) -> float:
        """Seconds until `address` may try again; 0 if it may now."""
        with self._lock:
            recent = self._recent(address)
            if recent is None or len(recent) < MAX_FAILURES:
                return 0.0
            return recent[0] + WINDOW_SECONDS - self._clock()

    def failed(self, address: str) -> int:
        """Count one wrong key from `address`; how many it sent within the window."""
        with self._lock:
            recent = self._recent(address)
            if recent is None:
                recent = self._failures[address] = deque(maxlen=MAX_FAILURES)
                while len(self._failures) > MAX_ADDRESSES:
                    self._failures.popitem(last=False)
            recent.append(self._clock())
            return len(recent)

    def _recent(self, address: str) -> deque[float] | None:
        recent = self._failures.get(address)
        if recent is None:
            return None
        while recent and recent[0] <= self._clock() - WINDOW_SECONDS:
            recent.popleft()
        return recent


@bp.record_once
def _attach(state: BlueprintSetupState) -> None:
    state.app.extensions["gateway.admin_failures"] = FailedAttempts()


@bp.get("/v1/usage")
def usage() -> Response:
    settings = current_app.extensions["gateway.settings"]
    if not settings.admin_api_key:
        raise NotFound()  # the same answer as any unknown route
    _require_admin(settings.admin_api_key)
    extensions = current_app.extensions
    report = usage_report(
        extensions["gateway.tokens"],
        extensions["gateway.keys"],
        currency=extensions["gateway.prices"].currency,
    )
    response = Response(orjson.dumps(report), mimetype="application/json")
    response.headers["Cache-Control"] = "no-store"
    return response


def _require_admin(admin_key: str) -> None:
    failures: FailedAttempts = current_app.extensions["gateway.admin_failures"]
    address = request.remote_addr or "unknown"
    wait = failures.retry_after(address)
    if wait > 0:
        seconds = str(math.ceil(wait))
        raise GatewayError(
            429,
            f"Too many wrong admin keys from this address: try again in {seconds} s.",
            headers={"Retry-After": seconds},
        )
    token = presented_key()
    if token is None:
        raise GatewayError(
            401,
            "Missing API key. Send GATEWAY_ADMIN_KEY as 'Authorization: Bearer <key>'.",
            code="missing_api_key",
        )
    # Digests compared, so the time does not depend on how much of the key matched.
    digest = hashlib.sha256(token.encode()).digest()
    if hmac.compare_digest(digest, hashlib.sha256(admin_key.encode()).digest()):
        return
    if current_app.extensions["gateway.keys"].identify(token) is not None:
        raise GatewayError(
            403, "Gateway keys cannot read usage: use GATEWAY_ADMIN_KEY.", code="permission_denied"
        )
    count = failures.failed(address)
    logger.warning(
        "wrong admin key for /v1/usage from {} ({} within {:g} s)", address, count, WINDOW_SECONDS
    )
    raise GatewayError(401, "Incorrect API key provided.", code="invalid_api_key")
