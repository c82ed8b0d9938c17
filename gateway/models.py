"""GET /v1/models and /v1/models/<id>: relayed from the upstream."""

from __future__ import annotations

from urllib.parse import quote

from flask import Blueprint, Response, g, request

from gateway.upstream import upstream_for

bp = Blueprint("models", __name__)


@bp.get("/models")
def list_models() -> Response:
    return upstream_for(None).relay("GET", "/models", g.record, request.headers)


@bp.get("/models/<path:model_id>")
def retrieve_model(model_id: str) -> Response:
    g.record.model = model_id
    # Model ids may hold "/" (vLLM serves "Qwen/Qwen2.5-7B-Instruct"); keep it as a separator.
    path = "/models/" + quote(model_id, safe="/:@")
    return upstream_for(model_id).relay("GET", path, g.record, request.headers)
