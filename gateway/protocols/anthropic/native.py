"""A Messages request for a provider that speaks Messages itself: relayed nearly untouched.

Only the top level is decoded, into raw values (`msgspec.Raw`): every field the gateway does
not change keeps the client's own bytes, as in `gateway.upstream.edits`.
"""

from __future__ import annotations

import msgspec

from gateway.protocols.anthropic.request import BILLING_HEADER
from gateway.protocols.common import ProtocolError

_TOP_LEVEL = msgspec.json.Decoder(dict[str, msgspec.Raw])
_BLOCKS = msgspec.json.Decoder(list[msgspec.Raw])
_ENCODER = msgspec.json.Encoder()
_MARK = BILLING_HEADER.encode()

# Beta flags a Messages provider other than Anthropic is known to accept. None so far:
# DashScope, vLLM, llama.cpp and Ollama implement the generally available API, and a flag
# they do not know is at best ignored and at worst refused (LiteLLM #20021, #22963).
PORTABLE_BETAS: frozenset[str] = frozenset()


class _TextBlock(msgspec.Struct, gc=False):
    text: str = ""


_TEXT_BLOCK = msgspec.json.Decoder(_TextBlock)


def native_body(body: bytes, *, model: str | None) -> bytes:
    """`body` with `model` replaced and Claude Code's billing-header system block removed.

    Always re-encoded at the top level (each value keeps its bytes): a body with a member
    twice (`"model": "denied", ..., "model": "allowed"`) was checked by its last one, and a
    provider whose parser keeps the first must not see the other.
    """
    try:
        fields = _TOP_LEVEL.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
        raise ProtocolError("The request body must be a JSON object.") from None
    if model is not None:
        fields["model"] = msgspec.Raw(_ENCODER.encode(model))
    system = fields.get("system")
    if system is not None and _MARK in bytes(system):
        kept = _without_billing_header(system)
        if kept is not None:
            if kept:
                fields["system"] = msgspec.Raw(_ENCODER.encode(kept))
            else:
                del fields["system"]
    return _ENCODER.encode(fields)


def _without_billing_header(system: msgspec.Raw) -> list[msgspec.Raw] | None:
    """The system blocks less the billing header, or None when there is none to remove."""
    try:
        blocks = _BLOCKS.decode(system)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None  # a string system prompt: Claude Code never sends the header that way
    kept = [b for b in blocks if not _is_billing_header(b)]
    return kept if len(kept) != len(blocks) else None


def _is_billing_header(block: msgspec.Raw) -> bool:
    if _MARK not in bytes(block):
        return False
    try:
        return _TEXT_BLOCK.decode(block).text.startswith(BILLING_HEADER)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return False


def known_betas(header: str | None, provider_kind: str = "") -> str | None:
    """The `anthropic-beta` value to send a native provider: the client's for Anthropic, the
    flags in PORTABLE_BETAS for any other, None to send no header."""
    if not header:
        return None
    if provider_kind == "anthropic":
        return header
    flags = [f.strip() for f in header.split(",") if f.strip() in PORTABLE_BETAS]
    return ",".join(flags) or None
