"""The provider's answer body on its way to the client: as it arrives, bounded, masked.

(Event streams, relayed or translated, are in `streams.py`; the rest of an answer is here.)

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

import requests
import urllib3

from gateway.disconnects import CLIENT_GONE
from gateway.errors import GatewayError
from gateway.record import RequestRecord
from gateway.upstream.connection import Exchange
from gateway.upstream.scrub import Scrubber

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


class AnswerRelay:
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


class BodyRelay(AnswerRelay):
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
