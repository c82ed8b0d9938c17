"""The one place that identifies the caller: a gateway key in, `g.caller` out.

The keys and their rules live in `gateway.policy.keys`; `Caller`, `KeyRing` and `key_id`
are re-exported here for the modules that only need to know who is calling.
"""

from __future__ import annotations

from datetime import UTC, datetime

from flask import current_app, g, request

from gateway.errors import GatewayError
from gateway.policy.keys import Caller, KeyRing, key_id

__all__ = ["PROTECTED_BLUEPRINT", "Caller", "KeyRing", "key_id", "require_api_key"]

PROTECTED_BLUEPRINT = "v1"


def presented_key() -> str | None:
    """The bearer token of the request, or None."""
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def presented_gateway_key() -> str | None:
    """The caller's key: a bearer token, or Anthropic's `x-api-key` (what the anthropic
    SDKs and Claude Code send with ANTHROPIC_API_KEY). The bearer token wins if both come."""
    return presented_key() or request.headers.get("x-api-key", "").strip() or None


def require_api_key() -> None:
    """before_request: authenticate every /v1 route; everything else is public."""
    g.caller = None
    if request.method == "OPTIONS" or PROTECTED_BLUEPRINT not in request.blueprints:
        return
    token = presented_gateway_key()
    if token is None:
        raise GatewayError(
            401,
            "Missing API key. Send it as 'Authorization: Bearer <gateway key>' "
            "(or 'x-api-key: <gateway key>').",
            code="missing_api_key",
        )
    caller = current_app.extensions["gateway.keys"].identify(token)
    if caller is None:
        raise GatewayError(401, "Incorrect API key provided.", code="invalid_api_key")
    if not caller.enabled:
        raise _refused(caller, "disabled", "This API key is disabled.")
    if caller.expired():
        at = datetime.fromtimestamp(caller.expires_at or 0, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        raise _refused(caller, "expired", f"This API key expired at {at}.")
    g.caller = caller


def _refused(caller: Caller, reason: str, message: str) -> GatewayError:
    current_app.extensions["gateway.metrics"].key_rejections.labels(caller.label, reason).inc()
    g.record.key_id, g.record.key_name = caller.key_id, caller.name
    return GatewayError(401, message, code=f"api_key_{reason}")
