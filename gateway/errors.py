"""The one error path: every error the gateway makes itself is an OpenAI error object.

`{"error": {"message", "type", "param", "code"}}` with the matching HTTP status, whether it
comes from routing (404/405), Werkzeug (413), the rate limiter (429), the upstream boundary
(502/504) or a bug of ours (500).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import orjson
from flask import Flask, Response, current_app, g, has_request_context, request
from loguru import logger
from werkzeug.exceptions import HTTPException

# OpenAI's own (type, code) pairs for the statuses a client can see from us.
_KINDS: dict[int, tuple[str, str | None]] = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("permission_denied", "permission_denied"),
    404: ("invalid_request_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    413: ("invalid_request_error", "request_too_large"),
    429: ("requests", "rate_limit_exceeded"),
    500: ("server_error", "internal_error"),
    502: ("server_error", "upstream_unavailable"),
    503: ("server_error", "service_unavailable"),
    504: ("server_error", "upstream_timeout"),
}


class GatewayError(Exception):
    """An error the gateway answers itself, raised anywhere below a view."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        kind: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        # The error's `type` when not the status's usual one (429 insufficient_quota).
        self.kind = kind
        self.headers = headers or {}


def error_body(
    status: int,
    message: str,
    code: str | None = None,
    param: str | None = None,
    kind: str | None = None,
) -> dict:
    default_kind, default_code = _KINDS.get(status, ("invalid_request_error", None))
    return {
        "error": {
            "message": message,
            "type": kind or default_kind,
            "param": param,
            "code": code or default_code,
        }
    }


# Another dialect's error object: (status, message, code) -> the status to send and the body.
# The routes of /v1/messages answer in Anthropic's shape, not OpenAI's.
ErrorShape = Callable[[int, str, str | None], tuple[int, bytes]]


def openai_error(
    status: int,
    message: str,
    *,
    code: str | None = None,
    param: str | None = None,
    kind: str | None = None,
) -> Response:
    shape = _shape_for_request()
    if shape is not None:
        status, body = shape(status, message, code)
    else:
        body = orjson.dumps(error_body(status, message, code, param, kind))
    return Response(body, status=status, mimetype="application/json")


def _shape_for_request() -> ErrorShape | None:
    if not has_request_context():
        return None
    shapes: Sequence[tuple[str, ErrorShape]] = current_app.extensions.get(
        "gateway.error_shapes", ()
    )
    path = request.path
    for prefix, shape in shapes:
        if path.startswith(prefix):
            return shape
    return None


def _from_gateway_error(exc: GatewayError) -> Response:
    response = openai_error(exc.status, exc.message, code=exc.code, param=exc.param, kind=exc.kind)
    response.headers.update(exc.headers)
    return response


def _from_http_exception(exc: HTTPException) -> Response:
    status = exc.code or 500
    message = _HTTP_MESSAGES.get(status, exc.description or exc.name)
    if status == 429:
        message = f"Rate limit reached ({exc.description}). Retry after Retry-After seconds."
    response = openai_error(status, message)
    if status == 405 and exc.get_response().headers.get("Allow"):
        response.headers["Allow"] = exc.get_response().headers["Allow"]
    return response


def _from_unhandled(exc: Exception) -> Response:
    # Our bug: full details go to the log (with the request id), none to the client.
    logger.opt(exception=exc).error("unhandled error")
    record = g.get("record")
    request_id = record.request_id if record is not None else None
    suffix = f" (request id {request_id})" if request_id else ""
    return openai_error(500, f"The gateway had an internal error{suffix}.")


_HTTP_MESSAGES = {
    404: "Unknown route. See /v1/models, /v1/chat/completions, /v1/completions, /v1/embeddings.",
    405: "Method not allowed for this route.",
    413: "Request body too large.",
}


def register_error_handlers(app: Flask, shapes: Sequence[tuple[str, ErrorShape]] = ()) -> None:
    """`shapes`: the routes (by path prefix) whose errors take another dialect's shape."""
    app.extensions["gateway.error_shapes"] = tuple(shapes)
    app.register_error_handler(GatewayError, _from_gateway_error)
    app.register_error_handler(HTTPException, _from_http_exception)
    app.register_error_handler(Exception, _from_unhandled)
