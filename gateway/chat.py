"""POST /v1/chat/completions, /v1/completions and /v1/embeddings: checked, then relayed."""

from __future__ import annotations

import re

import msgspec
from flask import Blueprint, Response, current_app, g, request
from gunicorn.http.errors import ParseException

from gateway.errors import GatewayError
from gateway.policy.enforce import admit
from gateway.record import count_of
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
    admit(record, body, _max_tokens(head), choices=_choices(head))
    # Every stream is asked for its usage (its cost): the client sends each attempt's body
    # with include_usage added when the client did not ask, and the relay takes the usage
    # back out, so the client gets the provider's bytes unchanged. Otherwise the body goes
    # upstream as the client sent it: read, never re-serialised.
    record.inject_usage = record.stream and path != "/embeddings" and not asked_for_usage(body)
    client = upstream_for(record.model)
    response = client.relay(
        ChatDialect(path, body, request.query_string, output_cap=record.output_cap),
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
    """The only fields the gateway reads from a request body."""

    model: str | None = None
    stream: bool | None = None
    # What a request reserves of its key's tokens while in flight; kept raw, so that a
    # value only the provider understands is the provider's to refuse.
    max_tokens: msgspec.Raw = msgspec.Raw()
    max_completion_tokens: msgspec.Raw = msgspec.Raw()
    n: msgspec.Raw = msgspec.Raw()
    best_of: msgspec.Raw = msgspec.Raw()  # /completions: generated server-side, billed
    # /completions: how many prompts `prompt` holds (each gets `n` completions); set from
    # the body's `prompt` after decoding, never read from a member of this name.
    prompts: int = 1


def _max_tokens(head: RequestHead) -> int | None:
    for raw in (head.max_completion_tokens, head.max_tokens):
        if (count := _lenient_count(raw)) is not None:
            return count
    return None


def _choices(head: RequestHead) -> int:
    """How many completions the request may be billed for: `n` (or `best_of` if more) for
    each of its prompts."""
    per_prompt = max(1, _lenient_count(head.n) or 1, _lenient_count(head.best_of) or 1)
    return per_prompt * head.prompts


_LIST = msgspec.json.Decoder(list[msgspec.Raw])


def _prompt_count(prompt: msgspec.Raw | None) -> int:
    """A list of strings or of token lists is that many prompts; a string, or one list of
    tokens (integers), is one."""
    if prompt is None or not bytes(prompt).lstrip().startswith(b"["):
        return 1
    try:
        items = _LIST.decode(prompt)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return 1  # the provider's to refuse
    if not items or bytes(items[0]).lstrip()[:1] not in (b'"', b"["):
        return 1
    return len(items)


def _lenient_count(raw: msgspec.Raw) -> int | None:
    """A count as a lenient provider reads it (vLLM's pydantic takes `1e3`, `1000.0` and
    `"1000"`), rounded up and capped: reserving for it costs nothing if it is refused."""
    text = bytes(raw).strip()
    if text.startswith(b'"'):
        try:
            text = msgspec.json.decode(text, type=str).strip().encode()
        except (msgspec.DecodeError, msgspec.ValidationError):
            return None
    return count_of(text)


_TOP_LEVEL = msgspec.json.Decoder(dict[str, msgspec.Raw])
_HEAD_FIELDS = RequestHead.__struct_fields__
_HEAD_DECODER = msgspec.json.Decoder(RequestHead)
_HEAD_ENCODER = msgspec.json.Encoder()
# A member's name and its colon; what follows a value: a comma, or the closing brace.
_MEMBER_NAME = re.compile(rb'\s*"((?:[^"\\]|\\.)*)"\s*:\s*')
_AFTER_VALUE = re.compile(rb"\s*([,}])")


MAX_TOP_LEVEL_MEMBERS = 1024


def parse_head(body: bytes) -> RequestHead:
    """The fields the gateway reads, from a body refused unless it is a JSON object with
    each member once.

    The top level is decoded into raw values (each value's own bytes, nothing built), so
    memory stays the body's own size whatever its shape: `orjson.loads` on 10 MB of tiny
    JSON objects built over 300 MB of Python objects just to read `model`.
    """
    try:
        fields = _TOP_LEVEL.decode(body)
    except msgspec.ValidationError:
        raise GatewayError(
            400, "The request body must be a JSON object.", code="invalid_body"
        ) from None
    except (msgspec.DecodeError, RecursionError, UnicodeDecodeError):
        raise _unparsable() from None
    if len(fields) > MAX_TOP_LEVEL_MEMBERS:
        # No API has that many; walking a million of them would hold the GIL for seconds.
        raise GatewayError(
            400,
            f"The request body has more than {MAX_TOP_LEVEL_MEMBERS} top-level members.",
            code="invalid_body",
        )
    if (twice := repeated_member(body, fields)) is not None:
        # The gateway checks one of the two and relays both: a provider that keeps the
        # other (many parsers keep the first) would serve what the gateway never allowed.
        raise GatewayError(
            400,
            f"The request body has the member '{twice[:100]}' more than once: send it once.",
            param=twice[:100],
            code="duplicate_member",
        )
    read = {name: fields[name] for name in _HEAD_FIELDS if name in fields and name != "prompts"}
    try:  # a few small values: the body is not decoded again
        head = _HEAD_DECODER.decode(_HEAD_ENCODER.encode(read))
    except msgspec.ValidationError as exc:
        raise _invalid_field(str(exc)) from None
    except (msgspec.DecodeError, UnicodeDecodeError):  # a raw value's own bytes, now read
        raise _unparsable() from None
    if head.model is None or not head.model.strip():
        raise _missing_model("missing_model" if head.model is None else "invalid_model")
    head.prompts = _prompt_count(fields.get("prompt"))
    return head


def repeated_member(body: bytes, fields: dict[str, msgspec.Raw]) -> str | None:
    """The name of a top-level member `body` has twice, if any.

    `fields` is `body` decoded, which keeps a name's last value. One walk over the top
    level checks each value in place against it: a name met again, or a value that is not
    the one kept (the first of a repeated name), is the answer. Each member costs a short
    regex and a compare of its value's bytes, never a parse.
    """
    if not fields:
        return None
    at = body.index(b"{") + 1
    seen: set[str] = set()
    for _ in range(len(body)):  # each turn moves past one member
        member = _MEMBER_NAME.match(body, at)
        if member is None:
            return "?"  # not reached for a body the decoder read, whatever its members
        name = _member_name(member[1])
        kept = fields.get(name)
        at = member.end()
        if name in seen or kept is None or not body.startswith(bytes(kept), at):
            return name
        seen.add(name)
        after = _AFTER_VALUE.match(body, at + len(kept))
        if after is None:
            return name  # the kept value is a prefix of this one: another value
        if after[1] == b"}":
            return None
        at = after.end()
    return None


def _member_name(quoted: bytes) -> str:
    if b"\\" not in quoted:  # the usual name: no escapes to undo
        return quoted.decode()
    return msgspec.json.decode(b'"' + quoted + b'"', type=str)  # "m\u006fdel" is "model"


def _unparsable() -> GatewayError:
    return GatewayError(
        400,
        "We could not parse the JSON body of your request. Send a JSON object with "
        "'Content-Type: application/json'.",
        code="invalid_json",
    )


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
