"""GET /health (liveness) and GET /ready (readiness): no auth, no upstream call."""

from __future__ import annotations

from datetime import UTC, datetime

from flask import Blueprint, Response, current_app, jsonify

from gateway.config import SERVICE_NAME, VERSION
from gateway.limits import storage_reachable

bp = Blueprint("health", __name__)


@bp.get("/health")
def health() -> Response:
    return jsonify(
        status="healthy",
        service=SERVICE_NAME,
        version=VERSION,
        timestamp=datetime.now(UTC).isoformat(timespec="seconds"),
    )


@bp.get("/ready")
def ready() -> tuple[Response, int]:
    draining = current_app.extensions["gateway.draining"].is_set()
    storage_ok = storage_reachable(current_app.extensions["gateway.limiter"])
    checks = {
        "config": "ok",
        "rate_limit_storage": "ok" if storage_ok else "unreachable",
        "shutdown": "draining" if draining else "no",
    }
    is_ready = storage_ok and not draining
    status = 200 if is_ready else 503
    return jsonify(status="ready" if is_ready else "not_ready", checks=checks), status
