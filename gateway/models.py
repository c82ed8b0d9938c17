"""GET /v1/models and /v1/models/<id>: the models this gateway routes, for this key."""

from __future__ import annotations

import orjson
from flask import Blueprint, Response, current_app, g

from gateway.errors import GatewayError

bp = Blueprint("models", __name__)


@bp.get("/models")
def list_models() -> Response:
    catalog = current_app.extensions["gateway.models"]
    data = [m for m in catalog.models() if g.caller.allows(m["id"])]
    return _json({"object": "list", "data": data})


@bp.get("/models/<path:model_id>")
def retrieve_model(model_id: str) -> Response:
    g.record.model = model_id
    found = current_app.extensions["gateway.models"].find(model_id)
    if found is None or not g.caller.allows(model_id):
        raise GatewayError(
            404,
            f"The model '{model_id[:100]}' does not exist or you do not have access to it.",
            param="model",
            code="model_not_found",
        )
    return _json(found)


def _json(body: object) -> Response:
    return Response(orjson.dumps(body), mimetype="application/json")
