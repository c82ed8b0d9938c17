"""POST /v1/chat/completions, /v1/completions and /v1/embeddings: checked, then relayed."""

from __future__ import annotations

from typing import Any

import orjson
from flask import Blueprint, Response, current_app, g, request

from gateway.errors import GatewayError
from gateway.upstream import upstream_for

bp = Blueprint("chat", __name__)


@bp.post("/chat/completions")
def chat_completions() -> Response:
    return _relay("/chat/completions")


@bp.post("/completions")
def completions() -> Response:
    return _relay("/completions")


@bp.post("/embeddings")
def embeddings() -> Response:
    return _relay("/embeddings")


def _relay(path: str) -> Response:
    body = read_body()
    payload = parse_payload(body)
    record = g.record
    record.model = payload["model"]
    record.stream = payload.get("stream") is True
    # The body goes upstream as the client sent it: parsed once to read, never re-serialised.
    client = upstream_for(record.model)
    return client.relay(
        "POST",
        path,
        record,
        request.headers,
        body=body,
        query=request.query_string,
        # gunicorn hands the client's socket to the app: streams watch it for disconnects.
        client_socket=request.environ.get("gunicorn.socket"),
    )


def read_body() -> bytes:
    body = request.get_data(cache=False)
    limit = current_app.config["MAX_CONTENT_LENGTH"]
    # A chunked body (no Content-Length) is cut at the limit by Werkzeug, not refused:
    # a body that fills the limit exactly is treated as one that went past it.
    if request.content_length is None and len(body) >= limit:
        raise GatewayError(413, "Request body too large.", code="request_too_large")
    return body


def parse_payload(body: bytes) -> dict[str, Any]:
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise GatewayError(
            400,
            "We could not parse the JSON body of your request. Send a JSON object with "
            "'Content-Type: application/json'.",
            code="invalid_json",
        ) from None
    if not isinstance(payload, dict):
        raise GatewayError(400, "The request body must be a JSON object.", code="invalid_body")
    model = payload.get("model")
    if not isinstance(model, str) or not model.strip():
        raise GatewayError(
            400,
            "You must provide a model parameter (a string).",
            param="model",
            code="missing_model" if model is None else "invalid_model",
        )
    return payload
