"""The one place that identifies the caller: gateway keys in, a `Caller` out.

Per-key policies (model allow-lists, token budgets) will hang off `Caller` later.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from flask import current_app, g, request

from gateway.errors import GatewayError

PROTECTED_BLUEPRINT = "v1"


@dataclass(frozen=True)
class Caller:
    # A short, non-reversible id of the key: safe for logs, metrics and rate-limit keys.
    key_id: str
    # The configured name of the key (GATEWAY_CONFIG keys), else None.
    name: str | None = None

    def allows(self, model: str) -> bool:
        """Whether this key may use the public model `model` (its allow-list)."""
        del model  # every key may use every model for now
        return True


def key_id(key: str) -> str:
    return "key_" + hashlib.sha256(key.encode()).hexdigest()[:12]


class KeyRing:
    """The configured gateway keys, held as SHA-256 digests."""

    def __init__(self, keys: tuple[str, ...]) -> None:
        self._entries = [(hashlib.sha256(k.encode()).digest(), Caller(key_id(k))) for k in keys]

    def identify(self, presented: str) -> Caller | None:
        # Hashing first and comparing every entry keeps the time independent of the key.
        digest = hashlib.sha256(presented.encode()).digest()
        found = None
        for candidate, caller in self._entries:
            if hmac.compare_digest(digest, candidate):
                found = caller
        return found


def require_api_key() -> None:
    """before_request: authenticate every /v1 route; everything else is public."""
    g.caller = None
    if request.method == "OPTIONS" or PROTECTED_BLUEPRINT not in request.blueprints:
        return
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise GatewayError(
            401,
            "Missing API key. Send it as 'Authorization: Bearer <gateway key>'.",
            code="missing_api_key",
        )
    caller = current_app.extensions["gateway.keys"].identify(token.strip())
    if caller is None:
        raise GatewayError(401, "Incorrect API key provided.", code="invalid_api_key")
    g.caller = caller
