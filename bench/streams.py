"""SSE load: many keep-alive connections, each running streams back to back.

A small asyncio Protocol per connection decodes HTTP/1.1 (chunked, Content-Length or
close-delimited), times each stream to its first body byte and to its end, and compares the
decoded body with the bytes the upstream sent (or, for a translated stream whose ids differ
on every call, asks a check function). Bounded by a deadline, a per-connection stream count
and a per-stream timeout.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

_HEAD_END = b"\r\n\r\n"
# What a stream's body must be: the exact bytes, or a check of the decoded body.
Expected = bytes | Callable[[bytes], bool]


@dataclass(frozen=True)
class StreamOutcome:
    ttfb: float  # math.inf: no body byte arrived
    total: float
    error: str | None
    events: int  # SSE events received, complete or not


@dataclass
class StreamStats:
    # Completed streams only.
    ttfb: list[float] = field(default_factory=list)
    total: list[float] = field(default_factory=list)
    # Every stream tried, failed ones too (inf if no byte came): no survivor bias when
    # most queued streams time out.
    ttfb_all: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    # SSE events received in all streams: the work a relay did, failed streams included.
    events: int = 0
    # The same, counted as bytes arrive: another thread may read it mid-run (bench.plateau).
    events_so_far: int = 0
    first_bytes_so_far: int = 0
    seconds: float = 0.0

    @property
    def completed(self) -> int:
        return len(self.total)

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    def add(self, outcome: StreamOutcome) -> None:
        self.ttfb_all.append(outcome.ttfb)
        self.events += outcome.events
        if outcome.error is None:
            self.ttfb.append(outcome.ttfb)
            self.total.append(outcome.total)
        else:
            self.errors[outcome.error] += 1


class _StreamConnection(asyncio.Protocol):
    """One connection; `send()` starts a stream and returns a future for its outcome."""

    def __init__(self, request: bytes, expected: Expected, stats: StreamStats) -> None:
        self.request = request
        self.expected = expected
        self.stats = stats
        self.transport: asyncio.Transport | None = None
        self.closed = asyncio.get_running_loop().create_future()
        self.waiter: asyncio.Future[StreamOutcome] | None = None
        self._steps = {
            "size": self._chunk_size,
            "data": self._chunk_data,
            "trailer": self._trailer,
            "length": self._sized_body,
            "close-delimited": self._until_close,
        }
        self._reset()

    def _reset(self) -> None:
        self.buffer = bytearray()
        self.body = bytearray()
        self.state = "head"
        self.status = 0
        self.remaining = 0
        self.sent_at = 0.0
        self.first_byte_at = 0.0
        self.received_at = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.state == "close-delimited":
            self._finish()
        else:
            self._finish("connection closed mid-stream" if self.state != "head" else "reset")
        if not self.closed.done():
            self.closed.set_result(None)

    def send(self) -> asyncio.Future[StreamOutcome]:
        assert self.transport is not None
        self._reset()
        self.waiter = asyncio.get_running_loop().create_future()
        self.sent_at = time.perf_counter()
        self.transport.write(self.request)
        return self.waiter

    def data_received(self, data: bytes) -> None:
        self.received_at = time.perf_counter()
        self.stats.events_so_far += data.count(b"\n\n")
        self.buffer += data
        try:
            self._decode()
        except ValueError:
            self._finish("bad framing")
            if self.transport is not None:
                self.transport.close()

    def _decode(self) -> None:
        if self.state == "head" and not self._head():
            return
        # Each step decodes what it can and says whether another step may follow.
        while self.state != "done" and self._steps[self.state]():
            pass

    def _head(self) -> bool:
        end = self.buffer.find(_HEAD_END)
        if end < 0:
            return False
        head = bytes(self.buffer[:end]).lower()
        del self.buffer[: end + 4]
        self.status = int(head[9:12])
        if b"\r\ntransfer-encoding: chunked" in head:
            self.state = "size"
        elif (at := head.find(b"\r\ncontent-length:")) >= 0:
            line_end = head.find(b"\r\n", at + 2)
            self.remaining = int(head[at + 17 : line_end if line_end >= 0 else None])
            self.state = "length"
        else:
            self.state = "close-delimited"
        return True

    def _chunk_size(self) -> bool:
        end = self.buffer.find(b"\r\n")
        if end < 0:
            return False
        self.remaining = int(bytes(self.buffer[:end]).split(b";")[0], 16)
        del self.buffer[: end + 2]
        self.state = "data" if self.remaining else "trailer"
        return True

    def _chunk_data(self) -> bool:
        if len(self.buffer) < self.remaining + 2:
            return False
        self._append(self.buffer[: self.remaining])
        del self.buffer[: self.remaining + 2]
        self.state = "size"
        return True

    def _trailer(self) -> bool:
        # No trailers expected: the stream ends with the CRLF after the last chunk.
        if not self.buffer.startswith(b"\r\n"):
            return False
        del self.buffer[:2]
        self._finish()
        return False

    def _sized_body(self) -> bool:
        take = min(self.remaining, len(self.buffer))
        self._append(self.buffer[:take])
        del self.buffer[:take]
        self.remaining -= take
        if not self.remaining:
            self._finish()
        return False

    def _until_close(self) -> bool:
        self._append(bytes(self.buffer))
        self.buffer.clear()
        return False

    def _append(self, data: bytes | bytearray) -> None:
        if data and not self.first_byte_at:
            self.first_byte_at = self.received_at
            self.stats.first_bytes_so_far += 1
        self.body += data

    def _finish(self, error: str | None = None) -> None:
        waiter, self.waiter = self.waiter, None
        if waiter is None or waiter.done():
            return
        done_at = time.perf_counter()
        if error is None and self.status != 200:
            error = f"status {self.status}"
        if error is None and not self._body_ok():
            error = "body differs from the upstream's"
        self.state = "done"
        waiter.set_result(self.outcome(done_at, error))

    def _body_ok(self) -> bool:
        if isinstance(self.expected, bytes):
            return self.body == self.expected
        return self.expected(bytes(self.body))

    def outcome(self, done_at: float, error: str | None) -> StreamOutcome:
        ttfb = self.first_byte_at - self.sent_at if self.first_byte_at else math.inf
        events = self.body.count(b"\n\n")
        return StreamOutcome(ttfb, done_at - self.sent_at, error, events)


async def run_streams(
    port: int,
    *,
    request: bytes,
    expected: Expected,
    concurrency: int,
    seconds: float,
    per_connection: int = 1000,
    stream_timeout: float = 60.0,
    ramp: float = 0.0,
    stats: StreamStats | None = None,
) -> StreamStats:
    """`concurrency` connections to 127.0.0.1:`port`, each streaming until the deadline.

    With `ramp`, connection i opens i * ramp / concurrency seconds after the first, so that
    thousands of clients arrive spread over that window rather than in one SYN burst.
    """
    loop = asyncio.get_running_loop()
    stats = StreamStats() if stats is None else stats
    deadline = loop.time() + seconds

    async def one_connection(index: int) -> None:
        connection: _StreamConnection | None = None
        if ramp:
            await asyncio.sleep(index * ramp / concurrency)
        try:
            for _ in range(per_connection):
                if loop.time() >= deadline:
                    return
                if connection is None or connection.transport is None:
                    connection = None  # a timeout while connecting is a connect timeout
                    _, connection = await asyncio.wait_for(
                        loop.create_connection(
                            lambda: _StreamConnection(request, expected, stats), "127.0.0.1", port
                        ),
                        stream_timeout,
                    )
                stats.add(await asyncio.wait_for(connection.send(), stream_timeout))
        except TimeoutError:
            if connection is None:
                stats.errors["connect timeout"] += 1
            else:
                stats.add(connection.outcome(time.perf_counter(), _timeout_kind(connection)))
        except OSError as exc:
            stats.errors[type(exc).__name__] += 1
        finally:
            if connection is not None and connection.transport is not None:
                connection.transport.close()

    started = time.perf_counter()
    await asyncio.gather(*(one_connection(i) for i in range(concurrency)))
    stats.seconds = time.perf_counter() - started
    return stats


def _timeout_kind(connection: _StreamConnection) -> str:
    """A queued stream (no byte yet) and a stalled one are different failures."""
    if connection.first_byte_at:
        return "timeout mid-stream"
    return "timeout before first byte"


def stream_request(
    port: int, key: str, body: bytes, path: bytes = b"/v1/chat/completions", extra: bytes = b""
) -> bytes:
    """One POST; `extra` is more header lines, each ending in CRLF."""
    return (
        b"POST %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
        b"Authorization: Bearer %s\r\nContent-Type: application/json\r\n%s"
        b"Accept: text/event-stream\r\nContent-Length: %d\r\n\r\n%s"
    ) % (path, port, key.encode(), extra, len(body), body)
