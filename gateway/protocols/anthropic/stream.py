"""A chat completion stream as Messages events, one provider chunk at a time.

Nothing of the answer is held back: each piece of reasoning, text or tool arguments goes out
in the call that brought it. What the translator keeps is a handful of counters, the open
block, and the provider-index → block-index map of tool calls (one entry per call).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgspec

from gateway.protocols.anthropic.answer import (
    SIGNATURE,
    ChatUsage,
    Reply,
    message_id,
    stop_reason_for,
    tool_use_id,
    usage_fields,
)
from gateway.protocols.anthropic.errors import error_event
from gateway.protocols.common import sse


class _FunctionDelta(msgspec.Struct, gc=False):
    name: str | None = None
    arguments: str | None = None


class _ToolCallDelta(msgspec.Struct, gc=False):
    index: int = 0
    function: _FunctionDelta | None = None


class _Delta(msgspec.Struct, gc=False):
    content: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None  # vLLM's newer name
    tool_calls: list[_ToolCallDelta] | None = None


class _ChunkChoice(msgspec.Struct, gc=False):
    index: int = 0
    delta: _Delta | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None  # vLLM: the stop string that matched


class _ErrorInfo(msgspec.Struct, gc=False):
    message: str | None = None


class _Chunk(msgspec.Struct, gc=False):
    choices: list[_ChunkChoice] | None = None
    usage: ChatUsage | None = None
    error: _ErrorInfo | str | None = None  # some providers report a failure as a chunk


_CHUNK = msgspec.json.Decoder(_Chunk)
_ENCODE = msgspec.json.Encoder().encode
# The deltas are nearly every event: their frames are spliced, not built as dicts.
_DELTA = b'event: content_block_delta\ndata: {"type":"content_block_delta","index":%d,"delta":'
_TEXT = _DELTA + b'{"type":"text_delta","text":'
_THINKING = _DELTA + b'{"type":"thinking_delta","thinking":'
_JSON = _DELTA + b'{"type":"input_json_delta","partial_json":'
_END = b"}}\n\n"
_STOP = b'event: content_block_stop\ndata: {"type":"content_block_stop","index":%d}\n\n'
_PING = b'event: ping\ndata: {"type":"ping"}\n\n'
_MESSAGE_STOP = b'event: message_stop\ndata: {"type":"message_stop"}\n\n'


class StreamTranslator:
    """Fed each `data:` payload of a chat stream; returns the Messages SSE bytes to send."""

    def __init__(self, reply: Reply) -> None:
        self._reply = reply
        self._started = False
        self._done = False
        self._failed = False  # ended by fail(): the answer is not whole
        self._saw_done = False  # the provider sent [DONE]
        self._blocks = 0  # blocks started so far: the next block's index
        self._open: str | None = None  # "thinking", "text" or "tool"
        self._open_tool = -1  # provider index of the open tool call
        self._tools: dict[int, int] = {}  # provider tool index -> block index
        self._with_input: set[int] = set()  # tool calls that streamed some arguments
        self._nameless: dict[int, list[str]] = {}  # argument pieces waiting for a name
        self._finish: str | None = None
        self._matched: str | int | None = None
        self._usage: ChatUsage | None = None
        self._chars = 0  # for the output estimate when the provider reports no usage

    @property
    def usage(self) -> Mapping[str, int] | None:
        return self._usage.as_counts() if self._usage is not None else None

    def feed(self, data: bytes) -> bytes:
        if self._done:
            return b""
        if data[:1] == b"[" and data.strip() == b"[DONE]":
            self._saw_done = True
            return self.finish()
        try:
            chunk = _CHUNK.decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
            return b""  # a provider's garbage line: the rest of the stream may be fine
        if chunk.error is not None:
            error = chunk.error
            message = error if isinstance(error, str) else error.message
            return self._start(chunk) + self.fail(502, message or "The provider failed.")
        out = self._start(chunk)
        if chunk.usage is not None:
            self._usage = chunk.usage
        for choice in chunk.choices or ():
            if choice.index == 0:
                out += self._choice(choice)
        return out

    def _start(self, chunk: _Chunk) -> bytes:
        if self._started:
            return b""
        self._started = True
        usage = usage_fields(chunk.usage, self._reply, 0)
        if usage["input_tokens"] + usage["cache_read_input_tokens"] == 0:
            usage = usage_fields(None, self._reply, 0)  # never 0 (LiteLLM #24176)
        usage["output_tokens"] = 1
        message: dict[str, Any] = {
            "id": message_id(),
            "type": "message",
            "role": "assistant",
            "model": self._reply.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": usage,
        }
        return sse("message_start", {"type": "message_start", "message": message}) + _PING

    def _choice(self, choice: _ChunkChoice) -> bytes:
        out = b""
        delta = choice.delta
        if delta is not None:
            thinking = delta.reasoning_content or delta.reasoning
            if thinking:
                out += self._piece("thinking", _THINKING, thinking)
            if delta.content:
                out += self._piece("text", _TEXT, delta.content)
            for call in delta.tool_calls or ():
                out += self._tool_piece(call)
        if choice.finish_reason is not None:
            self._finish = choice.finish_reason
            self._matched = choice.stop_reason
            out += self._close()  # the block is complete: no need to wait for usage
        return out

    def _piece(self, kind: str, frame: bytes, text: str) -> bytes:
        out = b""
        if self._open != kind:
            out = self._close()
            block: dict[str, Any] = {"type": kind, kind: ""}
            if kind == "thinking":
                block["signature"] = ""
            out += self._open_block(kind, block)
        self._chars += len(text)
        return out + frame % (self._blocks - 1) + _ENCODE(text) + _END

    def _tool_piece(self, call: _ToolCallDelta) -> bytes:
        index = call.index
        function = call.function or _FunctionDelta()
        arguments = function.arguments or ""
        if index in self._tools:
            # Also for a call whose block was closed by an interleaving provider: the piece
            # belongs to that call (the SDKs accumulate by block index).
            return self._arguments(index, arguments)
        if not function.name:  # the name usually comes first; wait for it if not
            self._nameless.setdefault(index, []).append(arguments)
            return b""
        return self._start_tool(index, function.name, arguments)

    def _start_tool(self, index: int, name: str, arguments: str) -> bytes:
        out = self._close()
        self._tools[index] = self._blocks
        block = {"type": "tool_use", "id": tool_use_id(), "name": name, "input": {}}
        out += self._open_block("tool", block)
        self._open_tool = index
        return out + self._arguments(index, "".join(self._nameless.pop(index, ())) + arguments)

    def _arguments(self, index: int, arguments: str) -> bytes:
        if not arguments:
            return b""  # DashScope sends empty pieces; an empty partial_json helps no one
        self._with_input.add(index)
        self._chars += len(arguments)
        return _JSON % self._tools[index] + _ENCODE(arguments) + _END

    def _open_block(self, kind: str, block: dict[str, Any]) -> bytes:
        index = self._blocks
        self._blocks += 1
        self._open = kind
        start = {"type": "content_block_start", "index": index, "content_block": block}
        return sse("content_block_start", start)

    def _close(self) -> bytes:
        kind = self._open
        if kind is None:
            return b""
        self._open = None
        index = self._blocks - 1
        out = b""
        if kind == "thinking":
            signature = {"type": "signature_delta", "signature": SIGNATURE}
            out = _DELTA % index + _ENCODE(signature) + b"}\n\n"
        elif kind == "tool" and self._open_tool not in self._with_input:
            # A call without arguments: "{}" parses in every client, "" does not.
            out = _JSON % index + b'"{}"' + _END
        return out + _STOP % index

    def finish(self) -> bytes:
        """The provider's stream ended: close what is open, then message_delta and message_stop.
        A stream that ended with neither a finish_reason nor [DONE] was cut short: `error`."""
        if self._done:
            return b""
        if self._finish is None and not self._saw_done:
            return self.fail(502, "The provider's stream ended before the answer was complete.")
        out = self._start(_Chunk())
        for index, pieces in list(self._nameless.items()):
            out += self._start_tool(index, "", "".join(pieces))
        out += self._close()
        self._done = True
        stop_reason, stop_sequence = stop_reason_for(
            self._finish, self._matched, tool_calls=bool(self._tools), reply=self._reply
        )
        delta = {
            "type": "message_delta",
            "delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
            "usage": usage_fields(self._usage, self._reply, self._chars // 4),
        }
        return out + sse("message_delta", delta) + _MESSAGE_STOP

    def fail(self, status: int, message: str) -> bytes:
        """The provider broke off after the first byte was sent: Anthropic's `error` event."""
        if self._done:
            return b""
        self._done = self._failed = True
        return error_event(status, message)

    @property
    def failed(self) -> bool:
        """Whether the stream ended in an `error` event (a provider failure, not the client)."""
        return self._failed
