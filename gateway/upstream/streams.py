"""Event streams on their way to the client: relayed as they come (`SseRelay`, the
gateway's usage chunk taken back out) or translated into the client's dialect event by
event (`TranslatedSseRelay`); and, when the client leaves once the answer is whole, read on
briefly for the usage the provider bills.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Callable, Iterator

import orjson

from gateway.disconnects import CLIENT_GONE
from gateway.errors import error_body
from gateway.record import RequestRecord
from gateway.upstream.bodies import (
    READ_ERRORS,
    AnswerRelay,
    AnswerTooLargeError,
    Fail,
)
from gateway.upstream.connection import Exchange
from gateway.upstream.dialect import StreamTranslator
from gateway.upstream.scrub import Scrubber
from gateway.upstream.sse import EventTooLargeError, SseData, UsageChunks, text_bytes

# A translated stream is relayed as it comes, but its translator keeps the answer for the
# final event (response.completed holds it whole): bounded below the relay limit.
MAX_TRANSLATED_STREAM_BYTES = 32 * 1024 * 1024
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


class _EventRelay(AnswerRelay):
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

    def _arrived(self, piece: bytes) -> None:
        """What every relayed piece tells the record: the first byte's time, the answer's
        text (for an estimate), and whether the answer's end has come."""
        record = self._record
        if record.ttfb is None:
            record.ttfb = record.elapsed()
        record.completion_bytes += text_bytes(piece)
        if not self._answered:
            self._note_answer_end(piece)

    def _note_answer_end(self, piece: bytes) -> None:
        if _ANSWER_END.search(piece) or _ANSWER_END.search(
            self._end_tail + piece[:_ANSWER_END_BYTES]
        ):
            self._answered = True
            self._record.answer_complete = True
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
        ours = self._usage
        try:
            for piece in self._chunks:
                self._arrived(piece)
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
        translator, scrubber = self._translator, self._scrubber
        events, out_mask = self._events, self._out_mask
        size = 0
        try:
            for piece in self._chunks:
                self._arrived(piece)
                size += len(piece)
                if size > MAX_TRANSLATED_STREAM_BYTES:  # what the translator keeps grows too
                    raise AnswerTooLargeError(f"more than {MAX_TRANSLATED_STREAM_BYTES} bytes")
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
