"""What every dialect module shares: the error a malformed request raises, and SSE framing."""

from __future__ import annotations

from typing import Any

import orjson


class ProtocolError(ValueError):
    """A request or answer that does not fit the dialect; `param` names the offending field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


def sse(event: str, payload: dict[str, Any]) -> bytes:
    """One server-sent event: `event: <event>`, then the payload as JSON on one `data:` line."""
    return b"event: " + event.encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n"
