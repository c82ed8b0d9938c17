"""The same upstream chat stream asked for in three dialects: relayed, translated, bridged.

`messages-stream-N` and `responses-stream-N` (bench.run) compare, in one gateway process,
the plain Chat Completions stream relayed with the same stream requested through
`POST /v1/messages` (Anthropic's body, translated by gateway/protocols/anthropic) and
`POST /v1/responses` (bridged by gateway/protocols/responses). The fake upstream gets its
script from the model name (bench.upstream.scripted_model), since translators pass on only
the fields they map, so all three reach it as the same request and get the same bytes.

A translated body has fresh ids on every call: it is checked, not compared byte for byte —
status 200 (checked by the client), every upstream text piece in order, the closing event.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import orjson

from bench.streams import Expected, stream_request
from bench.upstream import expected_stream


@dataclass(frozen=True)
class Dialect:
    name: str  # "chat", "messages" or "responses"
    path: bytes
    # The request body for a model whose name carries the stream's script.
    body: Callable[[str], bytes]
    # Extra header lines (CRLF-terminated).
    headers: bytes = b""
    # The text of each delta event, and the first line of a complete stream's last event.
    delta: re.Pattern[bytes] | None = None
    last_event: bytes = b""

    def request(self, port: int, key: str, model: str) -> bytes:
        return stream_request(port, key, self.body(model), self.path, self.headers)

    def expected(self, model: str, chunks: int) -> Expected:
        if self.delta is None:
            return expected_stream(model, chunks)
        text = "".join(f"tok{i} " for i in range(chunks)).encode()
        delta, last_event = self.delta, self.last_event

        def complete(body: bytes) -> bool:
            if not body.endswith(b"\n\n"):
                return False
            last = body[:-2].rpartition(b"\n\n")[2]
            return last.startswith(last_event) and b"".join(delta.findall(body)) == text

        return complete


def _chat_body(model: str) -> bytes:
    return orjson.dumps(
        {"model": model, "stream": True, "messages": [{"role": "user", "content": "Hello"}]}
    )


def _messages_body(model: str) -> bytes:
    # What Claude Code's smallest turn looks like: max_tokens is required.
    return orjson.dumps(
        {
            "model": model,
            "max_tokens": 1024,
            "stream": True,
            "messages": [{"role": "user", "content": "Hello"}],
        }
    )


def _responses_body(model: str) -> bytes:
    # Codex's shape: `store: false` (the whole history comes each turn), so the bench
    # measures the bridge, not the gateway's response store.
    return orjson.dumps({"model": model, "stream": True, "store": False, "input": "Hello"})


DIALECTS = {
    d.name: d
    for d in (
        Dialect("chat", b"/v1/chat/completions", _chat_body),
        Dialect(
            "messages",
            b"/v1/messages",
            _messages_body,
            headers=b"anthropic-version: 2023-06-01\r\n",
            delta=re.compile(rb'"text_delta","text":"([^"]*)"'),
            last_event=b"event: message_stop\n",
        ),
        Dialect(
            "responses",
            b"/v1/responses",
            _responses_body,
            delta=re.compile(rb'"type":"response\.output_text\.delta".*?"delta":"([^"]*)"'),
            last_event=b"event: response.completed\n",
        ),
    )
}
