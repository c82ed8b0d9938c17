"""Defects an attacker's review found in the Messages and Responses routes, each pinned."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import msgspec
import orjson
import pytest
import responses
from flask import Flask
from flask.testing import FlaskClient

from gateway import create_app
from gateway.config import Deployment, ModelRoute, Provider, Settings
from gateway.protocols import anthropic
from gateway.stored import MAX_CONVERSATION_BYTES, MemoryBackend, ResponseStore, Stored
from tests.constants import GATEWAY_KEY, SECOND_GATEWAY_KEY, UPSTREAM_KEY

CHAT = "http://chat.test/v1"
NATIVE = "http://native.test/v1"
AUTH = {"Authorization": f"Bearer {GATEWAY_KEY}"}
CHAT_ANSWER = {
    "id": "c1",
    "object": "chat.completion",
    "model": "m",
    "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "hello"}, "finish_reason": "stop"}
    ],
    "usage": {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11},
}


@pytest.fixture
def mixed() -> Iterator[FlaskClient]:
    """One model on two providers: a chat-only one and one serving both dialects itself."""
    chat = Provider(name="chat", base_url=CHAT, api_key=UPSTREAM_KEY)
    native = Provider(
        name="native", base_url=NATIVE, api_key=UPSTREAM_KEY, native=("messages", "responses")
    )
    settings = Settings(
        target_api_key="",
        gateway_api_keys=(GATEWAY_KEY, SECOND_GATEWAY_KEY),
        providers=(chat, native),
        routes=(
            ModelRoute(name="c", deployments=(Deployment(provider="chat"),)),
            ModelRoute(name="n", deployments=(Deployment(provider="native"),)),
            ModelRoute(
                name="both",
                deployments=(Deployment(provider="chat"), Deployment(provider="native")),
            ),
        ),
        rate_limit_per_minute=1000,
        upstream_connect_timeout=1,
        upstream_read_timeout=2,
    )
    app: Flask = create_app(settings)
    yield app.test_client()
    app.extensions["gateway.upstream"].close()


def test_a_conversation_or_item_reference_never_reaches_a_shared_provider_account(
    mixed: FlaskClient,
) -> None:
    with responses.RequestsMock() as upstream:  # any call would fail the test
        conversation = {"model": "n", "input": "hi", "conversation": "conv_of_another_key"}
        answer = mixed.post("/v1/responses", json=conversation, headers=AUTH)
        assert answer.status_code == 400
        assert answer.get_json()["error"]["param"] == "conversation"
        reference = {"model": "n", "input": [{"type": "item_reference", "id": "msg_x"}]}
        answer = mixed.post("/v1/responses", json=reference, headers=AUTH)
        assert answer.status_code == 400
        assert answer.get_json()["error"]["param"] == "input"
        assert not upstream.calls


def test_a_bridged_response_is_continued_only_where_it_can_be_replayed(
    mixed: FlaskClient,
) -> None:
    with responses.RequestsMock() as upstream:
        upstream.post(f"{CHAT}/chat/completions", json=CHAT_ANSWER)
        first = mixed.post("/v1/responses", json={"model": "c", "input": "hi"}, headers=AUTH)
        assert first.status_code == 200
        # The route "both" lists the native provider too: it never made this id.
        for _ in range(6):
            follow = {"model": "both", "input": "again", "previous_response_id": first.json["id"]}
            assert mixed.post("/v1/responses", json=follow, headers=AUTH).status_code == 200
        assert {call.request.url for call in upstream.calls} == {f"{CHAT}/chat/completions"}
        replayed = orjson.loads(upstream.calls[-1].request.body)["messages"]
        assert [m["content"] for m in replayed] == ["hi", "hello", "again"]
        only_native = {"model": "n", "input": "x", "previous_response_id": first.json["id"]}
        refused = mixed.post("/v1/responses", json=only_native, headers=AUTH)
        assert refused.status_code == 400
        assert refused.get_json()["error"]["code"] == "previous_response_not_continuable"


def test_input_items_pages_with_after_and_before(mixed: FlaskClient) -> None:
    items = [
        {"type": "message", "role": "user", "content": f"m{i}", "id": f"msg_{i:02d}"}
        for i in range(30)
    ]
    with responses.RequestsMock() as upstream:
        upstream.post(f"{CHAT}/chat/completions", json=CHAT_ANSWER)
        made = mixed.post("/v1/responses", json={"model": "c", "input": items}, headers=AUTH)
    url = f"/v1/responses/{made.json['id']}/input_items"
    seen: list[str] = []
    after = None
    for _ in range(5):  # bounded: 30 items in pages of 20
        query = {"order": "asc"} | ({"after": after} if after else {})
        page = mixed.get(url, query_string=query, headers=AUTH).get_json()
        seen += [item["id"] for item in page["data"]]
        if not page["has_more"]:
            break
        after = page["last_id"]
    assert seen == [f"msg_{i:02d}" for i in range(30)]
    before = mixed.get(url, query_string={"order": "asc", "before": "msg_03"}, headers=AUTH)
    assert [i["id"] for i in before.get_json()["data"]] == ["msg_00", "msg_01", "msg_02"]
    newest = mixed.get(url, query_string={"limit": "2"}, headers=AUTH).get_json()
    assert [i["id"] for i in newest["data"]] == ["msg_29", "msg_28"]
    assert newest["has_more"] is True


def test_deeply_nested_annotations_are_stored_and_listed_without_a_500(
    mixed: FlaskClient,
) -> None:
    deep: object = []
    for _ in range(600):
        deep = [deep]
    part = {"type": "output_text", "text": "x", "annotations": deep}
    item = {"type": "message", "role": "assistant", "content": [part]}
    with responses.RequestsMock() as upstream:
        upstream.post(f"{CHAT}/chat/completions", json=CHAT_ANSWER)
        body = msgspec.json.encode({"model": "c", "input": [item]})
        made = mixed.post(
            "/v1/responses", data=body, headers={**AUTH, "Content-Type": "application/json"}
        )
    assert made.status_code in (200, 400), made.data
    if made.status_code == 200:
        listed = mixed.get(f"/v1/responses/{made.json['id']}/input_items", headers=AUTH)
        assert listed.status_code == 200


def test_count_tokens_on_a_mixed_route_never_asks_a_chat_provider(mixed: FlaskClient) -> None:
    body = {"model": "both", "messages": [{"role": "user", "content": "hello there"}]}
    headers = {"x-api-key": GATEWAY_KEY}
    with responses.RequestsMock(assert_all_requests_are_fired=False) as upstream:
        upstream.post("http://native.test/v1/messages/count_tokens", status=503, json={})
        for _ in range(6):
            answer = mixed.post("/v1/messages/count_tokens", json=body, headers=headers)
            assert answer.status_code == 200, answer.data
            assert answer.get_json()["input_tokens"] >= 1
        assert all("chat.test" not in call.request.url for call in upstream.calls)


def test_one_key_cannot_evict_every_other_keys_stored_responses() -> None:
    backend = MemoryBackend(4000)
    store = ResponseStore(backend, ttl=60)
    store.put("theirs", Stored(owner="b", model="m", input=[{"t": "x" * 100}]))
    for n in range(50):
        store.put(f"mine-{n}", Stored(owner="a", model="m", input=[{"t": "y" * 100}]))
    assert store.get("theirs", "b") is not None
    assert store.get("mine-49", "a") is not None
    assert store.get("mine-0", "a") is None  # its own oldest went first


def test_a_conversation_too_long_to_replay_is_kept_without_its_history() -> None:
    store = ResponseStore(MemoryBackend(64 * MAX_CONVERSATION_BYTES), ttl=60)
    huge = [{"type": "message", "content": "z" * MAX_CONVERSATION_BYTES}]
    store.put("r", Stored(owner="a", model="m", response={"id": "r"}, conversation=huge))
    kept = store.get("r", "a")
    assert kept is not None
    assert kept.response == {"id": "r"}
    assert kept.conversation is None


def test_a_messages_stream_cut_before_its_end_is_an_error_not_end_turn() -> None:
    translator = anthropic.StreamTranslator(anthropic.Reply(model="m", input_estimate=5))
    out = translator.feed(b'{"choices":[{"index":0,"delta":{"content":"par"}}]}')
    out += translator.finish()  # no finish_reason, no [DONE]: the provider hung up
    assert b"event: error" in out
    assert b"message_stop" not in out
    assert translator.failed


def test_a_messages_stream_with_done_but_no_finish_reason_still_completes() -> None:
    translator = anthropic.StreamTranslator(anthropic.Reply(model="m", input_estimate=5))
    out = translator.feed(b'{"choices":[{"index":0,"delta":{"content":"ok"}}]}')
    out += translator.feed(b"[DONE]") + translator.finish()
    assert b"message_stop" in out
    assert not translator.failed


def _escaped(secret: str) -> str:
    return "".join(f"\\u{ord(c):04x}" for c in secret)


@pytest.mark.parametrize("route", ["/v1/messages", "/v1/responses"])
def test_a_provider_key_sent_escaped_is_masked_once_translated(
    mixed: FlaskClient, route: str
) -> None:
    leak = (
        '{"id":"c1","object":"chat.completion","model":"m","choices":[{"index":0,'
        '"message":{"role":"assistant","content":"key: ' + _escaped(UPSTREAM_KEY) + '"},'
        '"finish_reason":"stop"}]}'
    )
    body = (
        {"model": "c", "max_tokens": 20, "messages": [{"role": "user", "content": "hi"}]}
        if route == "/v1/messages"
        else {"model": "c", "input": "hi"}
    )
    with responses.RequestsMock() as upstream:
        upstream.post(f"{CHAT}/chat/completions", body=leak, content_type="application/json")
        answer = mixed.post(route, json=body, headers=AUTH)
    assert answer.status_code == 200
    assert UPSTREAM_KEY not in answer.get_data(as_text=True)
    assert "key: sk-" in answer.get_data(as_text=True)  # masked, not dropped


@pytest.mark.parametrize("route", ["/v1/messages", "/v1/responses"])
def test_a_provider_ignoring_stream_still_gives_the_client_a_stream(
    mixed: FlaskClient, route: str
) -> None:
    body = (
        {
            "model": "c",
            "max_tokens": 20,
            "stream": True,
            "messages": [{"role": "user", "content": "hi"}],
        }
        if route == "/v1/messages"
        else {"model": "c", "input": "hi", "stream": True}
    )
    with responses.RequestsMock() as upstream:
        upstream.post(f"{CHAT}/chat/completions", json=CHAT_ANSWER)
        answer = mixed.post(route, json=body, headers=AUTH)
    assert answer.status_code == 200
    assert answer.mimetype == "text/event-stream"
    text = answer.get_data(as_text=True)
    assert "hello" in text
    last = "message_stop" if route == "/v1/messages" else "response.completed"
    assert text.rstrip().splitlines()[-2].endswith(last) or last in text.rstrip().splitlines()[-1]


def test_reading_a_stored_native_response_is_not_charged_again(mixed: FlaskClient) -> None:
    native = {
        "id": "resp_native_1",
        "object": "response",
        "status": "completed",
        "output": [],
        "usage": {"input_tokens": 500, "output_tokens": 700, "total_tokens": 1200},
    }
    app = mixed.application
    with responses.RequestsMock() as upstream:
        upstream.post(f"{NATIVE}/responses", json=native)
        upstream.get(f"{NATIVE}/responses/resp_native_1", json=native)
        made = mixed.post("/v1/responses", json={"model": "n", "input": "hi"}, headers=AUTH)
        assert made.status_code == 200
        made.close()  # the request is logged and counted when its response is closed
        got = mixed.get("/v1/responses/resp_native_1", headers=AUTH)
        assert got.status_code == 200
        got.close()
        assert len(upstream.calls) == 2
    tokens = app.extensions["gateway.metrics"].tokens
    samples = {
        s.labels["kind"]: s.value
        for metric in tokens.collect()
        for s in metric.samples
        if s.name.endswith("_total")
    }
    assert samples.get("prompt") == 500
    assert samples.get("completion") == 700


def _sse(*payloads: bytes) -> bytes:
    return b"".join(b"data: " + p + b"\n\n" for p in payloads)


FIRST = b'{"choices":[{"index":0,"delta":{"role":"assistant","content":"par"}}]}'


@pytest.mark.parametrize("route", ["/v1/messages", "/v1/responses"])
@pytest.mark.parametrize(
    "stream",
    [
        _sse(FIRST, b'{"error":{"message":"overloaded mid-way"}}'),  # an error chunk
        _sse(FIRST),  # the provider hung up: no finish_reason, no [DONE]
    ],
    ids=["error-chunk", "cut"],
)
def test_a_stream_the_provider_failed_is_its_failure_not_a_success(
    mixed: FlaskClient, route: str, stream: bytes
) -> None:
    body = (
        {
            "model": "c",
            "max_tokens": 20,
            "stream": True,
            "messages": [{"role": "user", "content": "hi"}],
        }
        if route == "/v1/messages"
        else {"model": "c", "input": "hi", "stream": True}
    )
    app = mixed.application
    with responses.RequestsMock() as upstream:
        upstream.post(f"{CHAT}/chat/completions", body=stream, content_type="text/event-stream")
        answer = mixed.post(route, json=body, headers=AUTH)
        text = answer.get_data(as_text=True)
        answer.close()
    assert "par" in text
    assert ("event: error" in text) if route == "/v1/messages" else ("response.failed" in text)
    errors = app.extensions["gateway.metrics"].upstream_errors
    kinds = {s.labels["kind"] for m in errors.collect() for s in m.samples if s.value}
    assert kinds == {"stream_broken"}


@pytest.mark.parametrize("route", ["/v1/messages", "/v1/responses"])
def test_a_provider_key_streamed_escaped_is_masked_once_translated(
    mixed: FlaskClient, route: str
) -> None:
    half = len(UPSTREAM_KEY) // 2
    pieces = [
        b'{"choices":[{"index":0,"delta":{"content":"key: '
        + _escaped(UPSTREAM_KEY[:half]).encode()
        + b'"}}]}',
        b'{"choices":[{"index":0,"delta":{"content":"'
        + _escaped(UPSTREAM_KEY[half:]).encode()
        + b'"}}]}',
        b'{"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}',
        b"[DONE]",
    ]
    body = (
        {
            "model": "c",
            "max_tokens": 20,
            "stream": True,
            "messages": [{"role": "user", "content": "hi"}],
        }
        if route == "/v1/messages"
        else {"model": "c", "input": "hi", "stream": True, "store": False}
    )
    with responses.RequestsMock() as upstream:
        upstream.post(
            f"{CHAT}/chat/completions", body=_sse(*pieces), content_type="text/event-stream"
        )
        answer = mixed.post(route, json=body, headers=AUTH)
        text = answer.get_data(as_text=True)
    # The key never appears whole, in a delta or in the final object that repeats the text.
    assert UPSTREAM_KEY not in text


def test_a_deployments_max_output_tokens_caps_a_translated_max_tokens(
    make_app: Callable[..., Flask],
) -> None:
    chat = Provider(name="chat", base_url=CHAT, api_key=UPSTREAM_KEY)
    route = ModelRoute(
        name="claude-*",
        deployments=(Deployment(provider="chat", model="qwen-max", max_output_tokens=8192),),
    )
    client = make_app(target_api_key="", providers=(chat,), routes=(route,)).test_client()
    body = {
        "model": "claude-opus-5",
        "max_tokens": 64000,
        "messages": [{"role": "user", "content": "hi"}],
    }
    with responses.RequestsMock() as upstream:
        upstream.post(f"{CHAT}/chat/completions", json=CHAT_ANSWER)
        assert client.post("/v1/messages", json=body, headers=AUTH).status_code == 200
        sent = orjson.loads(upstream.calls[0].request.body)
    assert sent["model"] == "qwen-max"
    assert sent["max_tokens"] == 8192


def test_claude_codes_max_tokens_is_held_as_the_deployments_cap_not_64000(
    make_app: Callable[..., Flask],
) -> None:
    import hashlib

    from gateway.config import KeyPolicy

    key = "team-claude-0123456789"
    digest = hashlib.sha256(key.encode()).hexdigest()
    team = KeyPolicy.model_validate(
        {"name": "claude", "key": f"sha256:{digest}", "tokens_per_day": 20_000}
    )
    chat = Provider(name="chat", base_url=CHAT, api_key=UPSTREAM_KEY)

    def client_for(cap: int | None) -> FlaskClient:
        deployment = Deployment(provider="chat", model="qwen-max", max_output_tokens=cap)
        route = ModelRoute(name="claude-*", deployments=(deployment,))
        app = make_app(target_api_key="", providers=(chat,), routes=(route,), key_policies=(team,))
        return app.test_client()

    body = {
        "model": "claude-opus-5",
        "max_tokens": 64000,
        "messages": [{"role": "user", "content": "hi"}],
    }
    headers = {"x-api-key": key}
    with responses.RequestsMock(assert_all_requests_are_fired=False) as upstream:
        upstream.post(f"{CHAT}/chat/completions", json=CHAT_ANSWER)
        # 64,000 may never fit a 20,000-token day; the 8,192 the deployment gives does.
        assert client_for(None).post("/v1/messages", json=body, headers=headers).status_code == 429
        assert client_for(8192).post("/v1/messages", json=body, headers=headers).status_code == 200
