"""The provider's answer body on its way to the client: as it arrives, bounded, masked.

Nothing here holds more than one piece (64 KiB) of a body that is being streamed, whatever
the provider sends: a 500 MB answer, a 300 MB SSE event, or 1 MB of gzip that inflates to
1 GB (urllib3 decodes at most one piece at a time). Past MAX_RESPONSE_BODY_BYTES the
answer is cut off.
"""

from __future__ import annotations

import contextlib
import itertools
import socket
import struct
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import orjson
import requests
import urllib3

from gateway.disconnects import CLIENT_GONE
from gateway.errors import GatewayError, error_body
from gateway.record import RequestRecord
from gateway.upstream.connection import Exchange
from gateway.upstream.dialect import StreamTranslator
from gateway.upstream.scrub import Scrubber
from gateway.upstream.sse import EventTooLargeError, SseData, UsageChunks, text_bytes

PIECE_BYTES = 64 * 1024
# An answer this short is read whole before the client gets its status line, so that a
# failure while reading it is still a clean 502/504; a longer one is relayed as it comes.
HEAD_BYTES = 256 * 1024
# Where a JSON answer's "usage" is looked for: it is the last field OpenAI-style APIs send.
_TAIL_BYTES = 4096
# What a read of the provider's body can raise (requests wraps urllib3's for iter_content).
READ_ERRORS = (requests.RequestException, urllib3.exceptions.HTTPError)


@dataclass(frozen=True)
class Client:
    """The caller's end of the exchange, as gunicorn hands it to the app."""

    socket: socket.socket | None = None
    # An HTTP/1.0 answer of unknown length ends when the connection closes.
    http10: bool = False

    @classmethod
    def of(cls, environ: Mapping[str, Any]) -> Client:
        return cls(environ.get("gunicorn.socket"), environ.get("SERVER_PROTOCOL") == "HTTP/1.0")

    def cut(self) -> None:
        """End the connection so that the answer sent so far reads as incomplete.

        A reset (SO_LINGER 0) when gunicorn closes it, never a clean end: for HTTP/1.0 a FIN
        would look like a complete close-delimited body. For HTTP/1.1 shutting down at once
        also keeps gunicorn from writing the terminating chunk.
        """
        if self.socket is None:
            return
        with contextlib.suppress(OSError):
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
            if not self.http10:
                socket.socket.shutdown(self.socket, socket.SHUT_RDWR)


_RESET = struct.pack("ii", 1, 0)


class AnswerTooLargeError(Exception):
    """The provider's answer is longer than MAX_RESPONSE_BODY_BYTES."""


Fail = Callable[[Exception], GatewayError]


def pieces(upstream: requests.Response, limit: int) -> Iterator[bytes]:
    """The decoded body as the provider sends it, never waiting to fill a buffer.

    For chunked transfer (what providers use for SSE) that is one HTTP chunk at a time
    (a huge one in 64 KiB parts). A body framed by Content-Length or by closing the
    connection would make `iter_content` wait for a full buffer, so it is read with `read1`.
    """
    raw = upstream.raw
    chunks = (
        upstream.iter_content(PIECE_BYTES)
        if raw.chunked
        else iter(lambda: raw.read1(PIECE_BYTES, decode_content=True) or b"", b"")
    )
    size = 0
    for chunk in chunks:
        size += len(chunk)
        if size > limit:
            raise AnswerTooLargeError(f"more than {limit} bytes")
        yield chunk
    # Read to its end: requests may now hand the connection back instead of closing it.
    upstream._content_consumed = True


class _AnswerRelay:
    """A body relayed after the view returned: an object rather than a bare generator so
    that `close()` (called by the WSGI server when the client goes away, even before the
    first byte) always ends the exchange, and the provider stops generating at once."""

    def __init__(
        self,
        exchange: Exchange,
        record: RequestRecord,
        scrubber: Scrubber,
        fail: Fail,
        ended: Callable[[], None],
    ) -> None:
        self._exchange = exchange
        self._record = record
        self._scrubber = scrubber
        self._fail = fail
        self._ended = ended  # told when the provider's whole answer has been relayed
        self._finished = False

    def close(self) -> None:
        self._exchange.release()
        if not self._finished:
            self._record.client_disconnected = True


class SseRelay(_AnswerRelay):
    """An event stream's body: each chunk relayed as it arrives."""

    def __init__(
        self,
        exchange: Exchange,
        chunks: Iterator[bytes],
        record: RequestRecord,
        scrubber: Scrubber,
        fail: Fail,
        *,
        ended: Callable[[], None],
        error_event: Callable[[int, str], bytes] | None = None,
    ) -> None:
        super().__init__(exchange, record, scrubber, fail, ended)
        self._chunks = chunks
        self._error_event = error_event or _chat_error_event

    def __iter__(self) -> Iterator[bytes]:
        record = self._record
        # The gateway asked for usage: its usage chunk (and "usage": null) are taken out.
        # Otherwise the events are only read: a usage chunk the provider's pieces cut in
        # two is still counted whole.
        ours = UsageChunks(record, remove=record.inject_usage)
        try:
            for piece in self._chunks:
                if record.ttfb is None:
                    record.ttfb = record.elapsed()
                record.completion_bytes += text_bytes(piece)
                chunk = ours.feed(piece)
                if masked := self._scrubber.feed(chunk):
                    yield masked
        except (*READ_ERRORS, AnswerTooLargeError) as exc:
            if self._exchange.ended_by == CLIENT_GONE:  # nobody is listening any more
                return
            error = self._fail(exc)
            yield self._held(ours) + self._error_event(error.status, error.message)
            self._finished = True
            return
        # A close-delimited stream ends "normally" when the watcher's shutdown ends its read.
        if self._exchange.ended_by == CLIENT_GONE:
            return
        if held := self._held(ours):
            yield held
        self._ended()
        self._finished = True

    def _held(self, ours: UsageChunks) -> bytes:
        rest = ours.flush()
        return self._scrubber.feed(rest) + self._scrubber.flush()


def _chat_error_event(status: int, message: str) -> bytes:
    return b"data: " + orjson.dumps(error_body(status, message)) + b"\n\n"


class TranslatedSseRelay(_AnswerRelay):
    """An event stream translated into the client's dialect, event by event as it arrives.

    The provider's bytes are masked first, then split into events for the translator; what
    it returns goes to the client at once. A failure after the first byte becomes the
    dialect's own error event, never a silently cut stream.
    """

    def __init__(
        self,
        exchange: Exchange,
        chunks: Iterator[bytes],
        record: RequestRecord,
        scrubber: Scrubber,
        fail: Fail,
        *,
        translator: StreamTranslator,
        ended: Callable[[], None],
    ) -> None:
        super().__init__(exchange, record, scrubber, fail, ended)
        self._chunks = chunks
        self._translator = translator

    def __iter__(self) -> Iterator[bytes]:
        record, translator, scrubber = self._record, self._translator, self._scrubber
        events = SseData()
        try:
            for piece in self._chunks:
                if record.ttfb is None:
                    record.ttfb = record.elapsed()
                record.completion_bytes += text_bytes(piece)
                payloads = events.feed(scrubber.feed(piece))
                if out := b"".join([translator.feed(data) for data in payloads]):
                    yield out
        except (*READ_ERRORS, AnswerTooLargeError, EventTooLargeError) as exc:
            if self._exchange.ended_by == CLIENT_GONE:
                return
            error = self._fail(exc)
            self._finished = True
            yield self._rest(events) + translator.fail(error.status, error.message)
            return
        if self._exchange.ended_by == CLIENT_GONE:
            return
        tail = self._rest(events) + translator.finish()
        self._finished = True
        self._ended()
        if tail:
            yield tail

    def _rest(self, events: SseData) -> bytes:
        held = events.feed(self._scrubber.flush()) + events.flush()
        return b"".join([self._translator.feed(data) for data in held])

    def close(self) -> None:
        # The usage the provider reported, even if the client left after it came.
        if (usage := self._translator.usage) and not self._record.usage:
            self._record.set_usage(usage)
        super().close()


class BodyRelay(_AnswerRelay):
    """A body too long to read before answering: the head already read, then the rest.

    Its status line is gone by the time the rest can fail, so a failure (the provider
    breaks off, the answer passes MAX_RESPONSE_BODY_BYTES, the deadline) cuts the client's
    connection: the client sees an incomplete answer, never a complete-looking truncated one.
    """

    def __init__(
        self,
        exchange: Exchange,
        head: list[bytes],
        rest: Iterator[bytes],
        *,
        record: RequestRecord,
        scrubber: Scrubber,
        fail: Fail,
        ended: Callable[[], None],
        client: Client,
        count_usage: bool,
    ) -> None:
        super().__init__(exchange, record, scrubber, fail, ended)
        self._pieces = itertools.chain(head, rest)
        self._client = client
        self._count_usage = count_usage

    def __iter__(self) -> Iterator[bytes]:
        tail = b""
        try:
            for piece in self._pieces:
                if masked := self._scrubber.feed(piece):
                    tail = (tail + masked[-_TAIL_BYTES:])[-_TAIL_BYTES:]
                    yield masked
        except (*READ_ERRORS, AnswerTooLargeError) as exc:
            self._cut(exc)
            return
        if self._exchange.ended_by is not None:  # a close-delimited body, cut by the watcher
            self._cut(None)
            return
        if held := self._scrubber.flush():
            tail = (tail + held)[-_TAIL_BYTES:]
            yield held
        if self._count_usage:
            self._record.note_usage(tail)
        self._ended()
        self._finished = True

    def _cut(self, exc: Exception | None) -> None:
        if self._exchange.ended_by != CLIENT_GONE:
            self._fail(exc or ConnectionError("cut off"))  # logged and counted
            self._finished = True  # the provider's failure, not the client's leaving
        self._client.cut()
