"""What depends on the provider: its refusal of the gateway's key (401/403), whether it
takes `stream_options` (stream_usage), and streams it breaks after their first chunk."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import responses
from flask import Flask

from gateway.config import Deployment, ModelRoute, Provider, RoutingPolicy
from tests.fake_upstream import expected_stream
from tests.unit.support import MakeApp, ScriptedAnswer, assert_openai_error

CHAT = "/v1/chat/completions"
A_URL, B_URL = "http://provider-a.test/v1", "http://provider-b.test/v1"
A_KEY, B_KEY = "sk-provider-a-0123456789abcdef", "sk-provider-b-fedcba9876543210"
ANSWER = b'{"id":"chatcmpl-1","object":"chat.completion","model":"qwen-plus","choices":[]}'
# The provider's refusal, echoing the key it was sent (as some do).
REFUSAL = json.dumps({"error": {"message": f"Incorrect API key provided: {A_KEY}"}}).encode()


def build(
    make_app: MakeApp, *, a_usage: bool = True, b_usage: bool = True, **routing: Any
) -> Flask:
    """`gpt-4o-mini` → a then b; `qwen-*` → a alone."""
    providers = (
        Provider(name="a", base_url=A_URL, api_key=A_KEY, stream_usage=a_usage),
        Provider(name="b", base_url=B_URL, api_key=B_KEY, stream_usage=b_usage),
    )
    routes = (
        ModelRoute(
            name="gpt-4o-mini",
            deployments=(
                Deployment(provider="a", model="qwen-plus", weight=1000),
                Deployment(provider="b", model="qwen-plus-intl", weight=0.001),
            ),
        ),
        ModelRoute(name="qwen-*", deployments=(Deployment(provider="a"),)),
    )
    app = make_app(providers=providers, routes=routes, routing=RoutingPolicy(**routing))
    app.extensions["gateway.upstream"].router._random.random = lambda: 0.0  # a first
    return app


@pytest.fixture
def upstream() -> Iterator[responses.RequestsMock]:
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        yield mock


def lines(capsys: pytest.CaptureFixture[str]) -> list[dict[str, Any]]:
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


@pytest.mark.parametrize("status", [401, 403])
def test_a_provider_refusing_the_gateways_key_falls_back(
    make_app: MakeApp,
    auth: dict[str, str],
    upstream: responses.RequestsMock,
    capsys: pytest.CaptureFixture[str],
    status: int,
) -> None:
    app = build(make_app)
    upstream.post(f"{A_URL}/chat/completions", status=status, body=REFUSAL)
    upstream.post(f"{B_URL}/chat/completions", body=ANSWER, content_type="application/json")

    response = app.test_client().post(
        CHAT, json={"model": "gpt-4o-mini", "messages": []}, headers=auth
    )
    response.close()  # the access line is written once the answer has ended

    assert response.status_code == 200
    assert response.data == ANSWER
    assert len(upstream.calls) == 2
    (access,) = [line for line in lines(capsys) if line.get("event") == "access"]
    assert access["attempts"] == ["a: provider_auth"]


@pytest.mark.parametrize("status", [401, 403])
def test_with_nowhere_left_a_refusal_is_the_gateways_502(
    make_app: MakeApp,
    auth: dict[str, str],
    upstream: responses.RequestsMock,
    capsys: pytest.CaptureFixture[str],
    status: int,
) -> None:
    app = build(make_app)
    upstream.post(f"{A_URL}/chat/completions", status=status, body=REFUSAL)

    response = app.test_client().post(
        CHAT, json={"model": "qwen-max", "messages": []}, headers=auth
    )
    response.close()

    error = assert_openai_error(response, 502, code="provider_auth_failed")
    assert "'a'" in error["message"] and "credentials" in error["message"]
    logged = lines(capsys)
    errors = [line for line in logged if line["level"] == "error"]
    assert len(errors) == 1
    assert errors[0]["provider"] == "a"
    everything = response.get_data(as_text=True) + json.dumps(logged)
    assert A_KEY not in everything and A_KEY[-4:] not in response.get_data(as_text=True)
    (access,) = [line for line in logged if line.get("event") == "access"]
    assert (access["status"], access["upstream_status"]) == (502, status)
    assert access["upstream_error"] == "provider_auth"


def test_a_refusal_is_a_502_too_when_5xx_does_not_fall_back(
    make_app: MakeApp, auth: dict[str, str], upstream: responses.RequestsMock
) -> None:
    app = build(make_app, fallback_on=("connect", "timeout", "429"))
    upstream.post(f"{A_URL}/chat/completions", status=401, body=REFUSAL)
    upstream.post(f"{B_URL}/chat/completions", body=ANSWER, content_type="application/json")

    response = app.test_client().post(
        CHAT, json={"model": "gpt-4o-mini", "messages": []}, headers=auth
    )

    assert_openai_error(response, 502, code="provider_auth_failed")
    assert len(upstream.calls) == 1  # b was not tried


def test_a_refusal_cools_every_deployment_of_that_provider(
    make_app: MakeApp, auth: dict[str, str], upstream: responses.RequestsMock
) -> None:
    app = build(make_app)
    upstream.post(f"{A_URL}/chat/completions", status=401, body=REFUSAL)
    upstream.post(f"{B_URL}/chat/completions", body=ANSWER, content_type="application/json")
    client = app.test_client()

    first = client.post(CHAT, json={"model": "gpt-4o-mini", "messages": []}, headers=auth)
    second = client.post(CHAT, json={"model": "gpt-4o-mini", "messages": []}, headers=auth)

    assert (first.status_code, second.status_code) == (200, 200)
    urls = [c.request.url for c in upstream.calls]
    assert urls == [f"{A_URL}/chat/completions"] + [f"{B_URL}/chat/completions"] * 2
    cooling = app.extensions["gateway.upstream"].router.cooling()
    assert sorted(cooling) == [("a", "qwen-*"), ("a", "qwen-plus")]


@pytest.mark.parametrize(("a_usage", "b_usage"), [(True, False), (False, True)])
def test_usage_is_asked_for_only_of_providers_that_take_stream_options(
    make_app: MakeApp,
    auth: dict[str, str],
    upstream: responses.RequestsMock,
    capsys: pytest.CaptureFixture[str],
    a_usage: bool,
    b_usage: bool,
) -> None:
    # a fails, b answers: what b was sent, and what the client gets, follow b's setting.
    app = build(make_app, a_usage=a_usage, b_usage=b_usage)
    upstream.post(f"{A_URL}/chat/completions", status=500, body=b'{"error":"oops"}')
    sent_by_b = expected_stream(3, model="qwen-plus-intl", usage=b_usage)
    upstream.post(f"{B_URL}/chat/completions", body=sent_by_b, content_type="text/event-stream")
    body = {"model": "gpt-4o-mini", "messages": [], "stream": True}

    response = app.test_client().post(CHAT, json=body, headers=auth)
    relayed = response.get_data()
    response.close()

    to_a, to_b = (json.loads(call.request.body) for call in upstream.calls)
    assert ("stream_options" in to_a) is a_usage
    assert ("stream_options" in to_b) is b_usage
    assert relayed == expected_stream(3, model="qwen-plus-intl")  # the usage chunk never shows
    (access,) = [line for line in lines(capsys) if line.get("event") == "access"]
    assert access.get("usage_estimated", False) is not b_usage


def test_a_client_asking_for_usage_itself_still_gets_it_from_such_a_provider(
    make_app: MakeApp, auth: dict[str, str], upstream: responses.RequestsMock
) -> None:
    app = build(make_app, a_usage=False)
    sent = expected_stream(2, model="qwen-plus", usage=True)
    upstream.post(f"{A_URL}/chat/completions", body=sent, content_type="text/event-stream")
    options = {"include_usage": True}
    body = {"model": "qwen-plus", "messages": [], "stream": True, "stream_options": options}

    response = app.test_client().post(CHAT, json=body, headers=auth)

    assert json.loads(upstream.calls[0].request.body)["stream_options"] == options
    assert response.get_data() == sent


FIRST = b'data: {"choices":[{"delta":{"content":"tok0"}}]}\n\n'


def stream_once(app: Flask, auth: dict[str, str]) -> bytes:
    body = {"model": "gpt-4o-mini", "messages": [], "stream": True}
    response = app.test_client().post(CHAT, json=body, headers=auth)
    relayed = response.get_data()  # read to its end (or its break), then ended
    response.close()
    return relayed


def test_streams_broken_after_their_first_chunk_cool_their_deployment_down(
    make_app: MakeApp, auth: dict[str, str], upstream: responses.RequestsMock
) -> None:
    app = build(make_app, failures_before_cooldown=2)
    for _ in range(2):
        upstream.add(ScriptedAnswer("POST", f"{A_URL}/chat/completions", [FIRST], OSError()))
    upstream.add(ScriptedAnswer("POST", f"{B_URL}/chat/completions", [FIRST]))

    broken = [stream_once(app, auth), stream_once(app, auth)]
    third = stream_once(app, auth)

    assert all(b.startswith(FIRST) and b'"error"' in b for b in broken)  # never retried
    assert third == FIRST
    urls = [c.request.url for c in upstream.calls]
    assert urls == [f"{A_URL}/chat/completions"] * 2 + [f"{B_URL}/chat/completions"]
    assert app.extensions["gateway.upstream"].router.cooling() == [("a", "qwen-plus")]


def test_a_broken_stream_counts_once_and_a_finished_one_resets_the_count(
    make_app: MakeApp, auth: dict[str, str], upstream: responses.RequestsMock
) -> None:
    app = build(make_app, failures_before_cooldown=2)
    upstream.add(ScriptedAnswer("POST", f"{A_URL}/chat/completions", [FIRST], OSError()))
    upstream.add(ScriptedAnswer("POST", f"{A_URL}/chat/completions", [FIRST]))
    router = app.extensions["gateway.upstream"].router

    assert b'"error"' in stream_once(app, auth)
    after_break = (router._health[("a", "qwen-plus")].failures, router.cooling())
    assert stream_once(app, auth) == FIRST

    # Once, though the attempt was an "ok" at its first chunk and a failure at the break:
    # counted twice, 2 failures in a row would have cooled it.
    assert after_break == (1, [])
    assert router._health[("a", "qwen-plus")].failures == 0  # a stream that ended well
