"""Request heads read on the worker's main loop: complete yet? too large? a probe? a scrape?

The main loop only looks for the end of the head; gunicorn's own parser still parses it,
from the bytes handed over, so every rule and rejection (400, 414, 431...) stays gunicorn's.
"""

from __future__ import annotations

import enum
from typing import Any

from gunicorn.http.message import DEFAULT_MAX_HEADERFIELD_SIZE, MAX_HEADERS, MAX_REQUEST_LINE

_PROBE_PATHS = (b"/health", b"/ready")
_METRICS_PATH = b"/metrics"


class Head(enum.Enum):
    INCOMPLETE = "incomplete"
    COMPLETE = "complete"
    TOO_LARGE = "too_large"


def head_state(buffered: bytes | bytearray, max_bytes: int) -> Head:
    # A bare-LF head ("\n\n") is handed over too: gunicorn's parser rejects it with its
    # 400 at once, rather than the client waiting for the header deadline.
    if b"\r\n\r\n" in buffered or b"\n\n" in buffered:
        return Head.COMPLETE
    if len(buffered) > max_bytes:
        return Head.TOO_LARGE
    return Head.INCOMPLETE


def max_head_bytes(cfg: Any) -> int:
    """The most bytes gunicorn's parser reads for one head before it answers 414 or 431.

    The same arithmetic as `gunicorn.http.message.Request` (0 or out-of-range limits mean
    gunicorn's own maxima), so a head it would accept is never refused here.
    """
    line = cfg.limit_request_line
    if line == 0:
        line = 1024 * 1024  # "unlimited": what gunicorn's C parser allows
    elif line < 0 or line > MAX_REQUEST_LINE:
        line = MAX_REQUEST_LINE
    fields = cfg.limit_request_fields
    if fields <= 0 or fields > MAX_HEADERS:
        fields = MAX_HEADERS
    field_size = cfg.limit_request_field_size
    if field_size <= 0:
        field_size = DEFAULT_MAX_HEADERFIELD_SIZE
    return line + 2 + fields * (field_size + 2) + 4


def is_inline_probe(buffered: bytes) -> bool:
    """`GET /health` or `GET /ready` (any query) without a body, from a complete head.

    A request with a body goes to a thread: reading a body may block, the main loop must not.
    """
    return _bodiless_get_path(buffered) in _PROBE_PATHS


def is_metrics_scrape(buffered: bytes) -> bool:
    """`GET /metrics` (any query) without a body, from a complete head: answered by the
    worker's scrape thread (scrapes.py), never queued behind the request threads."""
    return _bodiless_get_path(buffered) == _METRICS_PATH


def _bodiless_get_path(buffered: bytes) -> bytes | None:
    """The path (without its query) of a complete `GET` head that announces no body."""
    end = buffered.find(b"\r\n\r\n")
    if end < 0:
        return None
    line, _, headers = buffered[:end].partition(b"\r\n")
    parts = line.split(b" ")
    if len(parts) != 3 or parts[0] != b"GET":
        return None
    lowered = headers.lower()
    if b"content-length:" in lowered or b"transfer-encoding:" in lowered:
        return None
    return parts[1].split(b"?", 1)[0]
