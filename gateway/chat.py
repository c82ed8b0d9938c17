"""POST /v1/chat/completions, /v1/completions and /v1/embeddings: checked, then relayed."""

from __future__ import annotations

import msgspec
from flask import Blueprint, Response, current_app, g, request
from gunicorn.http.errors import ParseException

from gateway.errors import GatewayError
from gateway.policy.enforce import admit
from gateway.upstream import Client, upstream_for
from gateway.upstream.dialect import ChatDialect
from gateway.upstream.edits import asked_for_usage

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
    head = parse_head(body)
    record = g.record
    record.model = head.model
    record.stream = head.stream is True
    # The key's model list and token windows: refused here, before any upstream call.
    admit(record, body, _max_tokens(head))
    # Every stream is asked for its usage (its cost): the client sends each attempt's body
    # with include_usage added when the client did not ask, and the relay takes the usage
    # back out, so the client gets the provider's bytes unchanged. Otherwise the body goes
    # upstream as the client sent it: read, never re-serialised.
    record.inject_usage = record.stream and path != "/embeddings" and not asked_for_usage(body)
    client = upstream_for(record.model)
    response = client.relay(
        ChatDialect(path, body, request.query_string),
        record,
        request.headers,
        # gunicorn hands the client's socket to the app: watched for the client leaving.
        client=Client.of(request.environ),
    )
    if not response.is_streamed:  # what an estimate takes for the completion, if need be
        record.completion_bytes = response.calculate_content_length() or 0
    return response


def read_body() -> bytes:
    try:
        body = request.get_data(cache=False)
    except (ParseException, OSError):
        # gunicorn's chunked decoder found a bad chunk size or terminator, or the client
        # went away mid-body: either way, nothing complete to send on.
        raise GatewayError(
            400, "The request body could not be read: its chunked encoding is malformed."
        ) from None
    limit = current_app.config["MAX_CONTENT_LENGTH"]
    declared = request.content_length
    # A chunked body (no Content-Length) is cut at the limit by Werkzeug, not refused:
    # a body that fills the limit exactly is treated as one that went past it.
    if declared is None and len(body) >= limit:
        raise GatewayError(413, "Request body too large.", code="request_too_large")
    # gunicorn hands over what arrived when a client half-closes early; never relay it.
    if declared is not None and len(body) != declared:
        raise GatewayError(
            400,
            f"The request body ended after {len(body)} of its {declared} declared bytes.",
            code="incomplete_body",
        )
    return body


class RequestHead(msgspec.Struct):
    """The only fields the gateway reads from a request body.

    Decoding into this skips every other value without building it, so memory stays the
    body's own size whatever its shape: `orjson.loads` on 10 MB of tiny JSON objects built
    over 300 MB of Python objects just to read `model`.
    """

    model: str | None = None
    stream: bool | None = None
    # What a request reserves of its key's tokens while in flight; kept raw, so that a
    # value only the provider understands is the provider's to refuse.
    max_tokens: msgspec.Raw = msgspec.Raw()
    max_completion_tokens: msgspec.Raw = msgspec.Raw()


def _max_tokens(head: RequestHead) -> int | None:
    for raw in (head.max_completion_tokens, head.max_tokens):
        text = bytes(raw).strip()
        if text.isdigit() and len(text) <= 9:
            return int(text)
    return None


_HEAD_DECODER = msgspec.json.Decoder(RequestHead)


def parse_head(body: bytes) -> RequestHead:
    try:
        head = _HEAD_DECODER.decode(body)
    except msgspec.ValidationError as exc:
        raise _invalid_field(str(exc)) from None
    except (msgspec.DecodeError, RecursionError, UnicodeDecodeError):
        raise GatewayError(
            400,
            "We could not parse the JSON body of your request. Send a JSON object with "
            "'Content-Type: application/json'.",
            code="invalid_json",
        ) from None
    if head.model is None or not head.model.strip():
        raise _missing_model("missing_model" if head.model is None else "invalid_model")
    return head


def _invalid_field(problem: str) -> GatewayError:
    if "$.model" in problem:
        return _missing_model("invalid_model")
    if "$.stream" in problem:
        return GatewayError(400, "'stream' must be a boolean.", param="stream", code="invalid_type")
    return GatewayError(400, "The request body must be a JSON object.", code="invalid_body")


def _missing_model(code: str) -> GatewayError:
    return GatewayError(
        400, "You must provide a model parameter (a string).", param="model", code=code
    )
