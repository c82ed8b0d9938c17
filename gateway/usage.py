"""GET /v1/usage: every key's tokens this minute, day and month, for GATEWAY_ADMIN_KEY only.

Gateway keys cannot read it (403), not even their own line; without GATEWAY_ADMIN_KEY the
route does not exist (404).
"""

from __future__ import annotations

import hashlib
import hmac

import orjson
from flask import Blueprint, Response, current_app
from werkzeug.exceptions import NotFound

from gateway.auth import presented_key
from gateway.errors import GatewayError
from gateway.policy.report import usage_report

bp = Blueprint("usage", __name__)


@bp.get("/v1/usage")
def usage() -> Response:
    settings = current_app.extensions["gateway.settings"]
    if not settings.admin_api_key:
        raise NotFound()  # the same answer as any unknown route
    _require_admin(settings.admin_api_key)
    extensions = current_app.extensions
    report = usage_report(extensions["gateway.tokens"], extensions["gateway.keys"])
    response = Response(orjson.dumps(report), mimetype="application/json")
    response.headers["Cache-Control"] = "no-store"
    return response


def _require_admin(admin_key: str) -> None:
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
    raise GatewayError(401, "Incorrect API key provided.", code="invalid_api_key")
