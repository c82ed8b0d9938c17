"""Taking the gateway's own usage back out of an event stream.

When the gateway adds `stream_options.include_usage` to a stream the client did not ask
usage for, OpenAI-style providers send two things the client would not have received: a
last chunk with `"choices": []` and the `usage`, and a `"usage": null` member in every other
chunk. `UsageChunks` removes both, so the client gets exactly the bytes the provider would
have sent it, and records the usage. For a stream whose client asked for usage itself it
only reads the events (`remove=False`): each piece goes on at once, unchanged, and the
usage is recorded however the provider's pieces cut its chunk.

It works on whole SSE events: bytes up to the end of the current event are held (at most
one event, and at most `MAX_EVENT_BYTES` of it; a longer event is relayed as it comes). An
event it does not fully understand (several lines, not JSON, a `usage` that is neither null
nor the gateway's chunk) is relayed unchanged.
"""

from __future__ import annotations

import re

import msgspec

from gateway.record import RequestRecord

MAX_EVENT_BYTES = 64 * 1024
USAGE_TAIL_BYTES = 4096
# An empty line ends an event; lines end with CRLF, LF or CR.
_BOUNDARY = re.compile(rb"\r\n\r\n|\r\r\n|\n\r\n|\r\n\n|\n\n|\r\r")
_LONGEST_BOUNDARY = 4
_NULL_USAGE = re.compile(rb',\s*"usage"\s*:\s*null|"usage"\s*:\s*null\s*,?')
_TOP_LEVEL = msgspec.json.Decoder(dict[str, msgspec.Raw])
_LIST = msgspec.json.Decoder(list[msgspec.Raw])
# The text of a stream's deltas, for estimates when no usage comes: content, reasoning,
# tool-call arguments, and legacy completions' text.
_TEXT = re.compile(rb'"(?:content|reasoning_content|arguments|text)"\s*:\s*"((?:[^"\\]|\\.)*)"')


def text_bytes(chunk: bytes) -> int:
    """How many bytes of answer text `chunk` carries (JSON-escaped, as sent)."""
    return sum(len(text) for text in _TEXT.findall(chunk))


class UsageChunks:
    """Feed it the stream's pieces; it returns what the client should receive of them."""

    def __init__(self, record: RequestRecord, *, remove: bool = True) -> None:
        self._record = record
        self._remove = remove
        self._pending = b""  # the start of an event whose end has not arrived
        self._passing = False  # relaying an event longer than MAX_EVENT_BYTES as it comes
        self._tail = b""  # while passing: its last bytes, where a boundary may begin
        # While passing: the event's last USAGE_TAIL_BYTES. A Responses stream's
        # response.completed carries the whole answer, then its usage near the end.
        self._usage_tail = b""

    def feed(self, piece: bytes) -> bytes:
        relayed = self._events(piece)
        return relayed if self._remove else piece

    def _events(self, piece: bytes) -> bytes:
        relayed: list[bytes] = []
        if self._passing:
            head, piece = self._pass(piece)
            relayed.append(head)
            if self._passing:
                return head
        buffer = self._pending + piece
        start = 0
        # The held bytes hold no boundary: one can only end in the new piece.
        for found in _BOUNDARY.finditer(buffer, max(0, len(self._pending) - 3)):
            event = buffer[start : found.end()]
            relayed.append(self._event(event) if b'"usage"' in event else event)
            start = found.end()
        rest = buffer[start:]
        if len(rest) > MAX_EVENT_BYTES:
            relayed.append(rest)
            self._pending, self._passing, self._tail = b"", True, rest[-_LONGEST_BOUNDARY:]
            self._usage_tail = rest[-USAGE_TAIL_BYTES:]
        else:
            self._pending = rest
        return b"".join(relayed)

    def flush(self) -> bytes:
        """The end of the stream: an unterminated last event goes as it is."""
        rest, self._pending = self._pending, b""
        return rest if self._remove else b""  # when only reading, it went on as it came

    def _pass(self, piece: bytes) -> tuple[bytes, bytes]:
        """Relay `piece` up to the end of the long event; return it and what follows."""
        window = self._tail + piece
        found = _BOUNDARY.search(window)
        if found is None:
            self._tail = window[-_LONGEST_BOUNDARY:]
            self._usage_tail = (self._usage_tail + piece[-USAGE_TAIL_BYTES:])[-USAGE_TAIL_BYTES:]
            return piece, b""
        end = found.end() - len(self._tail)
        last = (self._usage_tail + piece[: max(0, end)])[-USAGE_TAIL_BYTES:]
        if b'"usage"' in last:
            self._record.note_usage(last)
        self._passing, self._tail, self._usage_tail = False, b"", b""
        return piece[:end], piece[end:]

    def _event(self, event: bytes) -> bytes:
        line = _data_line(event)
        if line is None:  # relayed unchanged, but a usage in it is still the answer's cost
            self._record.note_usage(event)
            return event
        prefix, payload, ending = line
        try:
            fields = _TOP_LEVEL.decode(payload)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return event
        usage = fields.get("usage")
        if usage is None:
            return event
        if bytes(usage) == b"null":
            if not self._remove:
                return event
            stripped = _without_null_usage(payload, fields)
            return event if stripped is None else prefix + stripped + ending
        self._record.note_usage(payload)
        return b"" if self._remove and _no_choices(fields) else event


def _data_line(event: bytes) -> tuple[bytes, bytes, bytes] | None:
    """`data: <payload><line ends>` split in three, if the event is that one line."""
    line = event.rstrip(b"\r\n")
    if b"\n" in line or b"\r" in line or not line.startswith(b"data:"):
        return None
    prefix = b"data: " if line.startswith(b"data: ") else b"data:"
    return prefix, line[len(prefix) :], event[len(line) :]


def _without_null_usage(payload: bytes, fields: dict[str, msgspec.Raw]) -> bytes | None:
    """`payload` without its top-level `"usage": null` member, byte for byte otherwise."""
    expected = [(k, bytes(v)) for k, v in fields.items() if k != "usage"]
    for found in reversed(list(_NULL_USAGE.finditer(payload))):
        candidate = payload[: found.start()] + payload[found.end() :]
        try:
            left = _TOP_LEVEL.decode(candidate)
        except (msgspec.DecodeError, msgspec.ValidationError):
            continue
        # A nested "usage": null removed instead would leave the top-level one in place.
        if [(k, bytes(v)) for k, v in left.items()] == expected:
            return candidate
    return None


def _no_choices(fields: dict[str, msgspec.Raw]) -> bool:
    choices = fields.get("choices")
    if choices is None:
        return False
    try:
        return _LIST.decode(choices) == []
    except (msgspec.DecodeError, msgspec.ValidationError):
        return False


class EventTooLargeError(Exception):
    """One event of a stream to translate is longer than MAX_TRANSLATED_EVENT_BYTES."""


# An event is translated whole, so it is held whole: a provider's 1 MB tool call fits, a
# stream that never ends its event is cut here rather than at MAX_RESPONSE_BODY_BYTES.
MAX_TRANSLATED_EVENT_BYTES = 16 * 1024 * 1024


class SseData:
    """Splits an event stream into its events' `data` payloads, whatever the pieces' cuts.

    Fed the provider's pieces; returns the payloads of the events each one completes (the
    `data:` lines of an event joined with "\\n", as the SSE spec says). Comments, `event:`,
    `id:` and `retry:` lines are not needed by a translator and are left out. What is held
    is at most one event, kept as a list of pieces (no copy per piece however long it is)
    and at most MAX_TRANSLATED_EVENT_BYTES.
    """

    def __init__(self) -> None:
        self._held: list[bytes] = []
        self._size = 0

    def feed(self, piece: bytes) -> list[bytes]:
        if self._held:
            # The held bytes hold no boundary: one can only end in the new piece.
            if _BOUNDARY.search(self._held[-1][-3:] + piece) is None:
                self._hold(piece)
                return []
            buffer, search_from = b"".join([*self._held, piece]), max(0, self._size - 3)
            self._held, self._size = [], 0
        else:
            buffer, search_from = piece, 0
        payloads: list[bytes] = []
        start = 0
        for found in _BOUNDARY.finditer(buffer, search_from):
            data = _payload(buffer[start : found.start()])
            if data is not None:
                payloads.append(data)
            start = found.end()
        if start < len(buffer):
            self._hold(buffer[start:])
        return payloads

    def flush(self) -> list[bytes]:
        """The end of the stream: an unterminated last event still counts."""
        rest = b"".join(self._held)
        self._held, self._size = [], 0
        data = _payload(rest)
        return [data] if data is not None else []

    def _hold(self, part: bytes) -> None:
        self._held.append(part)
        self._size += len(part)
        if self._size > MAX_TRANSLATED_EVENT_BYTES:
            self._held, self._size = [], 0
            raise EventTooLargeError(f"an event of more than {MAX_TRANSLATED_EVENT_BYTES} bytes")


def _payload(event: bytes) -> bytes | None:
    if event.startswith(b"data:") and b"\n" not in event and b"\r" not in event:
        return event[5:].lstrip(b" ")  # the common case: one line
    lines = [
        line[5:].removeprefix(b" ") for line in event.splitlines() if line.startswith(b"data:")
    ]
    return b"\n".join(lines) if lines else None
