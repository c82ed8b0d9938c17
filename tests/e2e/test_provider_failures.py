"""A provider's own failures under real gunicorn, with fake providers on loopback: its
refusal of the gateway's key, a provider that takes no `stream_options`, a stream broken
mid-body. Provider `a` is preferred (see test_routing)."""

from __future__ import annotations

import json

import openai
import orjson
import pytest

from tests.constants import GATEWAY_KEY
from tests.e2e.conftest import GatewayFactory
from tests.e2e.test_keys import access_lines
from tests.e2e.test_routing import A_KEY, KEYS, chat, config, models_sent, scrape
from tests.fake_upstream import FakeUpstream, expected_stream

pytestmark = pytest.mark.e2e


def log_lines(text: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_a_provider_refusing_the_gateways_key_falls_back_then_is_a_502_not_the_clients_401(
    start_gateway: GatewayFactory, a: FakeUpstream, b: FakeUpstream
) -> None:
    gateway = start_gateway(config(a.url, b.url), **KEYS)
    a.forced = {"status": 401, "error_body": {"error": {"message": f"Bad key {A_KEY}"}}}
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=GATEWAY_KEY, max_retries=0)
    messages: list[openai.types.chat.ChatCompletionMessageParam] = [
        {"role": "user", "content": "hi"}
    ]

    answer = client.chat.completions.create(model="gpt-4o-mini", messages=messages)
    # qwen-* routes to a alone: nowhere left to go.
    with pytest.raises(openai.InternalServerError) as refused:
        client.chat.completions.create(model="qwen-max", messages=messages)

    assert answer.model == "qwen-plus-intl"  # b answered
    assert refused.value.status_code == 502
    assert "'a'" in refused.value.message and "credentials" in refused.value.message
    assert A_KEY not in str(refused.value.body)
    logs = gateway.logs()
    assert A_KEY not in logs
    errors = [line for line in log_lines(logs) if line.get("level") == "error"]
    assert [line.get("provider") for line in errors] == ["a"]
    assert '"attempts":["a: provider_auth"]' in logs
    # The refusal cooled every deployment of a (its wildcard route's too); with all of
    # qwen-max's cooling, the least recently failed one is still tried, alone.
    cooling = scrape(gateway, "gateway_deployment_cooldown")
    assert cooling[frozenset({("provider", "a"), ("upstream_model", "qwen-*")})] == 1
    assert len(a.requests) == 2 and models_sent(b) == ["qwen-plus-intl"]


def test_a_provider_without_stream_options_gets_none_and_its_usage_is_estimated(
    start_gateway: GatewayFactory, a: FakeUpstream
) -> None:
    strict = f"""
providers:
  a:
    base_url: {a.url}
    api_key_env: A_API_KEY
    stream_usage: false
models:
  "*": a
"""
    gateway = start_gateway(strict, **KEYS)
    body = {"model": "m", "stream": True, "fake": {"chunks": 4}}

    plain = chat(gateway, **body)
    asked = chat(gateway, **body, stream_options={"include_usage": True})

    sent = [orjson.loads(r.body) for r in a.requests]
    assert "stream_options" not in sent[0]
    assert sent[1]["stream_options"] == {"include_usage": True}  # the client's own
    assert plain.content == expected_stream(4, model="m")  # the provider's bytes
    assert asked.content == expected_stream(4, model="m", usage=True)
    access = access_lines(gateway, 2)
    assert [line.get("usage_estimated", False) for line in access] == [True, False]
    assert access[0]["usage"]["completion_tokens"] > 0


def test_streams_broken_mid_body_cool_their_deployment_down(
    start_gateway: GatewayFactory, a: FakeUpstream, b: FakeUpstream
) -> None:
    routing = "routing:\n  failures_before_cooldown: 2\n  cooldown: 300\n"
    gateway = start_gateway(config(a.url, b.url, extra=routing), **KEYS)
    a.forced = {"die_after": 1}
    body = {"model": "gpt-4o-mini", "stream": True, "fake": {"chunks": 3}}

    broken = [chat(gateway, **body).content for _ in range(2)]
    a.forced = {}
    third = chat(gateway, **body)

    assert all(b"tok0" in part and b'"error"' in part for part in broken)  # no retry
    assert third.content == expected_stream(3, model="qwen-plus-intl")  # b, a cools down
    assert len(a.requests) == 2
    cooling = scrape(gateway, "gateway_deployment_cooldown")
    assert cooling[frozenset({("provider", "a"), ("upstream_model", "qwen-plus")})] == 1
