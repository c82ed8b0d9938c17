"""GET /v1/models and /v1/models/<id>: relayed from the upstream."""

from __future__ import annotations

from urllib.parse import quote

from flask import Blueprint, Response, g, request

from gateway.errors import GatewayError
from gateway.upstream import Client, upstream_for

bp = Blueprint("models", __name__)


@bp.get("/models")
def list_models() -> Response:
    return upstream_for(None).relay(
        "GET",
        "/models",
        g.record,
        request.headers,
        query=request.query_string,
        client=Client.of(request.environ),
    )


@bp.get("/models/<path:model_id>")
def retrieve_model(model_id: str) -> Response:
    g.record.model = model_id
    # Model ids may hold "/" (vLLM serves "Qwen/Qwen2.5-7B-Instruct"), kept as a separator;
    # but never an empty, "." or ".." segment, which would walk to other upstream routes
    # (with the gateway's provider key) once anything normalises the path.
    if any(segment in ("", ".", "..") for segment in model_id.split("/")):
        raise GatewayError(
            404, f"The model '{model_id[:100]}' does not exist.", code="model_not_found"
        )
    path = "/models/" + quote(model_id, safe="/:@")
    return upstream_for(model_id).relay(
        "GET",
        path,
        g.record,
        request.headers,
        query=request.query_string,
        client=Client.of(request.environ),
    )
