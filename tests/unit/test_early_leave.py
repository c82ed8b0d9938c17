"""Leaving early: the read-on after the answer's end, and the estimate's rule for media.

No sockets to a provider here: the relays are fed pieces, the exchange a socket pair, the
watcher a real client socket (its peer closed). The end-to-end proof is tests/e2e.
"""

from __future__ import annotations

import base64
import itertools
import math
import socket
import threading
import time
from collections.abc import Iterator, Mapping

import orjson
import pytest

from gateway.disconnects import CLIENT_GONE, DEADLINE, DisconnectWatcher
from gateway.errors import GatewayError
from gateway.policy.estimate import (
    AUDIO_TOKENS_PER_SECOND,
    FILE_TOKENS,
    IMAGE_TOKENS,
    LOW_DETAIL_IMAGE_TOKENS,
    prompt_tokens,
)
from gateway.record import RequestRecord
from gateway.upstream.connection import Exchange
from gateway.upstream.scrub import Scrubber, SecretMask
from gateway.upstream.streams import READ_ON_BYTES, SseRelay, TranslatedSseRelay

BILLED = {"prompt_tokens": 50_100, "completion_tokens": 120, "total_tokens": 50_220}


def event(payload: object) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def delta(text: str, finish: str | None = None) -> bytes:
    return event({"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": finish}]})


USAGE = event({"choices": [], "usage": BILLED})


def record() -> RequestRecord:
    return RequestRecord("r", "POST", "/v1/chat/completions", "/v1/chat/completions")


def fail(exc: Exception) -> GatewayError:
    return GatewayError(502, str(exc))


def sse_relay(chunks: Iterator[bytes], rec: RequestRecord, **options: float) -> SseRelay:
    scrubber = Scrubber(SecretMask(()))
    return SseRelay(Exchange(), chunks, rec, scrubber, fail, ended=lambda: None, **options)


def relay_until(relay: SseRelay | TranslatedSseRelay, count: int) -> bytes:
    """What the client got of the first `count` pieces it read (then it leaves)."""
    return b"".join(itertools.islice(iter(relay), count))


# --- the read-on after the answer ---------------------------------------------------------
def test_a_client_leaving_after_finish_reason_gets_the_providers_usage_read() -> None:
    rec = record()
    rec.inject_usage = True
    relay = sse_relay(
        iter([delta("All "), delta("of it.", "stop"), USAGE, b"data: [DONE]\n\n"]), rec
    )
    got = relay_until(relay, 2)
    relay.close()
    assert b'"finish_reason":"stop"' in got
    assert rec.usage == BILLED
    assert rec.client_disconnected is True


def test_a_client_leaving_mid_answer_reads_nothing_more() -> None:
    rec, read = record(), []

    def provider() -> Iterator[bytes]:
        for piece in [delta("Once "), delta("more "), USAGE]:
            read.append(piece)
            yield piece

    relay = sse_relay(provider(), rec)
    relay_until(relay, 1)
    relay.close()
    assert len(read) == 1
    assert rec.usage is None


def test_a_finish_mark_cut_between_two_pieces_is_seen() -> None:
    rec = record()
    finish = delta("end", "stop")
    at = finish.index(b'"finish_reason"') + 6
    relay = sse_relay(iter([finish[:at], finish[at:], USAGE]), rec)
    relay_until(relay, 2)
    relay.close()
    assert rec.usage == BILLED


def test_the_answers_own_text_cannot_fake_the_end() -> None:
    rec = record()
    fake = delta('"finish_reason":"stop" "type":"message_stop"')
    relay = sse_relay(iter([fake, delta("more"), USAGE]), rec)
    relay_until(relay, 1)
    relay.close()
    assert rec.usage is None


def test_reading_on_stops_at_its_byte_bound() -> None:
    rec, sent = record(), [0]

    def provider() -> Iterator[bytes]:
        yield delta("done", "stop")
        while sent[0] < 100 * READ_ON_BYTES:  # bounded, should the relay not stop
            piece = b": keep-alive " + b"x" * 4000 + b"\n\n"
            sent[0] += len(piece)
            yield piece

    relay = sse_relay(provider(), rec)
    relay_until(relay, 1)
    relay.close()
    assert READ_ON_BYTES <= sent[0] < READ_ON_BYTES + 8192
    assert rec.usage is None


def test_reading_on_stops_at_its_time_bound() -> None:
    rec = record()

    def provider() -> Iterator[bytes]:
        yield delta("done", "stop")
        for _ in range(200):  # 10 s, should the relay not stop
            time.sleep(0.05)
            yield b": still here\n\n"

    relay = sse_relay(provider(), rec, read_on_seconds=0.3)
    relay_until(relay, 1)
    started = time.monotonic()
    relay.close()
    assert time.monotonic() - started < 1.5


class _Translator:
    """A stand-in StreamTranslator: counts what it was fed, keeps a usage it sees."""

    def __init__(self) -> None:
        self.fed: list[bytes] = []
        self._usage: dict[str, int] | None = None

    def feed(self, data: bytes) -> bytes:
        self.fed.append(data)
        if data != b"[DONE]" and (usage := orjson.loads(data).get("usage")):
            self._usage = usage
        return b"event: x\ndata: " + data + b"\n\n"

    def finish(self) -> bytes:
        return b""

    def fail(self, status: int, message: str) -> bytes:
        return b""

    @property
    def usage(self) -> Mapping[str, int] | None:
        return self._usage


def test_a_translated_stream_left_after_finish_reason_reads_the_usage_too() -> None:
    rec, translator = record(), _Translator()
    pieces = iter([delta("All", "stop"), USAGE[:20], USAGE[20:], b"data: [DONE]\n\n"])
    relay = TranslatedSseRelay(
        Exchange(),
        pieces,
        rec,
        Scrubber(SecretMask(())),
        fail,
        translator=translator,
        ended=lambda: None,
    )
    relay_until(relay, 1)
    relay.close()
    assert rec.usage == BILLED
    assert rec.client_disconnected is True


# --- the exchange and the watcher ---------------------------------------------------------
def shut_down(sock: socket.socket) -> bool:
    """Whether `sock`'s own side was shut down (its reads then end at once)."""
    sock.settimeout(0.2)
    try:
        return sock.recv(1) == b""
    except TimeoutError:
        return False


def test_an_answered_exchange_is_not_cut_when_the_client_leaves_only_at_its_deadline() -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        exchange = Exchange()
        exchange.attach(ours)
        exchange.answered(5.0)
        later = exchange.end(CLIENT_GONE)
        assert later is not None and 4.0 < later - time.monotonic() <= 5.0
        assert not shut_down(ours) and not exchange.cut
        assert exchange.end(DEADLINE) is None
        assert exchange.cut and shut_down(ours)
        assert exchange.ended_by == CLIENT_GONE


def test_an_exchange_mid_answer_is_cut_when_the_client_leaves() -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        exchange = Exchange()
        exchange.attach(ours)
        assert exchange.end(CLIENT_GONE) is None
        assert exchange.cut and shut_down(ours)


def test_the_watcher_ends_an_exchange_that_asked_for_time_at_that_time() -> None:
    watcher = DisconnectWatcher()
    client, peer = socket.socketpair()
    ended: list[tuple[str, float]] = []
    done = threading.Event()

    def on_end(reason: str) -> float | None:
        ended.append((reason, time.monotonic()))
        if reason == DEADLINE:
            done.set()
        return time.monotonic() + 0.3 if reason == CLIENT_GONE else None

    try:
        unwatch = watcher.watch(client, on_end, time.monotonic() + 30)
        peer.close()
        assert done.wait(5)
        unwatch()
    finally:
        watcher.close()
        client.close()
    assert [reason for reason, _ in ended] == [CLIENT_GONE, DEADLINE]
    assert 0.25 < ended[1][1] - ended[0][1] < 1.5


# --- the estimate's rule ------------------------------------------------------------------
def chat(*parts: object) -> bytes:
    return orjson.dumps({"model": "m", "messages": [{"role": "user", "content": list(parts)}]})


def text_of(body: bytes, *parts: object) -> int:
    """The body's tokens outside its media parts, at a token per 4 bytes."""
    return math.ceil((len(body) - sum(len(orjson.dumps(p)) for p in parts)) / 4)


def test_a_text_prompt_is_a_token_per_4_bytes() -> None:
    body = chat({"type": "text", "text": "x" * 1000})
    assert prompt_tokens(body) == math.ceil(len(body) / 4)


def test_an_image_url_counts_as_an_image_not_as_its_bytes() -> None:
    image = {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}
    body = chat({"type": "text", "text": "what is it?"}, image)
    assert prompt_tokens(body) == text_of(body, image) + IMAGE_TOKENS
    low = {"type": "image_url", "image_url": {"url": "https://x/a.png", "detail": "low"}}
    assert prompt_tokens(chat(low)) == text_of(chat(low), low) + LOW_DETAIL_IMAGE_TOKENS


def test_a_megabyte_of_base64_image_is_one_image() -> None:
    data = base64.b64encode(b"\x89PNG" * 250_000).decode()
    image = {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{data}"}}
    assert prompt_tokens(chat(image)) == text_of(chat(image), image) + IMAGE_TOKENS


def test_audio_counts_by_its_length() -> None:
    data = base64.b64encode(b"\0" * 160_000).decode()  # 10 s at 16,000 bytes a second
    audio = {"type": "input_audio", "input_audio": {"data": data, "format": "mp3"}}
    assert prompt_tokens(chat(audio)) == text_of(chat(audio), audio) + 10 * AUDIO_TOKENS_PER_SECOND


@pytest.mark.parametrize(
    ("part", "tokens"),
    [
        ({"type": "file", "file": {"file_id": "file-abc"}}, FILE_TOKENS),
        ({"type": "input_file", "file_url": "https://x/a.pdf"}, FILE_TOKENS),
        (
            {"type": "file", "file": {"file_data": base64.b64encode(b"%" * 200_000).decode()}},
            4 * FILE_TOKENS,  # 200,000 bytes: 4 started 64 KiB pages
        ),
        ({"type": "input_image", "image_url": "https://x/a.png"}, IMAGE_TOKENS),
        ({"type": "image", "source": {"type": "url", "url": "https://x/a.png"}}, IMAGE_TOKENS),
        ({"type": "document", "source": {"type": "file", "file_id": "f"}}, FILE_TOKENS),
    ],
)
def test_files_and_every_dialects_images_count_at_their_rate(
    part: dict[str, object], tokens: int
) -> None:
    body = chat({"type": "text", "text": "read this"}, part)
    assert prompt_tokens(body) == text_of(body, part) + tokens


def test_a_document_given_as_text_is_text() -> None:
    document = {"type": "document", "source": {"type": "text", "data": "y" * 4000}}
    body = chat(document)
    assert prompt_tokens(body) == math.ceil(len(body) / 4)


def test_a_body_that_is_not_json_is_its_bytes() -> None:
    body = b'{"image_url": not json' + b"x" * 100
    assert prompt_tokens(body) == math.ceil(len(body) / 4)


def test_escaping_or_padding_media_markers_never_lowers_the_estimate() -> None:
    import orjson

    from gateway.policy.estimate import prompt_tokens

    image = {"type": "image_url", "image_url": {"url": "https://example.test/y.png"}}
    body = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": [image] * 50}]})
    plain = prompt_tokens(body)
    assert plain >= 50 * 1000
    escaped = body.replace(b'"image_url"', b'"\\u0069mage_url"')  # the same JSON
    assert prompt_tokens(escaped) >= plain
    padding = {"role": "user", "content": "{" * 30_000}
    padded = orjson.dumps(
        {"model": "m", "messages": [{"role": "user", "content": [image] * 50}, padding]}
    )
    assert prompt_tokens(padded) >= plain


def test_a_stream_left_mid_answer_pays_at_least_what_was_relayed() -> None:
    from gateway.policy.usage import settle_usage
    from gateway.record import RequestRecord

    # A native Messages stream: message_start said output_tokens 1, then 40 KB of text went
    # out before the client pressed Esc.
    record = RequestRecord("r", "POST", "/v1/messages", "/v1/messages")
    record.event_stream = record.client_disconnected = True
    record.usage = {"prompt_tokens": 25, "completion_tokens": 1}
    record.completion_bytes = 40_000
    assert settle_usage(record) == 25 + 10_000
    assert record.usage_estimated
    # Left after the answer's end: the provider's own count stands.
    done = RequestRecord("r", "POST", "/v1/messages", "/v1/messages")
    done.event_stream = done.client_disconnected = done.answer_complete = True
    done.usage = {"prompt_tokens": 25, "completion_tokens": 7000}
    done.completion_bytes = 40_000
    assert settle_usage(done) == 7025
    assert not done.usage_estimated
