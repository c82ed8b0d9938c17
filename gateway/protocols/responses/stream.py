"""A chat completion stream -> Responses stream events, one provider chunk at a time.

A small state machine in the manner of h11: fed one SSE `data:` payload, it returns the bytes to
send now and keeps only what the final `response` object needs (the text and arguments so far).
"""

from __future__ import annotations

from typing import Any

import msgspec
import orjson

from gateway.protocols.common import sse
from gateway.protocols.responses.answer import (
    INCOMPLETE,
    ChatChoice,
    ChatToolCall,
    ChatUsage,
    Reply,
    call_item,
    completion_decoder,
    estimated_counts,
    message_item,
    reasoning_item,
    request_echo,
    response_object,
    usage_counts,
    usage_object,
)
from gateway.protocols.responses.names import namespaced, restore
from gateway.protocols.responses.request import new_id

# Delta events are the hot path: their fixed part is encoded once per item, the piece per chunk.
_DELTAS = {
    "message": ("response.output_text.delta", '"content_index":0,"logprobs":[],'),
    "reasoning": ("response.reasoning_summary_text.delta", '"summary_index":0,'),
    "call": ("response.function_call_arguments.delta", ""),
}
_CUT_SHORT = "the provider's stream ended before the answer was complete"


class _Text:
    """An open message or reasoning item."""

    __slots__ = ("item_id", "kind", "output_index", "parts", "prefix")

    def __init__(self, kind: str, output_index: int) -> None:
        self.kind = kind
        self.item_id = new_id("msg" if kind == "message" else "rs")
        self.output_index = output_index
        self.parts: list[str] = []
        self.prefix = _delta_prefix(kind, self.item_id, output_index)

    def item(self, status: str) -> dict[str, Any]:
        text = "".join(self.parts)
        if self.kind == "message":
            return message_item(self.item_id, text, status)
        return reasoning_item(self.item_id, text)


class _Call:
    """A tool call, announced once its name is known."""

    __slots__ = ("args", "call_id", "item_id", "name", "output_index", "prefix")

    def __init__(self) -> None:
        self.call_id = ""
        self.name = ""
        self.item_id = ""
        self.output_index = -1  # not announced yet
        self.args: list[str] = []
        self.prefix = b""

    def item(self, status: str, names: dict[str, tuple[str, str]]) -> dict[str, Any]:
        name, namespace = restore(self.name, names)
        # Announced empty: the arguments held so far follow as the first delta.
        arguments = "" if status == "in_progress" else "".join(self.args) or "{}"
        return call_item(
            self.item_id,
            call_id=self.call_id,
            name=name,
            namespace=namespace,
            arguments=arguments,
            status=status,
        )


def _delta_prefix(kind: str, item_id: str, output_index: int) -> bytes:
    event, extra = _DELTAS[kind]
    head = f'{{"type":"{event}","item_id":"{item_id}","output_index":{output_index},'
    return f"event: {event}\ndata: {head}{extra}".encode() + b'"delta":'


class StreamTranslator:
    """Feed it the provider's chat stream; it returns the Responses events to send."""

    def __init__(self, reply: Reply) -> None:
        self._reply = reply
        self._echo = request_echo(reply.request)
        self._names = namespaced(reply.request.tools)
        self._sequence = 0
        self._started = False
        self._finished = False
        self._items: list[_Text | _Call] = []  # by output_index
        self._done: dict[int, dict[str, Any]] = {}  # output_index -> the finished item
        self._text: _Text | None = None
        self._calls: dict[int, _Call] = {}  # by the provider's tool-call index
        self._finish_reason: str | None = None
        self._usage: ChatUsage | None = None
        self._response: dict[str, Any] | None = None
        self._failed = False

    @property
    def response(self) -> dict[str, Any] | None:
        """The final response object (completed, incomplete or failed) once the stream ended."""
        return self._response

    @property
    def failed(self) -> bool:
        """Whether the stream ended in `response.failed` (the provider's failure)."""
        return self._failed

    @property
    def usage(self) -> dict[str, int] | None:
        """The provider's usage (flat counts), or None when it reported none."""
        return usage_counts(self._usage) if self._usage is not None else None

    def feed(self, data: bytes) -> bytes:
        """One `data:` payload of the chat stream (a JSON chunk or `[DONE]`) -> events to send."""
        if self._finished:
            return b""
        out = [] if self._started else self._start()
        if data.strip() == b"[DONE]":
            out.append(self._complete())
            return b"".join(out)
        try:
            chunk = completion_decoder.decode(data)
        except (msgspec.DecodeError, RecursionError):
            return b"".join(out)  # a keep-alive or garbage line is not worth failing the answer
        if chunk.error is not None:
            out.append(self.fail(502, _error_message(chunk.error)))
            return b"".join(out)
        if chunk.usage is not None:
            self._usage = chunk.usage
        for choice in chunk.choices or ():
            if choice.index == 0:
                self._choice(choice, out)
        return b"".join(out)

    def finish(self) -> bytes:
        """The provider's stream ended; complete the response unless it was cut short."""
        if self._finished:
            return b""
        if self._finish_reason is None:
            return self.fail(502, _CUT_SHORT)
        out = [] if self._started else self._start()
        out.append(self._complete())
        return b"".join(out)

    def fail(self, status: int, message: str) -> bytes:
        """End the stream with `response.failed`, keeping what was said so far."""
        if self._finished:
            return b""
        self._failed = True
        out = [] if self._started else self._start()
        code = "rate_limit_exceeded" if status == 429 else "server_error"
        output = [self._done.get(i) or self._snapshot(i) for i in range(len(self._items))]
        failed = self._final("failed", output, error={"code": code, "message": message})
        out.append(self._event("response.failed", response=failed))
        return b"".join(out)

    def _start(self) -> list[bytes]:
        self._started = True
        snapshot = response_object(
            self._reply, self._echo, status="in_progress", output=[], usage=None
        )
        created = self._event("response.created", response=snapshot)
        return [created, self._event("response.in_progress", response=snapshot)]

    def _choice(self, choice: ChatChoice, out: list[bytes]) -> None:
        delta = choice.delta
        if delta is not None:
            thinking = delta.reasoning_content or delta.reasoning
            if thinking:
                self._text_delta("reasoning", thinking, out)
            text = delta.content or delta.refusal
            if text:
                self._text_delta("message", text, out)
            for call in delta.tool_calls or ():
                self._call_delta(call, out)
        if choice.finish_reason:
            self._finish_reason = choice.finish_reason

    def _text_delta(self, kind: str, piece: str, out: list[bytes]) -> None:
        item = self._text
        if item is None or item.kind != kind:
            self._close_text(out, "completed")
            item = self._open_text(kind, out)
        item.parts.append(piece)
        out.append(item.prefix + orjson.dumps(piece) + self._sequence_tail())

    def _open_text(self, kind: str, out: list[bytes]) -> _Text:
        item = self._text = _Text(kind, len(self._items))
        self._items.append(item)
        where = {"item_id": item.item_id, "output_index": item.output_index}
        added = item.item("in_progress")
        out.append(
            self._event("response.output_item.added", output_index=item.output_index, item=added)
        )
        if kind == "message":
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
            out.append(
                self._event("response.content_part.added", **where, content_index=0, part=part)
            )
        else:
            part = {"type": "summary_text", "text": ""}
            part_added = "response.reasoning_summary_part.added"
            out.append(self._event(part_added, **where, summary_index=0, part=part))
        return item

    def _close_text(self, out: list[bytes], status: str) -> None:
        item, self._text = self._text, None
        if item is None:
            return
        final = self._done[item.output_index] = item.item(status)
        where = {"item_id": item.item_id, "output_index": item.output_index}
        if item.kind == "message":
            part = final["content"][0]
            text = part["text"]
            text_done = "response.output_text.done"
            done = self._event(text_done, **where, content_index=0, text=text, logprobs=[])
            out += (
                done,
                self._event("response.content_part.done", **where, content_index=0, part=part),
            )
        else:
            part = final["summary"][0] if final["summary"] else {"type": "summary_text", "text": ""}
            text_done = "response.reasoning_summary_text.done"
            part_done = "response.reasoning_summary_part.done"
            out.append(self._event(text_done, **where, summary_index=0, text=part["text"]))
            out.append(self._event(part_done, **where, summary_index=0, part=part))
        done_item = "response.output_item.done"
        out.append(self._event(done_item, output_index=item.output_index, item=final))

    def _call_delta(self, delta: ChatToolCall, out: list[bytes]) -> None:
        index = delta.index if delta.index is not None else self._guess_index(delta.id)
        call = self._calls.get(index)
        if call is None:
            call = self._calls[index] = _Call()
        # Only the first piece names the call; later ones may repeat it or send "".
        if delta.id and not call.call_id:
            call.call_id = delta.id
        function = delta.function
        if function is not None and function.name and not call.name:
            call.name = function.name
        piece = function.arguments if function is not None else None
        if call.output_index < 0:
            if piece:
                call.args.append(piece)  # arguments before the name: held until it arrives
            if call.name:
                self._open_call(call, out)
        elif piece:
            call.args.append(piece)
            out.append(call.prefix + orjson.dumps(piece) + self._sequence_tail())

    def _guess_index(self, call_id: str | None) -> int:
        # Providers that omit `index` send one call at a time; a new id starts the next one.
        for index, call in self._calls.items():
            if call.call_id == call_id:
                return index
        return len(self._calls) if call_id else max(self._calls, default=0)

    def _open_call(self, call: _Call, out: list[bytes]) -> None:
        self._close_text(out, "completed")
        call.output_index = len(self._items)
        call.item_id = new_id("fc")
        call.call_id = call.call_id or new_id("call")
        call.prefix = _delta_prefix("call", call.item_id, call.output_index)
        self._items.append(call)
        item = call.item("in_progress", self._names)
        out.append(
            self._event("response.output_item.added", output_index=call.output_index, item=item)
        )
        if call.args:
            out.append(call.prefix + orjson.dumps("".join(call.args)) + self._sequence_tail())

    def _complete(self) -> bytes:
        out: list[bytes] = []
        incomplete = INCOMPLETE.get(self._finish_reason or "")
        status = "incomplete" if incomplete else "completed"
        self._close_text(out, status)
        for call in list(self._calls.values()):
            if call.output_index < 0:
                self._open_call(call, out)  # a call whose name never came: still the client's
        for call in self._calls.values():
            final = self._done[call.output_index] = call.item(status, self._names)
            where = {"item_id": call.item_id, "output_index": call.output_index}
            args = final["arguments"]
            out.append(
                self._event("response.function_call_arguments.done", **where, arguments=args)
            )
            done_item = "response.output_item.done"
            out.append(self._event(done_item, output_index=call.output_index, item=final))
        if not self._items:
            self._open_text("message", out)  # the client always gets a message, if empty
            self._close_text(out, status)
        output = [self._done[i] for i in range(len(self._items))]
        final = self._final(status, output, incomplete=incomplete)
        out.append(self._event(f"response.{status}", response=final))
        return b"".join(out)

    def _final(self, status: str, output: list[dict[str, Any]], **detail: Any) -> dict[str, Any]:
        self._finished = True
        if self._usage is not None:
            counts = usage_counts(self._usage)
        else:
            counts = estimated_counts(self._reply.input_estimate, self._output_chars())
        usage = usage_object(counts)
        final = response_object(
            self._reply, self._echo, status=status, output=output, usage=usage, **detail
        )
        self._response = final
        return final

    def _snapshot(self, index: int) -> dict[str, Any]:
        item = self._items[index]
        if isinstance(item, _Text):
            return item.item("incomplete")
        return item.item("incomplete", self._names)

    def _output_chars(self) -> int:
        pieces = [item.parts if isinstance(item, _Text) else item.args for item in self._items]
        return sum(len(piece) for parts in pieces for piece in parts)

    def _event(self, event: str, **fields: Any) -> bytes:
        payload = {"type": event, **fields, "sequence_number": self._sequence}
        self._sequence += 1
        return sse(event, payload)

    def _sequence_tail(self) -> bytes:
        tail = b',"sequence_number":%d}\n\n' % self._sequence
        self._sequence += 1
        return tail


def failed_event(status: int, message: str) -> bytes:
    """A relayed (native) stream's failure after its first byte: OpenAI's own `error` event.

    Not `response.failed`: that must carry the provider's response id, which only its stream
    knows, and the SDK refuses a lifecycle event whose id changed.
    """
    code = "rate_limit_exceeded" if status == 429 else "server_error"
    payload = {"type": "error", "code": code, "message": message, "param": None}
    return sse("error", payload | {"sequence_number": 0})


def _error_message(error: object) -> str:
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return f"the provider failed: {error['message']}"
    return "the provider failed mid-stream"
