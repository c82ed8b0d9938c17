"""GET /health (liveness) and GET /ready (readiness): no auth, no upstream call."""

from __future__ import annotations

from datetime import UTC, datetime

from flask import Blueprint, Response, current_app, jsonify

from gateway.config import SERVICE_NAME, VERSION

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
    """Ready means "this process can serve": only draining makes it 503.

    A rate-limit storage outage is reported, not failed: every replica shares one Redis,
    so failing readiness on it would empty the Service while each pod could still serve
    (the limiter holds limits per process meanwhile). Nothing here waits on the network.
    """
    draining = current_app.extensions["gateway.draining"].is_set()
    checks = {
        "config": "ok",
        "rate_limit_storage": current_app.extensions["gateway.limit_storage"].description,
        "shutdown": "draining" if draining else "no",
    }
    status = 503 if draining else 200
    return jsonify(status="not_ready" if draining else "ready", checks=checks), status
