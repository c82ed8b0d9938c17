"""Several providers behind one gateway, under real gunicorn: fake providers on loopback.

Provider `a` is the preferred one (weight 1000 against 0.001: b comes first about once in
a million requests), so that each test knows where a request goes first.
"""

from __future__ import annotations

import time

import openai
import orjson
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.constants import GATEWAY_KEY
from tests.e2e.conftest import Gateway, GatewayFactory, free_port
from tests.e2e.test_keys import access_lines
from tests.fake_upstream import FakeUpstream, expected_stream

pytestmark = pytest.mark.e2e

A_KEY = "sk-provider-a-e2e-0123456789abcdef"
B_KEY = "sk-provider-b-e2e-fedcba9876543210"
KEYS = {"A_API_KEY": A_KEY, "B_API_KEY": B_KEY, "RATE_LIMIT_REQUESTS_PER_MINUTE": "0"}
AUTH = {"Authorization": f"Bearer {GATEWAY_KEY}"}


def config(a_url: str, b_url: str, *, a_kind: str = "openai-compatible", extra: str = "") -> str:
    return f"""
providers:
  a:
    base_url: {a_url}
    api_key_env: A_API_KEY
    kind: {a_kind}
    connect_timeout: 2
  b:
    base_url: {b_url}
    api_key: ${{B_API_KEY}}
models:
  gpt-4o-mini:
    - {{provider: a, model: qwen-plus, weight: 1000}}
    - {{provider: b, model: qwen-plus-intl, weight: 0.001}}
  qwen-*: a
{extra}
"""


def refusing_url() -> str:
    """A loopback port nothing listens on: connections are refused at once."""
    return f"http://127.0.0.1:{free_port()}/v1"


def chat(gateway: Gateway, **body: object) -> requests.Response:
    payload = {"messages": [{"role": "user", "content": "hi"}], **body}
    return requests.post(
        gateway.url + "/v1/chat/completions", json=payload, headers=AUTH, timeout=30
    )


def models_sent(upstream: FakeUpstream) -> list[str]:
    return [orjson.loads(r.body)["model"] for r in upstream.requests if r.method == "POST"]


def scrape(gateway: Gateway, name: str) -> dict[frozenset, float]:
    text = requests.get(gateway.url + "/metrics", timeout=10).text
    return {
        frozenset(s.labels.items()): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name
    }


def test_an_alias_rewrites_the_model_upstream_and_not_the_answer(
    start_gateway: GatewayFactory, a: FakeUpstream, b: FakeUpstream
) -> None:
    gateway = start_gateway(config(a.url, b.url), **KEYS)

    response = chat(gateway, model="gpt-4o-mini")

    assert response.status_code == 200
    assert models_sent(a) == ["qwen-plus"]
    # The provider's bytes: it answered as the model it was asked for.
    assert response.json()["model"] == "qwen-plus"
    assert a.requests[0].headers["authorization"] == f"Bearer {A_KEY}"
    assert b.requests == []


def test_weights_split_the_requests(
    start_gateway: GatewayFactory, a: FakeUpstream, b: FakeUpstream
) -> None:
    routes = "  split:\n    - {provider: a, weight: 3}\n    - {provider: b, weight: 1}\n"
    gateway = start_gateway(config(a.url, b.url, extra=routes), **KEYS)
    total = 200

    statuses = [chat(gateway, model="split").status_code for _ in range(total)]

    assert statuses == [200] * total
    share = len(a.requests) / total
    # Binomial(200, 0.75): mean 150, sd 6.1; 0.62-0.88 is more than 4 sd either side.
    assert 0.62 <= share <= 0.88, share
    assert len(a.requests) + len(b.requests) == total


def test_a_provider_refusing_connections_falls_back_for_json_and_streams(
    start_gateway: GatewayFactory, b: FakeUpstream
) -> None:
    gateway = start_gateway(config(refusing_url(), b.url), **KEYS)

    answered = chat(gateway, model="gpt-4o-mini")
    with requests.post(
        gateway.url + "/v1/chat/completions",
        json={"model": "gpt-4o-mini", "stream": True, "fake": {"chunks": 4}},
        headers=AUTH,
        stream=True,
        timeout=30,
    ) as streamed:
        body = streamed.raw.read()

    assert answered.status_code == 200
    assert answered.json()["model"] == "qwen-plus-intl"
    assert streamed.status_code == 200
    assert body == expected_stream(4, model="qwen-plus-intl")
    assert models_sent(b) == ["qwen-plus-intl", "qwen-plus-intl"]
    assert '"attempts":["a: connect"]' in gateway.logs()
    fallbacks = scrape(gateway, "gateway_fallbacks_total")
    assert (
        fallbacks[frozenset({("provider", "a"), ("model", "gpt-4o-mini"), ("reason", "connect")})]
        == 2
    )


def test_a_429_falls_back_and_the_provider_is_skipped_until_its_cooldown_ends(
    start_gateway: GatewayFactory, a: FakeUpstream, b: FakeUpstream
) -> None:
    gateway = start_gateway(config(a.url, b.url), **KEYS)
    a.forced = {"status": 429, "headers": {"Retry-After": "2"}}

    first = chat(gateway, model="gpt-4o-mini")
    second = chat(gateway, model="gpt-4o-mini")
    cooling = scrape(gateway, "gateway_deployment_cooldown")

    assert (first.status_code, second.status_code) == (200, 200)
    assert len(a.requests) == 1  # the second request never went to a
    assert models_sent(b) == ["qwen-plus-intl", "qwen-plus-intl"]
    assert cooling[frozenset({("provider", "a"), ("upstream_model", "qwen-plus")})] == 1

    a.forced = {}
    for _ in range(100):  # Retry-After is 2 s: a is tried again once it has passed
        if a.requests[1:]:
            break
        time.sleep(0.1)
        assert chat(gateway, model="gpt-4o-mini").status_code == 200
    assert models_sent(a) == ["qwen-plus", "qwen-plus"]
    assert (
        scrape(gateway, "gateway_deployment_cooldown")[
            frozenset({("provider", "a"), ("upstream_model", "qwen-plus")})
        ]
        == 0
    )


def test_a_stream_that_breaks_after_its_first_chunk_is_not_retried(
    start_gateway: GatewayFactory, a: FakeUpstream, b: FakeUpstream
) -> None:
    gateway = start_gateway(config(a.url, b.url), **KEYS)
    a.forced = {"die_after": 1}

    with requests.post(
        gateway.url + "/v1/chat/completions",
        json={"model": "gpt-4o-mini", "stream": True, "fake": {"chunks": 5}},
        headers=AUTH,
        stream=True,
        timeout=30,
    ) as response:
        events = [line for line in response.iter_lines() if line]

    assert response.status_code == 200
    assert b"tok0" in events[0]
    assert orjson.loads(events[-1].removeprefix(b"data: "))["error"]["code"]
    assert len(events) == 2
    assert b.requests == []


@pytest.mark.parametrize("framing", ["chunked", "close"])
def test_a_stream_that_ends_before_its_first_chunk_falls_back(
    start_gateway: GatewayFactory, a: FakeUpstream, b: FakeUpstream, framing: str
) -> None:
    gateway = start_gateway(config(a.url, b.url), **KEYS)
    # Status line and headers, then the connection closes before any event.
    a.forced = {"close_after": 0, "framing": framing}

    response = chat(gateway, model="gpt-4o-mini", stream=True, fake={"chunks": 3})

    assert response.status_code == 200
    assert response.content == expected_stream(3, model="qwen-plus-intl")
    assert len(a.requests) == 1 and len(b.requests) == 1
    # The access line is written once the answer has ended, just after its last byte.
    (line,) = access_lines(gateway, 1)
    assert line["attempts"] == ["a: stream_broken"]


def test_a_stream_that_ends_before_its_first_chunk_with_nowhere_to_go_is_a_502(
    start_gateway: GatewayFactory, a: FakeUpstream, b: FakeUpstream
) -> None:
    gateway = start_gateway(config(a.url, b.url), **KEYS)
    a.forced = {"close_after": 0}

    # qwen-* routes to a alone: nothing to fall back to, and nothing was sent yet.
    response = chat(gateway, model="qwen-max", stream=True)

    assert response.status_code == 502
    assert response.headers["Content-Type"] == "application/json"
    assert response.json()["error"]["message"] == (
        "The upstream closed the stream before it was complete."
    )
    assert b.requests == []


def test_a_400_is_relayed_without_fallback(
    start_gateway: GatewayFactory, a: FakeUpstream, b: FakeUpstream
) -> None:
    gateway = start_gateway(config(a.url, b.url), **KEYS)
    error = {"error": {"message": "bad", "code": "invalid_parameter_error"}, "request_id": "r-1"}
    a.forced = {"status": 400, "error_body": error}

    response = chat(gateway, model="gpt-4o-mini")

    assert response.status_code == 400
    assert response.json() == error
    assert b.requests == []


def test_dashscope_arrearage_falls_back(
    start_gateway: GatewayFactory, a: FakeUpstream, b: FakeUpstream
) -> None:
    gateway = start_gateway(config(a.url, b.url, a_kind="dashscope"), **KEYS)
    arrears = {"error": {"message": "Access denied.", "code": "Arrearage"}, "request_id": "r"}
    a.forced = {"status": 400, "error_body": arrears}

    response = chat(gateway, model="gpt-4o-mini")

    assert response.status_code == 200
    assert models_sent(b) == ["qwen-plus-intl"]


def test_models_merge_and_survive_a_provider_that_is_down(
    start_gateway: GatewayFactory, a: FakeUpstream
) -> None:
    a.models = [{"id": "qwen-max", "object": "model", "created": 1, "owned_by": "x"}]
    extra = '  "*": [b]\n'  # b is down: its models are skipped, not an error
    gateway = start_gateway(config(a.url, refusing_url(), extra=extra), **KEYS)

    response = requests.get(gateway.url + "/v1/models", headers=AUTH, timeout=30)
    found = requests.get(gateway.url + "/v1/models/qwen-max", headers=AUTH, timeout=30)
    missing = requests.get(gateway.url + "/v1/models/qwen-nope", headers=AUTH, timeout=30)

    assert response.status_code == 200
    assert [(m["id"], m["owned_by"]) for m in response.json()["data"]] == [
        ("gpt-4o-mini", "a"),
        ("qwen-max", "a"),
    ]
    assert found.json()["id"] == "qwen-max"
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "model_not_found"


def test_dashscope_gets_enable_thinking_false_unless_the_client_set_it(
    start_gateway: GatewayFactory, a: FakeUpstream, b: FakeUpstream
) -> None:
    gateway = start_gateway(config(a.url, b.url, a_kind="dashscope"), **KEYS)

    chat(gateway, model="qwen-plus")
    chat(gateway, model="qwen-plus", enable_thinking=True)
    chat(gateway, model="qwen-plus", stream=True)

    sent = [orjson.loads(r.body) for r in a.requests]
    assert [body.get("enable_thinking") for body in sent] == [False, True, None]


def test_the_openai_sdk_works_unchanged_against_an_alias(
    start_gateway: GatewayFactory, a: FakeUpstream, b: FakeUpstream
) -> None:
    gateway = start_gateway(config(a.url, b.url), **KEYS)
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=GATEWAY_KEY, max_retries=0)

    answer = client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
    )
    stream = client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    assert answer.choices[0].message.content == "Hello from the fake upstream."
    assert text == "tok0 tok1 tok2 "
    assert "gpt-4o-mini" in [m.id for m in client.models.list()]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=[])
    assert models_sent(a) == ["qwen-plus", "qwen-plus"]


def test_odd_model_names_pick_no_unintended_route_or_header(
    start_gateway: GatewayFactory, a: FakeUpstream, b: FakeUpstream
) -> None:
    gateway = start_gateway(config(a.url, b.url), **KEYS)

    odd = ["gpt-4o-mini\r\nX-Injected: 1", "gpt-4o-mini\x00", " gpt-4o-mini", "GPT-4O-MINI", ".*"]
    statuses = [chat(gateway, model=name).status_code for name in odd]
    injected = chat(gateway, model="qwen-\r\nAuthorization: Bearer stolen")

    assert statuses == [404] * len(odd)  # no alias, no "qwen-*", no "*" route here
    assert injected.status_code == 200  # "qwen-*" matched it, as text in the JSON body
    (received,) = a.requests
    assert received.headers["authorization"] == f"Bearer {A_KEY}"
    assert "x-injected" not in received.headers
    assert orjson.loads(received.body)["model"] == "qwen-\r\nAuthorization: Bearer stolen"
    assert b.requests == []


def test_provider_keys_stay_with_their_provider_and_echoes_are_masked(
    start_gateway: GatewayFactory, a: FakeUpstream, b: FakeUpstream
) -> None:
    gateway = start_gateway(config(a.url, b.url), **KEYS)
    echo = {"error": {"message": f"I saw {B_KEY} and {A_KEY}"}}
    a.forced = {"status": 503, "error_body": echo}
    b.forced = {"status": 400, "error_body": echo}

    response = chat(gateway, model="gpt-4o-mini")

    assert response.status_code == 400  # the last attempt's answer, masked
    assert A_KEY not in response.text
    assert B_KEY not in response.text
    assert "I saw sk-" in response.text
    for upstream, own, other in ((a, A_KEY, B_KEY), (b, B_KEY, A_KEY)):
        (received,) = upstream.requests
        assert received.headers["authorization"] == f"Bearer {own}"
        assert other not in str(received.headers)
        assert other.encode() not in received.body
