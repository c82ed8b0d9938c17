"""The Responses request: a whitelist of its fields, decoded and checked once.

msgspec decodes straight into these Structs, so fields we do not list are skipped without being
built, and a huge `input` array costs one small Struct per item rather than a dict of strings.
"""

from __future__ import annotations

import os
from typing import Any

import msgspec

from gateway.protocols.common import ProtocolError

# Schemas are echoed back through orjson, which refuses more than 254 levels; no real schema
# comes near this, and refusing here keeps a hostile one from failing mid-stream.
MAX_SCHEMA_DEPTH = 64

TEXT_PARTS = frozenset({"input_text", "output_text", "text", "refusal", "summary_text"})
CONTENT_PARTS = TEXT_PARTS | {"input_image", "input_file"}
MESSAGE_ROLES = frozenset({"user", "assistant", "system", "developer"})


class ContentPart(msgspec.Struct, omit_defaults=True):
    type: str
    text: str | None = None
    refusal: str | None = None
    image_url: str | None = None
    detail: str | None = None
    file_id: str | None = None
    file_data: str | None = None
    filename: str | None = None
    annotations: list[Any] | None = None


class SummaryPart(msgspec.Struct, omit_defaults=True):
    text: str
    type: str = "summary_text"


class InputItem(msgspec.Struct, omit_defaults=True):
    """Any input item; one Struct for all types because plain messages may omit `type`."""

    type: str = "message"
    id: str | None = None
    role: str | None = None
    content: str | list[ContentPart] | None = None
    status: str | None = None
    call_id: str | None = None
    name: str | None = None
    namespace: str | None = None
    arguments: str | None = None
    output: str | list[ContentPart] | None = None
    summary: list[SummaryPart] | None = None
    encrypted_content: str | None = None


class Tool(msgspec.Struct, omit_defaults=True):
    type: str
    name: str | None = None
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None
    tools: list[Tool] | None = None  # a `namespace` tool's functions


class ToolChoice(msgspec.Struct, omit_defaults=True):
    type: str
    name: str | None = None
    mode: str | None = None  # `allowed_tools`: "auto" or "required"


class TextFormat(msgspec.Struct, omit_defaults=True):
    type: str
    name: str | None = None
    schema: dict[str, Any] | None = None
    strict: bool | None = None
    description: str | None = None


class TextOptions(msgspec.Struct, omit_defaults=True):
    format: TextFormat | None = None
    verbosity: str | None = None


class ReasoningOptions(msgspec.Struct, omit_defaults=True):
    effort: str | None = None
    summary: str | None = None


class ResponsesRequest(msgspec.Struct, omit_defaults=True):
    model: str
    input: str | list[InputItem] = []
    instructions: str | list[InputItem] | None = None
    tools: list[Tool] = []
    tool_choice: str | ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    text: TextOptions | None = None
    reasoning: ReasoningOptions | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    store: bool = True
    stream: bool = False
    previous_response_id: str | None = None
    metadata: dict[str, str] | None = None
    include: list[str] | None = None
    client_metadata: dict[str, Any] | None = None
    truncation: str | None = None


_decoder = msgspec.json.Decoder(ResponsesRequest)


def new_id(prefix: str) -> str:
    """An id in OpenAI's style (`msg_…`, `fc_…`); random, since ids must not collide in storage."""
    return f"{prefix}_{os.urandom(12).hex()}"


def parse(body: bytes) -> ResponsesRequest:
    """Decode and check a `POST /v1/responses` body; ProtocolError says what is wrong and where."""
    try:
        req = _decoder.decode(body)
    except msgspec.ValidationError as exc:
        text = str(exc)
        path = text.rpartition(" - at `$.")[2].rstrip("`") if " - at `$." in text else None
        raise ProtocolError(f"invalid request body: {text}", path) from None
    except msgspec.DecodeError:
        raise ProtocolError("the request body is not valid JSON") from None
    except RecursionError:
        raise ProtocolError("the request body is nested too deeply") from None
    if not req.model:
        raise ProtocolError("`model` must not be empty", "model")
    if isinstance(req.input, list):
        _check_items(req.input, "input")
    if isinstance(req.instructions, list):
        _check_items(req.instructions, "instructions")
    _check_schemas(req)
    return req


def _check_items(items: list[InputItem], where: str) -> None:
    for i, item in enumerate(items):
        if item.type == "message":
            _check_message(item, f"{where}[{i}]")
        elif item.type == "function_call":
            if item.call_id is None or item.name is None or item.arguments is None:
                raise ProtocolError(
                    "a function_call item needs call_id, name and arguments", f"{where}[{i}]"
                )
        elif item.type == "function_call_output" and (item.call_id is None or item.output is None):
            raise ProtocolError(
                "a function_call_output item needs call_id and output", f"{where}[{i}]"
            )


def _check_message(item: InputItem, where: str) -> None:
    if item.role not in MESSAGE_ROLES:
        raise ProtocolError(f"a message's role must be one of {sorted(MESSAGE_ROLES)}", where)
    if item.content is None:
        raise ProtocolError("a message needs content", f"{where}.content")
    if isinstance(item.content, list):
        for j, part in enumerate(item.content):
            if part.type not in CONTENT_PARTS:
                param = f"{where}.content[{j}].type"
                raise ProtocolError(f"content part type {part.type!r} is not supported", param)
            if part.type == "input_image" and not part.image_url:
                param = f"{where}.content[{j}].image_url"
                raise ProtocolError("input_image needs image_url (a URL or data URL)", param)


def _check_schemas(req: ResponsesRequest) -> None:
    for i, tool in enumerate(req.tools):
        for j, inner in enumerate(tool.tools or ()):
            _check_depth(inner.parameters, f"tools[{i}].tools[{j}].parameters")
        _check_depth(tool.parameters, f"tools[{i}].parameters")
    if req.text is not None and req.text.format is not None:
        _check_depth(req.text.format.schema, "text.format.schema")


def _check_depth(value: object, param: str, depth: int = 0) -> None:
    if depth > MAX_SCHEMA_DEPTH:
        raise ProtocolError(f"the schema is nested more than {MAX_SCHEMA_DEPTH} levels", param)
    if isinstance(value, dict):
        for inner in value.values():
            _check_depth(inner, param, depth + 1)
    elif isinstance(value, list):
        for inner in value:
            _check_depth(inner, param, depth + 1)


def input_items(req: ResponsesRequest) -> list[dict[str, Any]]:
    """The request's input as stored Responses items, each with an id (the client's, or ours)."""
    if isinstance(req.input, str):
        part = {"type": "input_text", "text": req.input}
        return [{"id": new_id("msg"), "type": "message", "role": "user", "content": [part]}]
    return [normalized_item(item) for item in req.input]


_ID_PREFIXES = {"message": "msg", "function_call": "fc", "function_call_output": "fco"}


def normalized_item(item: InputItem) -> dict[str, Any]:
    stored: dict[str, Any] = msgspec.to_builtins(item)
    stored["type"] = item.type
    if item.id is None:
        stored["id"] = new_id(_ID_PREFIXES.get(item.type, "item"))
    if item.type in _ID_PREFIXES:
        stored.setdefault("status", "completed")  # stored items are finished ones
    if item.type == "message" and isinstance(item.content, str):
        kind = "output_text" if item.role == "assistant" else "input_text"
        stored["content"] = [{"type": kind, "text": item.content}]
    if item.type == "message" and item.role == "assistant":
        for part in stored["content"]:
            if part["type"] == "output_text":
                part.setdefault("annotations", [])
    return stored
