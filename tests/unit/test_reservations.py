"""What a request is admitted with: the members it is read by, and its worst case reserved.

A request reserves its estimated prompt plus `max_tokens` for each of its `n` (or
`best_of`) choices, whatever the form of those numbers; one whose worst case is more than
is left of a day or month quota is refused before any upstream call. A body with a member
twice is refused: the gateway would check one and the provider might serve the other.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from typing import Any

import pytest
import responses
from flask.testing import FlaskClient
from requests import PreparedRequest

from gateway.config import KeyPolicy
from gateway.policy.usage import reservation, tokens_for
from gateway.record import MAX_REPORTED_TOKENS
from tests.constants import UNIT_UPSTREAM
from tests.unit.support import MakeApp, assert_openai_error

KEY = "team-r-key-0123456789"
TEAM = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
CHAT = "/v1/chat/completions"
UPSTREAM_CHAT = f"{UNIT_UPSTREAM}/chat/completions"
UPSTREAM_COMPLETIONS = f"{UNIT_UPSTREAM}/completions"
QUOTA_DAY = 'gateway_key_quota_used_tokens{key="team-r",window="day"}'


def policy(**fields: Any) -> KeyPolicy:
    digest = hashlib.sha256(KEY.encode()).hexdigest()
    return KeyPolicy.model_validate({"name": "team-r", "key": f"sha256:{digest}", **fields})


def post(client: FlaskClient, body: bytes | dict[str, Any], path: str = CHAT) -> Any:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = client.post(path, data=raw, headers=TEAM)
    response.close()  # as a server does: the tokens are settled
    return response


def used_today(client: FlaskClient) -> float:
    scraped = client.get("/metrics").get_data(as_text=True)
    line = next(x for x in scraped.splitlines() if x.startswith(QUOTA_DAY))
    return float(line.rsplit(" ", 1)[1])


# --- item 4: n and best_of --------------------------------------------------------------
def test_a_reservation_holds_max_tokens_for_every_choice_capped() -> None:
    assert reservation(400, 9000, 50) == tokens_for(400) + 450_000
    assert reservation(400, 9000) == tokens_for(400) + 9000
    assert reservation(400, 10**10, 10**10) == tokens_for(400) + MAX_REPORTED_TOKENS


@pytest.mark.parametrize(
    ("path", "member"), [(CHAT, "n"), ("/v1/completions", "best_of"), ("/v1/completions", "n")]
)
def test_n_or_best_of_beyond_the_quota_is_refused_without_an_upstream_call(
    make_app: MakeApp, upstream: responses.RequestsMock, path: str, member: str
) -> None:
    usage = {"prompt_tokens": 10, "completion_tokens": 9000, "total_tokens": 9010}
    upstream.post(UPSTREAM_CHAT, json={"id": "c", "usage": usage})
    upstream.post(UPSTREAM_COMPLETIONS, json={"id": "c", "usage": usage})
    client = make_app(key_policies=(policy(tokens_per_day=100_000),)).test_client()
    request = {"model": "qwen-plus", "prompt": "hi", "max_tokens": 9000}

    refused = post(client, {**request, member: 50}, path)
    admitted = post(client, {**request, member: 5}, path)

    error = assert_openai_error(refused, 429, "insufficient_quota")
    assert "450000" in error["message"] and "100000 left" in error["message"]
    assert refused.headers["x-should-retry"] == "false"
    assert admitted.status_code == 200 and len(upstream.calls) == 1
    assert used_today(client) == 9010  # the refusal's reservation was released


def test_concurrent_requests_with_n_never_use_more_than_the_quota(
    make_app: MakeApp, upstream: responses.RequestsMock
) -> None:
    def answer(request: PreparedRequest) -> tuple[int, dict[str, str], str]:
        time.sleep(0.2)  # all 20 are in flight together
        usage = {"prompt_tokens": 10, "completion_tokens": 18_000, "total_tokens": 18_010}
        return 200, {}, json.dumps({"id": "c", "usage": usage})

    upstream.add_callback(responses.POST, UPSTREAM_CHAT, callback=answer)
    app = make_app(key_policies=(policy(tokens_per_day=100_000),))
    request = {"model": "qwen-plus", "messages": [], "n": 2, "max_tokens": 9000}
    statuses: list[int] = []
    threads = [
        threading.Thread(
            target=lambda: statuses.append(post(app.test_client(), request).status_code)
        )
        for _ in range(20)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)

    # Five of 18,000 fit in 100,000, a sixth does not: never 54 times the quota.
    assert sorted(statuses) == [200] * 5 + [429] * 15
    assert len(upstream.calls) == 5
    assert used_today(app.test_client()) == 5 * 18_010 <= 100_000


# --- item 5: any integer max_tokens ------------------------------------------------------
@pytest.mark.parametrize(
    "max_tokens", [b"10000000000", b"1" + b"0" * 5000, b"1e10", b'"10000000000"', b"151.0"]
)
def test_a_huge_max_tokens_on_a_small_quota_is_refused(
    make_app: MakeApp, upstream: responses.RequestsMock, max_tokens: bytes
) -> None:
    upstream.post(UPSTREAM_CHAT, json={"id": "c", "usage": {"total_tokens": 100}})
    app = make_app(key_policies=(policy(tokens_per_day=150),))
    body = b'{"model":"qwen-plus","messages":[],"max_tokens":' + max_tokens + b"}"
    statuses: list[int] = []
    threads = [
        threading.Thread(target=lambda: statuses.append(post(app.test_client(), body).status_code))
        for _ in range(8)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)

    assert statuses == [429] * 8 and not upstream.calls
    fits = post(app.test_client(), b'{"model":"qwen-plus","messages":[],"max_tokens":100}')
    assert fits.status_code == 200


def test_messages_reserve_their_max_tokens_against_the_quota_too(
    make_app: MakeApp, upstream: responses.RequestsMock
) -> None:
    client = make_app(key_policies=(policy(tokens_per_day=150),)).test_client()
    body = {
        "model": "qwen-plus",
        "max_tokens": 10**10,
        "messages": [{"role": "user", "content": "hi"}],
    }

    refused = client.post("/v1/messages", json=body, headers=TEAM)

    assert refused.status_code == 429 and not upstream.calls


# --- item 6: a member twice ---------------------------------------------------------------
@pytest.mark.parametrize(
    "body",
    [
        b'{"model":"denied","messages":[],"model":"qwen-plus"}',
        b'{"model":"qwen-plus","messages":[],"model":"qwen-plus"}',  # even the same value
        b'{"m\\u006fdel":"denied","messages":[],"model":"qwen-plus"}',  # an escaped name
        b'{"model":"qwen-plus","max_tokens":100000,"messages":[],"max_tokens":1}',
        b'{"model":"qwen-plus","stream":true,"stream":false}',
        b'{"model":"qwen-plus","n":1 , "n" : 12}',
        b'{"model":"qwen-plus","messages":[{"a":"}"}],"messages":[]}',
    ],
)
def test_a_body_with_a_member_twice_is_refused_before_any_upstream_call(
    make_app: MakeApp, upstream: responses.RequestsMock, body: bytes
) -> None:
    client = make_app(key_policies=(policy(models=["qwen-plus"]),)).test_client()

    refused = post(client, body)

    error = assert_openai_error(refused, 400, "duplicate_member")
    assert "more than once" in error["message"] and error["param"] in body.decode()
    assert not upstream.calls


def test_names_repeated_below_the_top_level_are_the_providers(
    make_app: MakeApp, upstream: responses.RequestsMock
) -> None:
    upstream.post(UPSTREAM_CHAT, json={"id": "c"})
    client = make_app(key_policies=(policy(models=["qwen-plus"]),)).test_client()
    body = (
        b'{ "model" : "qwen-plus" , "messages":[{"role":"user","content":"a","model":"x"},'
        b'{"role":"user","content":"b","model":"y"}], "tools" : [] }'
    )

    assert post(client, body).status_code == 200
    assert upstream.calls[0].request.body == body  # relayed as sent


# --- item 7: one number -------------------------------------------------------------------
def test_usage_in_exponent_form_is_charged_and_logged_as_one_number(
    make_app: MakeApp, upstream: responses.RequestsMock, capsys: pytest.CaptureFixture[str]
) -> None:
    # A provider whose total is off, in numbers Python's json reads as floats.
    answer = b'{"id":"c","usage":{"prompt_tokens":1.2e3,"completion_tokens":30.0,"total_tokens":5}}'
    upstream.post(UPSTREAM_CHAT, body=answer, content_type="application/json")
    client = make_app(key_policies=(policy(tokens_per_day=100_000),)).test_client()

    assert post(client, {"model": "qwen-plus", "messages": []}).status_code == 200

    line = next(json.loads(x) for x in capsys.readouterr().out.splitlines() if '"access"' in x)
    assert line["usage"] == {"prompt_tokens": 1200, "completion_tokens": 30, "total_tokens": 1230}
    assert used_today(client) == 1230


def test_a_replayed_conversation_is_prompt_the_key_reserves_and_is_charged_for(
    make_app: MakeApp, upstream: responses.RequestsMock
) -> None:
    # No usage from the provider: the charge is the estimate, which must include the
    # stored turns the gateway replays for previous_response_id, not only the tiny body.
    answer = {
        "id": "c",
        "object": "chat.completion",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}
        ],
    }
    upstream.post(UPSTREAM_CHAT, json=answer)
    client = make_app(key_policies=(policy(tokens_per_day=1_000_000),)).test_client()
    first = post(client, {"model": "qwen-plus", "input": "x" * 40_000}, "/v1/responses")
    assert first.status_code == 200
    after_first = used_today(client)
    follow = {"model": "qwen-plus", "input": "y", "previous_response_id": first.json["id"]}
    assert post(client, follow, "/v1/responses").status_code == 200
    assert used_today(client) - after_first >= 10_000  # the 40 KB replayed, not 100 bytes


def test_a_body_of_a_million_top_level_members_is_refused_before_they_are_walked(
    make_app: MakeApp, upstream: responses.RequestsMock
) -> None:
    members = b",".join(b'"%d":0' % i for i in range(200_000))
    body = b'{"model":"qwen-plus","messages":[],' + members + b"}"
    started = time.monotonic()
    refused = post(make_app(key_policies=(policy(),)).test_client(), body)
    assert refused.status_code == 400 and not upstream.calls
    assert "top-level members" in refused.get_json()["error"]["message"]
    assert time.monotonic() - started < 5  # the walk alone took ~0.5 s per 200,000


@pytest.mark.parametrize(
    ("prompt", "reserved_output"),
    [
        (["a"] * 500, 500 * 4000),  # 500 prompts: 500 completions
        ([[1, 2], [3, 4]], 2 * 4000),  # two prompts as token lists
        ([1, 2, 3], 4000),  # one prompt as tokens
        ("one", 4000),
    ],
)
def test_a_completions_prompt_list_reserves_a_completion_for_each(
    make_app: MakeApp, upstream: responses.RequestsMock, prompt: object, reserved_output: int
) -> None:
    upstream.post(f"{UNIT_UPSTREAM}/completions", json={"id": "c", "choices": []})
    client = make_app(key_policies=(policy(tokens_per_day=1_000_000),)).test_client()
    body = {"model": "qwen-plus", "prompt": prompt, "max_tokens": 4000}
    answer = post(client, body, "/v1/completions")
    if reserved_output > 1_000_000:  # more than the whole day's quota: refused unsent
        assert answer.status_code == 429 and not upstream.calls
    else:
        assert answer.status_code == 200 and len(upstream.calls) == 1
