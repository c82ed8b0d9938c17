"""The few changes the gateway makes to a request body, and only when it must.

A body is relayed as the client sent it unless a deployment needs another `model`, a
provider needs a default (DashScope's `enable_thinking`), or usage has to be asked for
(`stream_options.include_usage`). Then the top-level object is decoded into raw values
(`msgspec.Raw`: each value stays the client's own bytes, nothing is built) and encoded
again with only those fields changed.
"""

from __future__ import annotations

from collections.abc import Mapping

import msgspec

_TOP_LEVEL = msgspec.json.Decoder(dict[str, msgspec.Raw])
_ENCODER = msgspec.json.Encoder()
_TRUE = msgspec.Raw(b"true")


def edited(
    body: bytes,
    *,
    model: str | None = None,
    defaults: Mapping[str, object] | None = None,
    include_usage: bool = False,
    normalise: bool = False,
) -> bytes:
    """`body` with `model` replaced, `defaults` added where absent, usage asked for.

    `normalise`: re-encoded at the top level even with nothing to change, so that a member
    sent twice reaches the provider once, as the gateway read it (the last).
    The body must already have been checked to be a JSON object (chat.parse_head).
    """
    if model is None and not defaults and not include_usage and not normalise:
        return body
    fields = _TOP_LEVEL.decode(body)
    if model is not None:
        fields["model"] = msgspec.Raw(_ENCODER.encode(model))
    for name, value in (defaults or {}).items():
        if name not in fields:
            fields[name] = msgspec.Raw(_ENCODER.encode(value))
    if include_usage:
        fields["stream_options"] = _with_usage(fields.get("stream_options"))
    return _ENCODER.encode(fields)


def _with_usage(options: msgspec.Raw | None) -> msgspec.Raw:
    """`stream_options` with `include_usage: true`, its other fields kept."""
    if options is None or bytes(options).strip() == b"null":
        return msgspec.Raw(b'{"include_usage":true}')
    try:
        inner = _TOP_LEVEL.decode(options)
    except (msgspec.DecodeError, msgspec.ValidationError):
        # Not an object: the provider will refuse it as it would have without us.
        return options
    inner["include_usage"] = _TRUE
    return msgspec.Raw(_ENCODER.encode(inner))


def asked_for_usage(body: bytes) -> bool:
    """Whether the client itself set `stream_options.include_usage: true`."""
    options = _TOP_LEVEL.decode(body).get("stream_options")
    if options is None:
        return False
    try:
        return _TOP_LEVEL.decode(options).get("include_usage") == _TRUE
    except (msgspec.DecodeError, msgspec.ValidationError):
        return False
