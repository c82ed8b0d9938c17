"""A Messages request as the gateway reads it: a whitelist of fields, checked once.

Fields not named here are ignored while decoding, so nothing Anthropic adds later can reach
an OpenAI provider by accident. Every content block decodes into the one small `Block`
struct rather than a tagged union: a block type this module does not know (a server tool's
result replayed from a native provider) must still parse, and only the translation to chat
decides whether it can be sent on. The structs skip the garbage collector (`gc=False`:
decoded JSON has no cycles), which keeps a 10 MB body of tiny blocks a few tens of MB.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

import msgspec

from gateway.protocols.common import ProtocolError

BILLING_HEADER = "x-anthropic-billing-header:"
# Anthropic bills an image by its pixels, which the gateway does not decode: a typical
# screenshot's count stands in for each image or binary document.
IMAGE_TOKENS = 1600
# A free-form JSON value that was not sent (msgspec.Raw cannot be None; empty means absent).
ABSENT = msgspec.Raw()


class Source(msgspec.Struct, gc=False):
    type: str
    media_type: str | None = None
    data: str | None = None
    url: str | None = None


class Block(msgspec.Struct, gc=False):
    """Any content block; which fields matter depends on `type`."""

    type: str
    text: str | None = None
    source: Source | None = None
    id: str | None = None
    name: str | None = None
    input: msgspec.Raw = ABSENT  # the client's own JSON text, passed on as arguments
    tool_use_id: str | None = None
    content: str | list[Block] | None = None
    is_error: bool | None = None
    thinking: str | None = None
    signature: str | None = None


class Message(msgspec.Struct, gc=False):
    role: Literal["user", "assistant"]
    content: str | list[Block]


class Tool(msgspec.Struct, gc=False):
    name: str
    description: str | None = None
    input_schema: msgspec.Raw = ABSENT
    type: str | None = None  # absent or "custom" for the client's own tools


class ToolChoice(msgspec.Struct, gc=False):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None


class Thinking(msgspec.Struct, gc=False):
    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: int | None = None


class OutputFormat(msgspec.Struct, gc=False):
    type: str
    schema: msgspec.Raw = ABSENT


class OutputConfig(msgspec.Struct, gc=False):
    effort: str | None = None
    format: OutputFormat | None = None


class Metadata(msgspec.Struct, gc=False):
    user_id: str | None = None


class MessagesRequest(msgspec.Struct, gc=False, kw_only=True):
    model: str
    max_tokens: Annotated[int, msgspec.Meta(ge=1)]
    messages: list[Message]
    system: str | list[Block] | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    stop_sequences: list[str] | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    stream: bool | None = None
    thinking: Thinking | None = None
    output_config: OutputConfig | None = None
    output_format: OutputFormat | None = None  # the structured-outputs beta's older spelling
    metadata: Metadata | None = None


class _CountingRequest(MessagesRequest, gc=False, kw_only=True):
    """count_tokens takes the same body without `max_tokens`."""

    max_tokens: Annotated[int, msgspec.Meta(ge=1)] = 1


_DECODER = msgspec.json.Decoder(MessagesRequest)
_COUNTING_DECODER = msgspec.json.Decoder(_CountingRequest)
_PATH_PART = re.compile(r"\[(\d+)\]|\.(\w+)")
_MISSING = re.compile(r"missing required field `(\w+)`")


def parse(body: bytes, *, counting: bool = False) -> MessagesRequest:
    """The request in `body`, or ProtocolError naming the first field that is wrong.
    `counting`: a count_tokens body, which has no `max_tokens`."""
    try:
        req = (_COUNTING_DECODER if counting else _DECODER).decode(body)
    except msgspec.ValidationError as exc:
        raise _validation_error(str(exc)) from None
    except msgspec.DecodeError as exc:
        raise ProtocolError(f"The request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise ProtocolError("The request body is nested too deeply.") from None
    _check(req)
    return req


def _validation_error(text: str) -> ProtocolError:
    """msgspec's "Expected `int`, got `str` - at `$.messages[3].content`" in Anthropic's
    dotted style: "messages.3.content: Expected `int`, got `str`"."""
    reason, _, where = text.partition(" - at `")
    path = ".".join(a or b for a, b in _PATH_PART.findall(where.rstrip("`")))
    missing = _MISSING.search(reason)
    if missing:
        path = f"{path}.{missing[1]}" if path else missing[1]
        reason = "Field required"
    if not path:
        return ProtocolError(f"The request body must be a JSON object: {reason}")
    return ProtocolError(f"{path}: {reason}", param=path)


def _fail(path: str, reason: str) -> ProtocolError:
    return ProtocolError(f"{path}: {reason}", param=path)


def _check(req: MessagesRequest) -> None:
    if not req.messages:
        raise _fail("messages", "at least one message is required")
    if isinstance(req.system, list):
        for i, block in enumerate(req.system):
            if block.type != "text" or block.text is None:
                raise _fail(f"system.{i}", "system blocks must be text blocks with `text`")
    for i, message in enumerate(req.messages):
        if isinstance(message.content, list):
            for j, block in enumerate(message.content):
                _check_block(block, f"messages.{i}.content.{j}", nested=False)
    _check_tools(req)


def _check_block(block: Block, path: str, *, nested: bool) -> None:
    kind = block.type
    if kind == "text" and block.text is None:
        raise _fail(f"{path}.text", "Field required")
    if kind in ("image", "document"):
        _check_source(block.source, f"{path}.source")
    elif kind == "tool_use":
        if not block.id or not block.name:
            raise _fail(path, "tool_use blocks need `id` and `name`")
        if not bytes(block.input).startswith(b"{"):
            raise _fail(f"{path}.input", "Input should be an object")
    elif kind == "tool_result":
        if nested:
            raise _fail(path, "a tool_result cannot contain another tool_result")
        if not block.tool_use_id:
            raise _fail(f"{path}.tool_use_id", "Field required")
        if isinstance(block.content, list):
            for k, inner in enumerate(block.content):
                _check_block(inner, f"{path}.content.{k}", nested=True)
    elif kind == "thinking" and block.thinking is None:
        raise _fail(f"{path}.thinking", "Field required")


def _check_source(source: Source | None, path: str) -> None:
    if source is None:
        raise _fail(path, "Field required")
    if source.type == "base64" and (not source.media_type or source.data is None):
        raise _fail(path, "base64 sources need `media_type` and `data`")
    if source.type == "url" and not source.url:
        raise _fail(f"{path}.url", "Field required")


def _check_tools(req: MessagesRequest) -> None:
    names: set[str] = set()
    for i, tool in enumerate(req.tools or ()):
        if tool.name in names:
            raise _fail(f"tools.{i}.name", f"tool names must be unique: {tool.name!r}")
        names.add(tool.name)
        if tool.type in (None, "custom") and not bytes(tool.input_schema).startswith(b"{"):
            raise _fail(f"tools.{i}.input_schema", "Input should be an object")
    choice = req.tool_choice
    if choice is None or choice.type in ("auto", "none"):
        return
    if not names:
        raise _fail("tool_choice", f"tool_choice {choice.type!r} needs `tools`")
    if choice.type == "tool" and choice.name not in names:
        # Bifrost #3596: a provider would fail later, or silently pick another tool.
        raise _fail("tool_choice.name", f"tool {choice.name!r} is not in `tools`")


def count_tokens(req: MessagesRequest) -> int:
    """A rough estimate of the prompt's tokens: four characters a token, at least 1."""
    chars = 0
    images = 0
    for text in _system_blocks(req.system):
        chars += len(text)
    for message in req.messages:
        if isinstance(message.content, str):
            chars += len(message.content)
            continue
        for block in message.content:
            more_chars, more_images = _block_size(block)
            chars += more_chars
            images += more_images
    for tool in req.tools or ():
        chars += len(tool.name) + len(tool.description or "") + len(tool.input_schema)
    return max(1, chars // 4 + images * IMAGE_TOKENS)


def _system_blocks(system: str | list[Block] | None) -> list[str]:
    if system is None:
        return []
    if isinstance(system, str):
        return [system]
    return [b.text for b in system if b.text and not b.text.startswith(BILLING_HEADER)]


def _block_size(block: Block) -> tuple[int, int]:
    """(characters, images) of one block, a tool result's inner blocks included."""
    if block.type in ("image", "document"):
        source = block.source
        if source is not None and source.type == "text" and source.data is not None:
            return len(source.data), 0
        return 0, 1
    chars = len(block.text or "") + len(block.thinking or "") + len(block.input)
    images = 0
    if isinstance(block.content, str):
        chars += len(block.content)
    elif block.content is not None:
        for inner in block.content:
            more_chars, more_images = _block_size(inner)
            chars += more_chars
            images += more_images
    return chars, images
