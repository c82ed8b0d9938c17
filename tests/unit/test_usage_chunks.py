"""Usage asked for by the gateway and taken back out of the stream, byte for byte."""

from __future__ import annotations

from collections.abc import Iterator

import orjson
import pytest
import responses
from flask.testing import FlaskClient

from gateway.record import MAX_REPORTED_TOKENS, RequestRecord
from gateway.upstream.edits import asked_for_usage, edited
from gateway.upstream.sse import MAX_EVENT_BYTES, UsageChunks, text_bytes
from tests.constants import UNIT_UPSTREAM
from tests.fake_upstream import expected_stream, sse_chunk, usage_chunk
from tests.unit.support import MakeApp, ScriptedAnswer

_ABSENT = object()

CHAT = "/v1/chat/completions"
UPSTREAM_CHAT = f"{UNIT_UPSTREAM}/chat/completions"
USAGE = {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}
# What an OpenAI-style provider sends with include_usage, and what it sends without.
WITH_USAGE = expected_stream(3, "qwen-plus", usage=True)
WITHOUT_USAGE = expected_stream(3, "qwen-plus")


def record() -> RequestRecord:
    return RequestRecord("r1", "POST", CHAT, CHAT, inject_usage=True)


def strip(pieces: list[bytes]) -> tuple[bytes, RequestRecord]:
    rec = record()
    ours = UsageChunks(rec)
    return b"".join(ours.feed(p) for p in pieces) + ours.flush(), rec


def test_the_gateways_usage_is_removed_exactly() -> None:
    body, rec = strip([WITH_USAGE])

    assert body == WITHOUT_USAGE
    assert rec.usage == USAGE


def test_events_split_at_every_byte_boundary_come_out_the_same() -> None:
    for cut in range(1, len(WITH_USAGE)):
        body, rec = strip([WITH_USAGE[:cut], WITH_USAGE[cut:]])
        assert body == WITHOUT_USAGE, cut
        assert rec.usage == USAGE, cut


def test_byte_by_byte_and_with_crlf_line_ends() -> None:
    crlf = WITH_USAGE.replace(b"\n\n", b"\r\n\r\n")
    body, rec = strip([crlf[i : i + 1] for i in range(len(crlf))])

    assert body == WITHOUT_USAGE.replace(b"\n\n", b"\r\n\r\n")
    assert rec.usage == USAGE


def test_nothing_waits_for_more_than_the_current_event() -> None:
    ours = UsageChunks(record())
    first = sse_chunk(0, "m", None)
    # A whole event passes at once (without its "usage": null); half of the next is held.
    assert ours.feed(first + first[:10]) == sse_chunk(0, "m")
    assert ours.feed(first[10:]) == sse_chunk(0, "m")


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (b'{"usage":null,"id":"a"}', b'{"id":"a"}'),
        (b'{"id":"a", "usage" : null , "x":1}', b'{"id":"a" , "x":1}'),
        (b'{"usage":null}', b"{}"),
        # A nested "usage": null is the provider's own: only the top-level one goes.
        (
            b'{"choices":[{"usage":null}],"usage":null}',
            b'{"choices":[{"usage":null}]}',
        ),
        (b'{"a":"\\"usage\\":null","usage":null}', b'{"a":"\\"usage\\":null"}'),
    ],
)
def test_only_the_top_level_null_usage_is_taken_out(payload: bytes, expected: bytes) -> None:
    body, _ = strip([b"data: " + payload + b"\n\n"])

    assert body == b"data: " + expected + b"\n\n"


@pytest.mark.parametrize(
    "event",
    [
        b"data: [DONE]\n\n",
        b": keep-alive\n\n",
        b'data: {"usage": null, oops\n\n',  # not JSON
        b'data: ["usage", null]\n\n',  # not an object
        b'data: {"choices":[{"delta":{"content":"x"}}],"usage":{"prompt_tokens":1}}\n\n',
        b'data: {"usage":{"prompt_tokens":1}}\n\n',  # no choices at all
        b'data: {"choices":"none","usage":{"prompt_tokens":1}}\n\n',
        b'data: {"usage":0}\n\n',
    ],
)
def test_an_event_it_does_not_understand_is_relayed_unchanged(event: bytes) -> None:
    body, _ = strip([event])

    assert body == event


def test_an_unterminated_last_event_is_handled_as_any_other() -> None:
    body, _ = strip([b'data: {"id":"a","usage":null}'])

    assert body == b'data: {"id":"a"}'


def test_a_huge_event_is_relayed_as_it_comes_without_being_held() -> None:
    ours = UsageChunks(record())
    big = b'data: {"x":"' + b"a" * (2 * MAX_EVENT_BYTES) + b'","usage":null}\n\n'
    out = [ours.feed(big[i : i + 4096]) for i in range(0, len(big), 4096)]
    out.append(ours.feed(sse_chunk(1, "m", None)))

    assert b"".join(out[:-1]) == big  # unchanged: too long to hold
    assert max(len(o) for o in out[:-1]) <= 4096 + MAX_EVENT_BYTES
    assert out[-1] == sse_chunk(1, "m")  # the next event is handled again


def test_usage_in_every_chunk_is_charged_once_with_the_last_count() -> None:
    counts = [{"prompt_tokens": 3, "completion_tokens": n, "total_tokens": 3 + n} for n in (1, 2)]
    events = [sse_chunk(i, "m", counts[i]) for i in range(2)] + [usage_chunk("m", counts[1])]
    body, rec = strip(events)

    assert body == b"".join(events[:2])  # the provider's own usage is relayed; ours is not
    assert rec.usage == counts[1]


@pytest.mark.parametrize(
    ("usage", "expected"),
    [
        (b'{"prompt_tokens":-5,"completion_tokens":2}', {"completion_tokens": 2}),
        (b'{"prompt_tokens":1' + b"0" * 40 + b"}", {"prompt_tokens": MAX_REPORTED_TOKENS}),
        (b'{"prompt_tokens":' + b"9" * 5000 + b"}", {"prompt_tokens": MAX_REPORTED_TOKENS}),
        (b'{"prompt_tokens":"many"}', None),
        (b'{"prompt_tokens":1.5}', {"prompt_tokens": 2}),  # rounded up, never down
        (b'{"prompt_tokens":1e9}', {"prompt_tokens": MAX_REPORTED_TOKENS}),
        (
            b'{"prompt_tokens":1.2e3,"completion_tokens":12.0}',
            {"prompt_tokens": 1200, "completion_tokens": 12},
        ),
        (
            b'{"prompt_tokens":12E+1,"completion_tokens":5e-1}',
            {"prompt_tokens": 120, "completion_tokens": 1},
        ),
        (b'{"prompt_tokens":1e99999999999999999999}', {"prompt_tokens": MAX_REPORTED_TOKENS}),
        # Its own members only: a detail's count is not the prompt's.
        (b'{"prompt_tokens_details":{"prompt_tokens":9},"prompt_tokens":3}', {"prompt_tokens": 3}),
    ],
)
def test_odd_numbers_from_a_provider_never_crash_or_overflow(
    usage: bytes, expected: dict[str, int] | None
) -> None:
    event = b'data: {"id":"c","choices":[],"usage":' + usage + b"}\n\n"
    body, rec = strip([event, b"data: [DONE]\n\n"])

    assert body == b"data: [DONE]\n\n"
    assert rec.usage == expected


def test_answer_text_is_measured_for_estimates() -> None:
    assert text_bytes(sse_chunk(0)) == len(b"tok0 ")
    assert text_bytes(b'data: {"choices":[{"delta":{"content":"a\\"b"}}]}') == 4
    assert text_bytes(b'data: {"choices":[{"delta":{"reasoning_content":"hm"}}]}') == 2


@pytest.mark.parametrize(
    "body",
    [
        b'{"model":"m","stream":true}',
        b'{"model":"m","stream":true,"stream_options":{"include_usage":false}}',
        b'{"model":"m","stream":true,"stream_options":null}',
        b'{"model":"m","stream":true,"stream_options":{"include_usage":"yes"}}',
        b'{"model":"m","stream":true,"stream_options":{"include_usage":true},'
        b'"stream_options":{"include_usage":false}}',
    ],
)
def test_a_client_cannot_turn_usage_off(body: bytes) -> None:
    assert not asked_for_usage(body)
    sent = orjson.loads(edited(body, include_usage=True))

    assert sent["stream_options"]["include_usage"] is True


def _stream_through(client: FlaskClient, auth: dict[str, str], request: dict) -> bytes:
    response = client.post(CHAT, json=request, headers=auth)
    body = response.get_data()
    response.close()
    return body


def test_through_the_app_a_client_that_did_not_ask_gets_the_bytes_without_usage(
    client: FlaskClient, auth: dict[str, str], upstream: responses.RequestsMock
) -> None:
    pieces = [WITH_USAGE[i : i + 7] for i in range(0, len(WITH_USAGE), 7)]
    upstream.add(ScriptedAnswer("POST", UPSTREAM_CHAT, pieces, chunked=True))
    request = {"model": "qwen-plus", "stream": True, "stream_options": {"include_usage": False}}

    assert _stream_through(client, auth, request) == WITHOUT_USAGE
    sent = orjson.loads(upstream.calls[0].request.body)
    assert sent["stream_options"] == {"include_usage": True}


def test_through_the_app_a_client_that_asked_gets_the_providers_bytes(
    client: FlaskClient, auth: dict[str, str], upstream: responses.RequestsMock
) -> None:
    upstream.add(ScriptedAnswer("POST", UPSTREAM_CHAT, [WITH_USAGE], chunked=True))
    request = {"model": "qwen-plus", "stream": True, "stream_options": {"include_usage": True}}
    raw = orjson.dumps(request)

    response = client.post(CHAT, data=raw, headers={**auth, "Content-Type": "application/json"})
    assert response.get_data() == WITH_USAGE
    response.close()
    assert upstream.calls[0].request.body == raw  # untouched


def test_a_client_that_asked_is_charged_its_usage_chunk_whatever_the_pieces(
    make_app: MakeApp,
    auth: dict[str, str],
    upstream: responses.RequestsMock,
    capsys: pytest.CaptureFixture[str],
) -> None:
    client = make_app().test_client()  # built here: its log sink is the captured stdout
    # A proxy in front of a provider may cut events anywhere: here every 7 bytes, so the
    # usage chunk's counts arrive in pieces that do not say "usage".
    pieces = [WITH_USAGE[i : i + 7] for i in range(0, len(WITH_USAGE), 7)]
    upstream.add(ScriptedAnswer("POST", UPSTREAM_CHAT, pieces, chunked=True))
    request = {"model": "qwen-plus", "stream": True, "stream_options": {"include_usage": True}}

    assert _stream_through(client, auth, request) == WITH_USAGE
    line = next(orjson.loads(x) for x in capsys.readouterr().out.splitlines() if '"access"' in x)
    assert line["usage"] == USAGE
    assert "usage_estimated" not in line


def test_the_usage_chunk_of_an_event_with_several_lines_is_removed_whole() -> None:
    event = b"id: 9\n" + usage_chunk("m", USAGE)
    body, rec = strip([sse_chunk(0, "m"), event])

    assert body == sse_chunk(0, "m")
    assert rec.usage == USAGE


# --- every shape of event a provider sends, at every cut ----------------------------------
FINISHED = {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}


def _chunk(index: int, *, finish: bool = False, usage: object = _ABSENT) -> dict:
    choice = {"index": 0, "delta": {"content": f"t{index}"}, "finish_reason": None}
    if finish:
        choice["finish_reason"] = "stop"
    chunk: dict = {"id": "c", "object": "chat.completion.chunk", "choices": [choice]}
    if usage is not _ABSENT:
        chunk["usage"] = usage
    return chunk


def _provider_stream(shape: str, *, asked: bool) -> bytes:
    """What a provider sends with include_usage (`asked`) and without, in `shape`."""
    chunks = [_chunk(i, usage=None) if asked else _chunk(i) for i in range(2)]
    if shape == "on the finish chunk":
        chunks.append(_chunk(2, finish=True, usage=FINISHED) if asked else _chunk(2, finish=True))
    else:
        chunks.append(_chunk(2, finish=True, usage=None) if asked else _chunk(2, finish=True))
        if asked:
            choices: list = [{"index": 0, "delta": {}}] if shape == "litellm" else []
            chunks.append({"id": "c", "choices": choices, "usage": FINISHED})
    events = [_event(shape, n, orjson.dumps(c)) for n, c in enumerate(chunks)]
    if shape == "unterminated":  # the last event's blank line never comes
        return b"".join(events).removesuffix(b"\n\n")
    return b"".join([*events, _event(shape, 99, b"[DONE]")])


def _event(shape: str, number: int, payload: bytes) -> bytes:
    if shape == "id and event lines":
        return b"id: %d\nevent: chunk\n: comment\ndata: %b\n\n" % (number, payload)
    if shape == "CRLF":
        return b"data: %b\r\n\r\n" % payload
    if shape == "CR":
        return b"data:%b\r\r" % payload
    if shape == "usage over two data lines" and (cut := payload.find(b'"usage"')) > 0:
        return b"data: %b\ndata: %b\n\n" % (payload[:cut], payload[cut:])
    return b"data: %b\n\n" % payload


SHAPES = [
    "id and event lines",
    "CRLF",
    "CR",
    "usage over two data lines",
    "on the finish chunk",
    "unterminated",
    "litellm",
]


def _cuts(stream: bytes) -> Iterator[list[bytes]]:
    yield [stream[i : i + 1] for i in range(len(stream))]
    for cut in range(1, len(stream)):
        yield [stream[:cut], stream[cut:]]


@pytest.mark.parametrize("shape", SHAPES)
def test_a_client_that_did_not_ask_gets_the_providers_bytes_without_usage(shape: str) -> None:
    sent, unasked = _provider_stream(shape, asked=True), _provider_stream(shape, asked=False)
    if shape == "usage over two data lines":
        # `"usage": null` goes with the line end before it: the chunk is one line again.
        unasked = _provider_stream("plain", asked=False)
    if shape == "unterminated":  # the usage chunk went, with the blank line it lacked
        unasked += b"\n\n"
    for pieces in _cuts(sent):
        body, rec = strip(pieces)
        assert body == unasked, pieces
        assert rec.usage == FINISHED, pieces


@pytest.mark.parametrize("shape", SHAPES)
def test_a_client_that_asked_gets_every_byte_and_is_charged(shape: str) -> None:
    sent = _provider_stream(shape, asked=True)
    for pieces in _cuts(sent):
        rec = record()
        ours = UsageChunks(rec, remove=False)
        body = b"".join(ours.feed(p) for p in pieces) + ours.flush()
        assert body == sent, pieces
        assert rec.usage == FINISHED, pieces


def test_a_provider_that_reports_usage_unasked_keeps_it_on_its_finish_chunk() -> None:
    counts = [{"prompt_tokens": 3, "completion_tokens": n, "total_tokens": 3 + n} for n in (1, 2)]
    events = [
        b"data: " + orjson.dumps(_chunk(0, usage=counts[0])) + b"\n\n",
        b"data: " + orjson.dumps(_chunk(1, finish=True, usage=counts[1])) + b"\n\n",
    ]
    body, rec = strip(events)

    assert body == b"".join(events)
    assert rec.usage == counts[1]
