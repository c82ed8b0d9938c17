"""A fast fake OpenAI-compatible upstream: asyncio Protocols, precomputed answers.

The tests' fake (tests/fake_upstream.py) favours features; this one favours speed, so that
the direct-call baseline measures the load generator and loopback, not the fake. Answers are
built once per (model, chunk count) and written with one `transport.write` each; stream
chunks are paced with `loop.call_later`, not a coroutine per stream.

    POST /v1/chat/completions  {"model": "m"}                     -> one JSON answer
    POST /v1/chat/completions  {"model": "m", "stream": true,
                                "fake": {"chunks": 20, "delay": 0.02}} -> SSE, chunked
    POST /v1/chat/completions  {"model": "m-20x20ms", "stream": true}  -> the same SSE

The script may ride in the model name because the gateway's Messages and Responses
translators send a provider only the fields they map: `fake` never arrives through them.

HTTP/1.1 keep-alive; `Connection: close` is honoured. Run it alone with
`python -m bench.upstream --port 9100`; it prints `listening on <port>` once ready.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import gc
import re
from typing import Any

import orjson

CREATED = 1700000000
_HEAD_END = b"\r\n\r\n"
_JSON_HEAD = (
    b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
    b"x-request-id: bench-upstream\r\n\r\n"
)
_SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream; charset=utf-8\r\n"
    b"Cache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n"
    b"x-request-id: bench-upstream\r\n\r\n"
)
_CHUNKED_END = b"0\r\n\r\n"
# Longest request head and body the fake buffers before it gives up on a connection.
_MAX_REQUEST = 1 << 20
# A stream's script in the model name: "<anything>-<chunks>x<delay ms>ms".
_SCRIPTED_MODEL = re.compile(r"-(\d{1,5})x(\d{1,5})ms$")


def scripted_model(base: str, chunks: int, delay: float) -> str:
    """A model name that asks the fake for `chunks` events `delay` seconds apart."""
    return f"{base}-{chunks}x{round(delay * 1000)}ms"


def _script(payload: dict[str, Any], model: str) -> tuple[int, float]:
    """(chunks, delay): from the body's `fake`, else from the model name, else 3 at once."""
    fake = payload.get("fake")
    if isinstance(fake, dict):
        return int(fake.get("chunks", 3)), float(fake.get("delay", 0))
    if (found := _SCRIPTED_MODEL.search(model)) is not None:
        return int(found.group(1)), int(found.group(2)) / 1000
    return 3, 0.0


def sse_event(index: int, model: str) -> bytes:
    delta = {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": CREATED,
        "model": model,
        "choices": [{"index": 0, "delta": {"content": f"tok{index} "}, "finish_reason": None}],
    }
    return b"data: " + orjson.dumps(delta) + b"\n\n"


@functools.cache
def expected_stream(model: str, chunks: int) -> bytes:
    """The exact SSE body the fake sends for a stream: what a client must receive."""
    return b"".join([*(sse_event(i, model) for i in range(chunks)), b"data: [DONE]\n\n"])


@functools.cache
def completion(model: str) -> bytes:
    """The exact JSON body of a non-streamed chat answer."""
    return orjson.dumps(
        {
            "id": "chatcmpl-bench",
            "object": "chat.completion",
            "created": CREATED,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "Hello from the bench."},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10},
        }
    )


@functools.cache
def _json_response(status: int, body: bytes) -> bytes:
    reason = b"OK" if status == 200 else b"Error"
    return _JSON_HEAD % (status, reason, len(body)) + body


def usage_event(model: str, chunks: int) -> bytes:
    """The usage chunk OpenAI sends last when `stream_options.include_usage` is asked for."""
    usage = {"prompt_tokens": 5, "completion_tokens": chunks, "total_tokens": 5 + chunks}
    chunk = {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": CREATED,
        "model": model,
        "choices": [],
        "usage": usage,
    }
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


@functools.cache
def _stream_frames(model: str, chunks: int, usage: bool) -> tuple[bytes, ...]:
    """Wire frames of one stream: headers ride with the first event, the end with the last.
    With `usage`, the usage chunk before [DONE], as a provider sends it (the gateway asks
    for it on every stream and takes it out again for a client that did not)."""
    events = [*(sse_event(i, model) for i in range(chunks))]
    if usage:
        events.append(usage_event(model, chunks))
    events.append(b"data: [DONE]\n\n")
    frames = [b"%x\r\n%s\r\n" % (len(event), event) for event in events]
    frames[0] = _SSE_HEAD + frames[0]
    frames[-1] += _CHUNKED_END
    return tuple(frames)


_NOT_FOUND = _json_response(404, b'{"error":{"message":"no such route","code":"not_found"}}')
_BAD_REQUEST = _json_response(400, b'{"error":{"message":"bad request","code":"bad_request"}}')


class UpstreamProtocol(asyncio.Protocol):
    """One client connection: parse requests from a buffer, answer from precomputed bytes."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        # While a stream is being paced, further (pipelined) requests wait in the buffer.
        self.frames: tuple[bytes, ...] = ()
        self.next_frame = 0
        self.delay = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.close_after = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.buffer = self.buffer + data if self.buffer else data
        if len(self.buffer) > _MAX_REQUEST and self.transport is not None:
            self.transport.close()
            return
        if self.timer is None:
            self._answer_buffered()

    def _answer_buffered(self) -> None:
        buffer = self.buffer
        while self.transport is not None and self.timer is None:
            end = buffer.find(_HEAD_END)
            if end < 0:
                break
            head = buffer[:end].lower()
            length = _content_length(head)
            total = end + 4 + length
            if len(buffer) < total:
                break
            body, buffer = buffer[end + 4 : total], buffer[total:]
            self.close_after = b"\r\nconnection: close" in head
            self._answer(head, body)
            if self.close_after and self.timer is None and self.transport is not None:
                self.transport.close()
        self.buffer = buffer

    def _answer(self, head: bytes, body: bytes) -> None:
        assert self.transport is not None
        method, _, rest = head.partition(b" ")
        path = rest.partition(b" ")[0].partition(b"?")[0]
        if method != b"post" or path not in (b"/v1/chat/completions", b"/v1/completions"):
            self.transport.write(_NOT_FOUND)
            return
        try:
            payload: Any = orjson.loads(body)
        except orjson.JSONDecodeError:
            payload = None
        if not isinstance(payload, dict):
            self.transport.write(_BAD_REQUEST)
            return
        model = str(payload.get("model", "m"))
        if payload.get("stream") is not True:
            self.transport.write(_json_response(200, completion(model)))
            return
        chunks, delay = _script(payload, model)
        options = payload.get("stream_options")
        usage = isinstance(options, dict) and options.get("include_usage") is True
        self._start_stream(_stream_frames(model, chunks, usage), delay)

    def _start_stream(self, frames: tuple[bytes, ...], delay: float) -> None:
        assert self.transport is not None
        if delay <= 0:
            self.transport.write(b"".join(frames))
            return
        self.transport.write(frames[0])
        self.frames, self.next_frame, self.delay = frames, 1, delay
        self.timer = asyncio.get_running_loop().call_later(delay, self._send_next)

    def _send_next(self) -> None:
        self.timer = None
        if self.transport is None:
            return
        self.transport.write(self.frames[self.next_frame])
        self.next_frame += 1
        if self.next_frame < len(self.frames):
            self.timer = asyncio.get_running_loop().call_later(self.delay, self._send_next)
            return
        self.frames = ()
        if self.close_after:
            self.transport.close()
        elif self.buffer:
            self._answer_buffered()


def _content_length(lowered_head: bytes) -> int:
    at = lowered_head.find(b"\r\ncontent-length:")
    if at < 0:
        return 0
    start = at + 17
    end = lowered_head.find(b"\r\n", start)
    return int(lowered_head[start : end if end >= 0 else None])


async def serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        UpstreamProtocol, host, port, backlog=4096, reuse_address=True
    )
    print(f"listening on {server.sockets[0].getsockname()[1]}", flush=True)
    # Everything allocated so far lives forever; keep the collector off it.
    gc.freeze()
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description="Fast fake OpenAI-compatible upstream")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
