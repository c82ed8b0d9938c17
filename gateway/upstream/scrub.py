"""Masking the gateway's own secrets in what the provider sends back.

A provider that echoes the `Authorization` header it received (`Invalid key Bearer sk-…`)
would otherwise hand the gateway's provider key to whoever made the call. Every relayed
header value and body byte passes through here; a secret becomes its masked form
(`sk-…abcd`, see gateway.secrets).
"""

from __future__ import annotations

from gateway.secrets import mask, spellings

# A shorter secret (a proxy password like "42") would also match ordinary text in answers:
# masking it would corrupt them. Provider keys are far longer.
MIN_MASKED_LENGTH = 12


class SecretMask:
    """The spellings of the secrets to mask, built once per upstream client."""

    def __init__(self, secrets: tuple[str, ...]) -> None:
        long_enough = (s for s in secrets if len(s) >= MIN_MASKED_LENGTH)
        pairs = {form: mask(s) for s in long_enough for form in spellings(s)}
        # Longest first, so that a secret containing another is masked whole.
        ordered = sorted(pairs.items(), key=lambda pair: len(pair[0]), reverse=True)
        self._text = ordered
        self._bytes = [(form.encode(), masked.encode()) for form, masked in ordered]
        self._first_bytes = frozenset(form[0] for form, _ in self._bytes)
        self._any_bytes = frozenset(b for form, _ in self._bytes for b in form)
        self.longest = max((len(form) for form, _ in self._bytes), default=0)

    def text(self, value: str) -> str:
        for form, masked in self._text:
            if form in value:
                value = value.replace(form, masked)
        return value

    def whole(self, data: bytes) -> bytes:
        for form, masked in self._bytes:
            if form in data:
                data = data.replace(form, masked)
        return data

    def partial_tail(self, data: bytes) -> int:
        """How many bytes at the end of `data` could be the start of a secret."""
        if not data or data[-1] not in self._any_bytes:  # an SSE event ends with "\n"
            return 0
        start = max(0, len(data) - self.longest + 1)
        for at in range(start, len(data)):
            if data[at] in self._first_bytes:
                tail = data[at:]
                if any(form.startswith(tail) for form, _ in self._bytes):
                    return len(data) - at
        return 0


class Scrubber:
    """Masks secrets across the pieces of one body, even where a piece splits a secret.

    Only bytes that could begin a secret are held back, until the next piece shows what
    they are: an SSE event ends with a blank line, so a stream's events pass at once.
    """

    def __init__(self, mask: SecretMask) -> None:
        self.mask = mask
        self._held = b""

    def feed(self, piece: bytes) -> bytes:
        data = self.mask.whole(self._held + piece if self._held else piece)
        keep = self.mask.partial_tail(data)
        self._held = data[len(data) - keep :] if keep else b""
        return data[: len(data) - keep] if keep else data

    def flush(self) -> bytes:
        held, self._held = self._held, b""
        return held
