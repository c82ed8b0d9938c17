"""A fake OpenAI-compatible provider on loopback: real sockets, real SSE timing.

Each request scripts its own answer through an optional `"fake"` object in the JSON body
(the gateway relays bodies untouched), so tests need no shared state to set it up:

    {"model": "m", "stream": true, "fake": {"chunks": 5, "delay": 0.2}}

Keys: status, chunks, delay (between chunks), sleep_before (before the headers),
die_after (abort the connection after N chunks), close_after (close it cleanly after N
chunks, without ending the chunked body), framing ("chunked" or "close"),
error_body (the body sent with a non-2xx status), headers (extra headers of a JSON
answer, e.g. Retry-After), embedding_size; and for usage: usage (the usage object reported
instead of the default one, any JSON), no_usage (a JSON answer without one),
usage_from_size (report ceil(body bytes / 4) prompt tokens and `max_tokens` completion
tokens), usage_in_every_chunk.

Like OpenAI and DashScope, a stream reports usage only when the request asks for it with
`stream_options.include_usage`: then every chunk carries `"usage":null` and a last chunk
with `"choices":[]` carries the usage.

Several fakes stand for several providers: `forced` is a script every request gets, over
its own (so that provider A fails while B, given the same body, answers), and `models`
is what its `/models` lists.

It records what it received (`requests`) and when a streaming client went away
(`disconnects`), for tests to assert on. Run it alone with `python -m tests.fake_upstream`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import orjson

MODELS = [{"id": "qwen-plus", "object": "model", "created": 1700000000, "owned_by": "fake"}]


@dataclass
class Received:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    # The gateway's end of the connection: equal peers mean a pooled connection was reused.
    peer: tuple[str, int] | None = None


@dataclass
class Disconnect:
    request_id: str | None
    at: float
    chunks_sent: int


STREAM_USAGE = {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}
_NO_USAGE = object()


def sse_chunk(index: int, model: str = "m", usage: Any = _NO_USAGE) -> bytes:
    delta: dict[str, Any] = {
        "id": "chatcmpl-fake",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": model,
        "choices": [{"index": 0, "delta": {"content": f"tok{index} "}, "finish_reason": None}],
    }
    if usage is not _NO_USAGE:  # OpenAI's "usage":null, last, when include_usage is on
        delta["usage"] = usage
    return b"data: " + orjson.dumps(delta) + b"\n\n"


def usage_chunk(model: str = "m", usage: Any = None) -> bytes:
    body = {
        "id": "chatcmpl-fake",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": model,
        "choices": [],
        "usage": STREAM_USAGE if usage is None else usage,
    }
    return b"data: " + orjson.dumps(body) + b"\n\n"


def expected_stream(
    chunks: int, model: str = "m", usage: bool = False, reported: Any = None
) -> bytes:
    """The exact bytes the fake sends for a successful stream (`usage`: include_usage on)."""
    parts = [sse_chunk(i, model, None) if usage else sse_chunk(i, model) for i in range(chunks)]
    if usage:
        parts.append(usage_chunk(model, reported))
    parts.append(b"data: [DONE]\n\n")
    return b"".join(parts)


def asks_for_usage(payload: dict[str, Any]) -> bool:
    options = payload.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def scripted_usage(payload: dict[str, Any], body: bytes, default: Any) -> Any:
    script = payload.get("fake") or {}
    if script.get("usage_from_size"):
        prompt = -(-len(body) // 4)
        completion = int(payload.get("max_tokens") or 0)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }
    usage = script.get("usage", default)
    return default if usage is True else usage  # "usage": true: the usual usage


def completion_body(model: str) -> dict[str, Any]:
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "created": 1700000000,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello from the fake upstream."},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 5, "completion_tokens": 6, "total_tokens": 11},
    }


@dataclass
class FakeUpstream:
    host: str = "127.0.0.1"
    port: int = 0
    requests: list[Received] = field(default_factory=list)
    disconnects: list[Disconnect] = field(default_factory=list)
    # When each SSE chunk was written, by the gateway's X-Request-ID (time.monotonic()).
    chunk_times: dict[str, list[float]] = field(default_factory=dict)
    record: bool = True
    forced: dict[str, Any] = field(default_factory=dict)
    models: list[dict[str, Any]] = field(default_factory=lambda: list(MODELS))

    def __post_init__(self) -> None:
        self._ids = itertools.count(1)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    # --- running in a background thread (tests) -------------------------------------
    def start(self) -> FakeUpstream:
        ready = threading.Event()

        def run() -> None:
            self._loop = asyncio.new_event_loop()
            self._loop.run_until_complete(self._listen())
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name="fake-upstream", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("fake upstream did not start")
        return self

    def stop(self) -> None:
        if self._loop is None:
            return
        loop = self._loop

        async def shutdown() -> None:
            if self._server is not None:
                self._server.close()
            loop.stop()

        asyncio.run_coroutine_threadsafe(shutdown(), loop)
        if self._thread is not None:
            self._thread.join(10)

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(
            self._serve, self.host, self.port, backlog=4096, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]

    # --- HTTP/1.1 -------------------------------------------------------------------
    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while await self._one_request(reader, writer):
                pass
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    async def _one_request(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        method, target, _ = lines[0].split(" ", 2)
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        body = await reader.readexactly(length) if length else b""
        if self.record:
            peer = writer.get_extra_info("peername")
            self.requests.append(Received(method, target, headers, body, peer))
        keep_alive = headers.get("connection", "").lower() != "close"
        return await self._answer(method, target, headers, body, reader, writer) and keep_alive

    async def _answer(
        self,
        method: str,
        path: str,
        headers: dict[str, str],
        body: bytes,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> bool:
        payload: dict[str, Any] = {}
        if body:
            with contextlib.suppress(orjson.JSONDecodeError):
                loaded = orjson.loads(body)
                payload = loaded if isinstance(loaded, dict) else {}
        script: dict[str, Any] = {**(payload.get("fake") or {}), **self.forced}
        if script.get("sleep_before"):
            await asyncio.sleep(float(script["sleep_before"]))
        status = int(script.get("status", 200))
        route = path.split("?", 1)[0].removeprefix("/v1")
        if status >= 400:
            error = script.get("error_body") or {
                "error": {"message": "fake upstream error", "type": "upstream", "code": "fake"},
                "request_id": "fake-req-1",
            }
            await self._send_json(writer, status, error, script.get("headers"))
            return True
        if method == "GET" and route == "/models":
            await self._send_json(writer, 200, {"object": "list", "data": self.models})
            return True
        if method == "GET" and route.startswith("/models/"):
            model_id = route.removeprefix("/models/")
            await self._send_json(writer, 200, {**MODELS[0], "id": model_id})
            return True
        model = str(payload.get("model", "m"))
        if route == "/embeddings":
            size = int(script.get("embedding_size", 8))
            data = [{"object": "embedding", "index": 0, "embedding": [0.5] * size}]
            usage = {"prompt_tokens": 3, "total_tokens": 3}
            answer = {"object": "list", "data": data, "model": model, "usage": usage}
            await self._send_json(writer, 200, answer)
            return True
        if route in ("/chat/completions", "/completions") and method == "POST":
            if payload.get("stream") is True:
                return await self._send_stream(
                    writer, reader, headers, model, script, payload, body
                )
            answer = completion_body(model)
            answer["usage"] = scripted_usage(payload, body, answer["usage"])
            if script.get("no_usage"):
                del answer["usage"]
            await self._send_json(writer, 200, answer)
            return True
        await self._send_json(writer, 404, {"error": {"message": "no such route", "code": 404}})
        return True

    async def _send_json(
        self,
        writer: asyncio.StreamWriter,
        status: int,
        body: Any,
        headers: dict[str, str] | None = None,
    ) -> None:
        data = orjson.dumps(body)
        extra = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
        writer.write(
            f"HTTP/1.1 {status} {'OK' if status < 400 else 'Error'}\r\n"
            f"{extra}"
            "Content-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n"
            f"x-request-id: upstream-{next(self._ids)}\r\n"
            "Set-Cookie: provider_session=secret; Path=/\r\n"
            "x-ratelimit-remaining-requests: 999\r\n"
            "\r\n".encode()
            + data
        )
        await writer.drain()

    async def _send_stream(
        self,
        writer: asyncio.StreamWriter,
        reader: asyncio.StreamReader,
        headers: dict[str, str],
        model: str,
        script: dict[str, Any],
        payload: dict[str, Any],
        body: bytes,
    ) -> bool:
        chunked = script.get("framing", "chunked") == "chunked"
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream; charset=utf-8\r\n"
            b"Cache-Control: no-cache\r\n"
            + (b"Transfer-Encoding: chunked\r\n" if chunked else b"Connection: close\r\n")
            + f"x-request-id: upstream-{next(self._ids)}\r\n\r\n".encode()
        )
        count = int(script.get("chunks", 3))
        delay = float(script.get("delay", 0))
        die_after = script.get("die_after")
        close_after = script.get("close_after")
        usage = scripted_usage(payload, body, STREAM_USAGE)
        if script.get("usage_in_every_chunk"):
            parts = [sse_chunk(i, model, usage) for i in range(count)]
        elif asks_for_usage(payload):
            parts = [sse_chunk(i, model, None) for i in range(count)]
        else:
            parts = [sse_chunk(i, model) for i in range(count)]
        if asks_for_usage(payload):
            parts.append(usage_chunk(model, usage))
        parts.append(b"data: [DONE]\n\n")
        # The gateway sends nothing more on this connection until the answer is complete,
        # so end-of-file on the reader means it closed the connection: a disconnect.
        gone = asyncio.ensure_future(reader.read(1))
        try:
            for sent, part in enumerate(parts):
                if die_after is not None and sent >= int(die_after):
                    writer.transport.abort()
                    return False
                if close_after is not None and sent >= int(close_after):
                    # A FIN, not a reset: the bytes sent so far are sure to arrive.
                    writer.close()
                    return False
                if sent and delay:
                    await asyncio.wait({gone}, timeout=delay)
                if gone.done():
                    self._note_disconnect(headers, sent)
                    return False
                writer.write(b"%x\r\n%s\r\n" % (len(part), part) if chunked else part)
                await writer.drain()
                if self.record:
                    key = headers.get("x-request-id", "")
                    self.chunk_times.setdefault(key, []).append(time.monotonic())
            if chunked:
                writer.write(b"0\r\n\r\n")
                await writer.drain()
        except ConnectionError:
            self._note_disconnect(headers, 0)
            return False
        finally:
            if not gone.done():
                gone.cancel()
                # Wait for the cancellation, or the next request's read would collide with it.
                with contextlib.suppress(asyncio.CancelledError):
                    await gone
            elif not gone.cancelled():
                gone.exception()  # a reset by the gateway: seen, not "never retrieved"
        return chunked

    def _note_disconnect(self, headers: dict[str, str], sent: int) -> None:
        self.disconnects.append(Disconnect(headers.get("x-request-id"), time.monotonic(), sent))


def main() -> None:
    parser = argparse.ArgumentParser(description="Fake OpenAI-compatible upstream")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9100)
    args = parser.parse_args()
    upstream = FakeUpstream(args.host, args.port, record=False)

    async def serve() -> None:
        await upstream._listen()
        print(f"fake upstream on {upstream.url}", flush=True)
        await asyncio.Event().wait()

    asyncio.run(serve())


if __name__ == "__main__":
    main()
