"""A prompt's tokens when the provider reports none: text by its bytes, media at flat rates.

A token per 4 bytes is fair for text, and wrong both ways for media: a 100-byte image URL
costs the provider's ~1,000 tokens, and a 1 MB base64 image is not 250,000 tokens. So each
image, audio or file part of a Chat Completions, Responses or Messages body is taken out of
the byte count and counted at its own rate:

- an image: IMAGE_TOKENS, or LOW_DETAIL_IMAGE_TOKENS with `"detail": "low"`;
- audio: AUDIO_TOKENS_PER_SECOND, its length taken from its size at AUDIO_BYTES_PER_SECOND;
- a file or document: FILE_TOKENS per started FILE_BYTES of inline data, and FILE_TOKENS
  for one given by id or URL (its size is the provider's to know).

Pure functions of the request body: no Flask, no state.
"""

from __future__ import annotations

import math
from typing import Any

import orjson

# The most one image costs at the largest providers: OpenAI's high detail is at most
# 85 + 6 tiles * 170 = 1,105 tokens, Anthropic's about 1,600 (1.15 megapixels / 750).
IMAGE_TOKENS = 1_600
LOW_DETAIL_IMAGE_TOKENS = 85  # OpenAI's flat rate for "detail": "low"
# OpenAI's audio input: about a token per 100 ms; 128 kbit/s (MP3) is 16,000 bytes a second.
AUDIO_TOKENS_PER_SECOND = 10
AUDIO_BYTES_PER_SECOND = 16_000
# Anthropic documents 1,500 to 3,000 tokens per PDF page; a page is taken as 64 KiB.
FILE_TOKENS = 3_000
FILE_BYTES = 64 * 1024
# Cheap markers: a body without any is text only, and is not parsed. Precise, so that the
# bodies agents send on every turn (Claude Code's "input_schema", Codex's "input_text")
# are not parsed for nothing.
_MEDIA_MARKERS = (
    b'"image_url"',
    b'"input_image"',
    b'"input_audio"',
    b'"input_file"',
    # Messages' and chat's parts by their type (a tool schema's "file" property is not one),
    # as the SDKs write it: without or with a space.
    *(b'"type":"%s"' % kind for kind in (b"image", b"document", b"file")),
    *(b'"type": "%s"' % kind for kind in (b"image", b"document", b"file")),
)
_MAX_NODES = 100_000  # a hostile body's millions of tiny objects are not all walked
# A body with more objects than this is estimated by its bytes without being parsed:
# 10 MB of tiny JSON objects would cost 300 MB of Python objects to look for media in.
_MAX_OBJECTS = 20_000


def prompt_tokens(body: bytes) -> int:
    """The rule's tokens for a request body (bytes / 4 for a body with no media parts)."""
    marked = sum(body.count(marker) for marker in _MEDIA_MARKERS)
    # An ASCII letter escaped ("\u0069mage_url") is not how any SDK writes: it may hide
    # a marker, so such a body is parsed (the provider reads it as the same JSON).
    if not marked and b"\\u00" not in body:
        return _text_tokens(len(body))
    if body.count(b"{") > _MAX_OBJECTS:
        # Too many objects to parse: every byte as text (base64 counted too), and each
        # marker found at an image's rate, so padding the body never makes it cheaper.
        return _text_tokens(len(body)) + marked * IMAGE_TOKENS
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return _text_tokens(len(body))
    media_bytes = media_tokens = 0
    for part in _media_parts(parsed):
        media_bytes += len(orjson.dumps(part))
        media_tokens += part_tokens(part)
    return _text_tokens(max(0, len(body) - media_bytes)) + media_tokens


def part_tokens(part: dict[str, Any]) -> int:
    """The tokens of one media part, by its `type` (see the module's rule)."""
    kind = part.get("type")
    if kind in ("image_url", "input_image", "image"):
        return LOW_DETAIL_IMAGE_TOKENS if _detail(part) == "low" else IMAGE_TOKENS
    if kind == "input_audio":
        audio = part.get("input_audio")
        data = audio.get("data") if isinstance(audio, dict) else None
        seconds = _decoded_size(data) / AUDIO_BYTES_PER_SECOND
        return max(1, math.ceil(seconds * AUDIO_TOKENS_PER_SECOND))
    inline = _inline_file(part)
    return FILE_TOKENS * max(1, math.ceil(_decoded_size(inline) / FILE_BYTES))


def _media_parts(parsed: Any) -> list[dict[str, Any]]:
    """The media parts anywhere in the body (a part's own members are not walked)."""
    found: list[dict[str, Any]] = []
    queue, walked = [parsed], 0
    while queue and walked < _MAX_NODES:
        node = queue.pop()
        walked += 1
        if isinstance(node, dict):
            if _is_media(node):
                found.append(node)
                continue
            queue.extend(value for value in node.values() if isinstance(value, (dict, list)))
        elif isinstance(node, list):
            queue.extend(value for value in node if isinstance(value, (dict, list)))
    return found


def _is_media(node: dict[str, Any]) -> bool:
    kind = node.get("type")
    if kind in ("image_url", "input_image", "input_audio", "file", "input_file", "image"):
        return True
    if kind == "document":  # Messages: a document given as text is text
        source = node.get("source")
        return not (isinstance(source, dict) and source.get("type") in ("text", "content"))
    return False


def _detail(part: dict[str, Any]) -> Any:
    image = part.get("image_url")
    return image.get("detail") if isinstance(image, dict) else part.get("detail")


def _inline_file(part: dict[str, Any]) -> Any:
    """A file part's inline data (base64 or a data: URL), if it has any."""
    file, source = part.get("file"), part.get("source")
    if isinstance(file, dict):  # Chat Completions: {"type": "file", "file": {...}}
        return file.get("file_data")
    if isinstance(source, dict):  # Messages: {"type": "document", "source": {...}}
        return source.get("data")
    return part.get("file_data")  # Responses: {"type": "input_file", "file_data": ...}


def _decoded_size(data: Any) -> int:
    """The size of base64 `data` (or a data: URL) once decoded; 0 if there is none."""
    if not isinstance(data, str):
        return 0
    encoded = len(data) - (data.find(",") + 1 if data.startswith("data:") else 0)
    padding = 2 if data.endswith("==") else 1 if data.endswith("=") else 0
    return max(0, encoded - padding) * 3 // 4


def _text_tokens(size: int) -> int:
    return math.ceil(size / 4)
