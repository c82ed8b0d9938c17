"""Taking the gateway's own usage back out of an event stream.

When the gateway adds `stream_options.include_usage` to a stream the client did not ask
usage for, OpenAI-style providers send what the client would not have received: a last
chunk with the `usage` and `"choices": []` (LiteLLM: `[{"index":0,"delta":{}}]`), or the
`usage` on the chunk with the `finish_reason`, and a `"usage": null` member in every other
chunk. `UsageChunks` removes exactly those (the whole usage chunk, else only the member),
so the client gets the bytes the provider would have sent it, and records the usage. For a
stream whose client asked for usage itself it only reads the events (`remove=False`): each
piece goes on at once, unchanged, and the usage is recorded however the provider's pieces
cut its chunk.

It works on whole SSE events, whatever their other fields (`id:`, `event:`, comments), line
endings, or number of `data:` lines: bytes up to the end of the current event are held (at
most one event, and at most `MAX_EVENT_BYTES` of it; a longer event is relayed as it
comes). An event it does not fully understand (not JSON, a `usage` that is neither null
nor an object) is relayed unchanged.
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
_TOP_LEVEL = msgspec.json.Decoder(dict[str, msgspec.Raw])
_CHOICES = msgspec.json.Decoder(list[dict[str, msgspec.Raw]])
# A value that says nothing: what a usage chunk's choice holds.
_EMPTY = frozenset({b"null", b"{}", b"[]", b'""'})
# The text of a stream's deltas, for estimates when no usage comes: content, reasoning,
# tool-call arguments, and legacy completions' text.
_TEXT = re.compile(rb'"(?:content|reasoning_content|arguments|text)"\s*:\s*"((?:[^"\\]|\\.)*)"')


def text_bytes(chunk: bytes) -> int:
    """How many bytes of answer text `chunk` carries (JSON-escaped, as sent)."""
    return sum(map(len, _TEXT.findall(chunk)))


def _one_event(piece: bytes) -> bool:
    """Whether `piece` is exactly one event ending in a blank line (LF only, as most send)."""
    end = len(piece) - 2
    return end > 0 and piece.find(b"\n\n") == end and b"\r" not in piece


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
        # The provider reported usage on a chunk before its finish: usage it sends unasked.
        self._reports_unasked = False

    def feed(self, piece: bytes) -> bytes:
        relayed = self._events(piece)
        return relayed if self._remove else piece

    def _events(self, piece: bytes) -> bytes:
        if not self._pending and not self._passing and _one_event(piece):
            return self._event(piece)  # the usual piece: one whole event, nothing held
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
            relayed.append(self._event(buffer[start : found.end()]))
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
        """The end of the stream: an unterminated last event is handled as any other."""
        rest, self._pending = self._pending, b""
        if self._passing:
            self._passing = False
            if b'"usage"' in self._usage_tail:
                self._record.note_usage(self._usage_tail)
            return b""
        kept = self._event(rest)
        return kept if self._remove else b""  # when only reading, it went on as it came

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
        """What the client receives of one whole event (its blank line included)."""
        if b'"usage"' not in event:
            return event
        data = _DataLines(event)
        if not data.spans:  # relayed unchanged, but a usage in it is still the answer's cost
            self._record.note_usage(event)
            return event
        try:
            fields = _TOP_LEVEL.decode(data.payload)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return event
        usage = bytes(fields.get("usage", b"")).strip()
        if usage != b"null":  # a count, or one inside (Responses' response.completed)
            self._record.note_usage(data.payload)
        if usage != b"null" and not usage.startswith(b"{"):
            return event  # no usage member, or one the gateway would not have added
        return self._without_ours(data, fields, usage) if self._remove else event

    def _without_ours(
        self, data: _DataLines, fields: dict[str, msgspec.Raw], usage: bytes
    ) -> bytes:
        """The event without the usage the gateway asked for, if that is what it carries."""
        if usage == b"null":
            return data.without_usage(fields) or data.event
        if _only_empty_choices(fields):
            return b""  # the gateway's usage chunk: all of it is the gateway's
        if not _finished(fields):  # usage mid-answer: the provider's own, sent unasked
            self._reports_unasked = True
            return data.event
        if self._reports_unasked:
            return data.event
        return data.without_usage(fields) or data.event  # on the finish chunk: the member


class _DataLines:
    """An event's `data:` lines: their payload (joined with "\\n", as SSE says) and where
    each line's part of it sits in the event, so that an edit of the payload maps back."""

    def __init__(self, event: bytes) -> None:
        self.event = event
        self.spans: list[tuple[int, int]] = []
        self.others: list[bytes] = []
        at = 0
        for line in event.splitlines(keepends=True):
            text = line.rstrip(b"\r\n")
            if text.startswith(b"data:"):
                skip = 6 if text.startswith(b"data: ") else 5
                self.spans.append((at + skip, at + len(text)))
            else:
                self.others.append(line)
            at += len(line)
        self.payload = b"\n".join(event[start:end] for start, end in self.spans)

    def without_usage(self, fields: dict[str, msgspec.Raw]) -> bytes | None:
        """The event without its top-level `usage` member, byte for byte otherwise."""
        expected = [(k, bytes(v)) for k, v in fields.items() if k != "usage"]
        value = re.escape(bytes(fields["usage"]))
        member = re.compile(
            rb',\s*"usage"\s*:\s*' + value + rb'|"usage"\s*:\s*' + value + rb"\s*,?"
        )
        for found in reversed(list(member.finditer(self.payload))):
            candidate = self.payload[: found.start()] + self.payload[found.end() :]
            try:
                left = _TOP_LEVEL.decode(candidate)
            except (msgspec.DecodeError, msgspec.ValidationError):
                continue
            # A nested usage removed instead would leave the top-level one in place.
            if [(k, bytes(v)) for k, v in left.items()] != expected:
                continue
            event = self._cut(found.start(), found.end())
            # Kept only if it is that payload with the same other lines: a cut across a
            # line between two data lines would have taken the provider's bytes too.
            edited = _DataLines(event)
            if edited.payload == candidate and edited.others == self.others:
                return event
        return None

    def _cut(self, start: int, end: int) -> bytes:
        return self.event[: self._where(start)] + self.event[self._where(end) :]

    def _where(self, offset: int) -> int:
        """The event offset of payload `offset` (the joining "\\n" is the next line's start)."""
        for begin, end in self.spans:
            if offset <= end - begin:
                return begin + offset
            offset -= end - begin + 1
        return len(self.event)


def _finished(fields: dict[str, msgspec.Raw]) -> bool:
    """A choice of this chunk has its finish_reason."""
    return any(bytes(c.get("finish_reason", b"null")) != b"null" for c in _choices(fields))


def _only_empty_choices(fields: dict[str, msgspec.Raw]) -> bool:
    """`choices` is there and says nothing: `[]`, or LiteLLM's `[{"index":0,"delta":{}}]`."""
    choices = fields.get("choices")
    if choices is None:
        return False
    try:
        listed = _CHOICES.decode(choices)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return False
    return all(_says_nothing(choice) for choice in listed)


def _says_nothing(choice: dict[str, msgspec.Raw]) -> bool:
    for name, raw in choice.items():
        value = bytes(raw).strip()
        if name == "index" or value in _EMPTY:
            continue
        try:  # a delta of nulls: {"content": null, "role": null}
            inner = _TOP_LEVEL.decode(value)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return False
        if any(bytes(v).strip() != b"null" for v in inner.values()):
            return False
    return True


def _choices(fields: dict[str, msgspec.Raw]) -> list[dict[str, msgspec.Raw]]:
    choices = fields.get("choices")
    if choices is None:
        return []
    try:
        return _CHOICES.decode(choices)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return []


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
