"""The provider's answer body on its way to the client: as it arrives, bounded, masked.

Nothing here holds more than one piece (64 KiB) of a body that is being streamed, whatever
the provider sends: a 500 MB answer, a 300 MB SSE event, or 1 MB of gzip that inflates to
1 GB (urllib3 decodes at most one piece at a time). Past MAX_RESPONSE_BODY_BYTES the
answer is cut off.
"""

from __future__ import annotations

import contextlib
import itertools
import re
import socket
import struct
import time
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
# A translated stream is relayed as it comes, but its translator keeps the answer for the
# final event (response.completed holds it whole): bounded below the relay limit.
MAX_TRANSLATED_STREAM_BYTES = 32 * 1024 * 1024
# An answer this short is read whole before the client gets its status line, so that a
# failure while reading it is still a clean 502/504; a longer one is relayed as it comes.
HEAD_BYTES = 256 * 1024
# Where a JSON answer's "usage" is looked for: it is the last field OpenAI-style APIs send.
_TAIL_BYTES = 4096
# What a read of the provider's body can raise (requests wraps urllib3's for iter_content).
READ_ERRORS = (requests.RequestException, urllib3.exceptions.HTTPError)
# A stream whose client leaves after the whole answer came is read on, this long and this
# much at most, for the usage the provider bills: its work is done, so cutting it saves
# nothing, and without the usage only an estimate would be charged.
READ_ON_SECONDS = 5.0
READ_ON_BYTES = 256 * 1024
# The end of the answer in a provider's stream: a chat choice's finish_reason (not null),
# Messages' message_delta or message_stop, Responses' completed or incomplete response.
# Quotes inside the answer's text are escaped, so its text cannot fake one.
_ANSWER_END = re.compile(
    rb'"finish_reason"\s*:\s*"'
    rb'|"type"\s*:\s*"(?:message_delta|message_stop|response\.completed|response\.incomplete)"'
)
_ANSWER_END_BYTES = 64  # the tail kept for a mark cut in two (longer than one unpadded)


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


class _EventRelay(_AnswerRelay):
    """An event stream: once its answer has ended, a client leaving does not cut it (see
    Exchange.answered); `close()` reads on for the provider's usage, bounded."""

    def __init__(
        self,
        exchange: Exchange,
        chunks: Iterator[bytes],
        record: RequestRecord,
        scrubber: Scrubber,
        fail: Fail,
        *,
        ended: Callable[[], None],
        read_on_seconds: float,
    ) -> None:
        super().__init__(exchange, record, scrubber, fail, ended)
        self._chunks = chunks
        self._read_on_seconds = read_on_seconds
        self._answered = False
        self._end_tail = b""

    def _note_answer_end(self, piece: bytes) -> None:
        if _ANSWER_END.search(piece) or _ANSWER_END.search(
            self._end_tail + piece[:_ANSWER_END_BYTES]
        ):
            self._answered = True
            self._exchange.answered(self._read_on_seconds)
        else:
            self._end_tail = (self._end_tail + piece[-_ANSWER_END_BYTES:])[-_ANSWER_END_BYTES:]

    def close(self) -> None:
        if self._answered and not self._finished and not self._exchange.cut:
            self._read_on()
        super().close()

    def _read_on(self) -> None:
        """The client left after the answer: read the provider's usage, on this thread,
        for READ_ON_SECONDS and READ_ON_BYTES at most (each read bounded by the time left)."""
        until = time.monotonic() + self._read_on_seconds
        size = 0
        with contextlib.suppress(*READ_ERRORS, AnswerTooLargeError, EventTooLargeError):
            while not self._has_usage() and size < READ_ON_BYTES:
                left = until - time.monotonic()
                if left <= 0:
                    return
                self._exchange.limit_reads(left)
                piece = next(self._chunks, None)
                if piece is None:
                    return
                size += len(piece)
                self._record.completion_bytes += text_bytes(piece)
                self._read(piece)

    def _has_usage(self) -> bool:
        usage = self._record.usage
        return usage is not None and "completion_tokens" in usage

    def _read(self, piece: bytes) -> None:
        raise NotImplementedError


class SseRelay(_EventRelay):
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
        read_on_seconds: float = READ_ON_SECONDS,
    ) -> None:
        super().__init__(
            exchange,
            chunks,
            record,
            scrubber,
            fail,
            ended=ended,
            read_on_seconds=read_on_seconds,
        )
        self._error_event = error_event or _chat_error_event
        # The gateway asked for usage: its usage chunk (and "usage": null) are taken out.
        # Otherwise the events are only read: a usage chunk the provider's pieces cut in
        # two is still counted whole.
        self._usage = UsageChunks(record, remove=record.inject_usage)

    def __iter__(self) -> Iterator[bytes]:
        record, ours = self._record, self._usage
        try:
            for piece in self._chunks:
                if record.ttfb is None:
                    record.ttfb = record.elapsed()
                record.completion_bytes += text_bytes(piece)
                if not self._answered:
                    self._note_answer_end(piece)
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

    def _read(self, piece: bytes) -> None:
        self._usage.feed(piece)  # records the usage; nobody is left to send it to


def _chat_error_event(status: int, message: str) -> bytes:
    return b"data: " + orjson.dumps(error_body(status, message)) + b"\n\n"


class TranslatedSseRelay(_EventRelay):
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
        read_on_seconds: float = READ_ON_SECONDS,
    ) -> None:
        super().__init__(
            exchange,
            chunks,
            record,
            scrubber,
            fail,
            ended=ended,
            read_on_seconds=read_on_seconds,
        )
        self._translator = translator
        self._events = SseData()
        self._out_mask = Scrubber(scrubber.mask)

    def __iter__(self) -> Iterator[bytes]:
        record, translator, scrubber = self._record, self._translator, self._scrubber
        events, out_mask = self._events, self._out_mask
        size = 0
        try:
            for piece in self._chunks:
                if record.ttfb is None:
                    record.ttfb = record.elapsed()
                record.completion_bytes += text_bytes(piece)
                size += len(piece)
                if size > MAX_TRANSLATED_STREAM_BYTES:  # what the translator keeps grows too
                    raise AnswerTooLargeError(f"more than {MAX_TRANSLATED_STREAM_BYTES} bytes")
                if not self._answered:
                    self._note_answer_end(piece)
                payloads = events.feed(scrubber.feed(piece))
                if out := b"".join([translator.feed(data) for data in payloads]):
                    # Masked again: a translator decodes what the provider escaped (a key
                    # sent as "\\u0073k-..." would be plain once translated).
                    yield out_mask.feed(out)
                if translator.failed:  # the provider said it failed (an error chunk)
                    break
        except (*READ_ERRORS, AnswerTooLargeError, EventTooLargeError) as exc:
            if self._exchange.ended_by == CLIENT_GONE:
                return
            error = self._fail(exc)
            self._finished = True
            tail = self._rest(events) + translator.fail(error.status, error.message)
            yield out_mask.feed(tail) + out_mask.flush()
            return
        if self._exchange.ended_by == CLIENT_GONE:
            return
        tail = b"" if translator.failed else self._rest(events) + translator.finish()
        self._finished = True
        if translator.failed:
            # An error chunk, or a stream that ended before its answer did: the
            # provider's failure, as if it had broken off (counted, cooled, logged).
            self._fail(ConnectionError("the provider's stream failed"))
            self._exchange.release()
        else:
            self._ended()
        if tail := out_mask.feed(tail) + out_mask.flush():
            yield tail

    def _rest(self, events: SseData) -> bytes:
        held = events.feed(self._scrubber.flush()) + events.flush()
        return b"".join([self._translator.feed(data) for data in held])

    def _read(self, piece: bytes) -> None:
        for data in self._events.feed(self._scrubber.feed(piece)):
            self._translator.feed(data)  # for its usage; nobody is left to send it to

    def _has_usage(self) -> bool:
        return self._translator.usage is not None

    def close(self) -> None:
        super().close()
        # The usage the provider reported, even if the client left after it came (or it
        # came while reading on).
        if (usage := self._translator.usage) and not self._record.usage:
            self._record.set_usage(usage)


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
