"""Routing through the app: aliases, fallback before the first byte, provider keys, models."""

from __future__ import annotations

import email.utils
import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests
import responses
from flask import Flask
from flask.testing import FlaskClient
from prometheus_client.parser import text_string_to_metric_families

from gateway.config import Deployment, ModelRoute, Provider, RoutingPolicy
from gateway.upstream import ModelCatalog
from gateway.upstream.providers import retry_after
from tests.raw_upstream import RawRequest, RawUpstream
from tests.unit.support import MakeApp, assert_openai_error

CHAT = "/v1/chat/completions"
A_URL, B_URL = "http://provider-a.test/v1", "http://provider-b.test/v1"
A_KEY, B_KEY = "sk-provider-a-0123456789abcdef", "sk-provider-b-fedcba9876543210"
ANSWER = b'{"id":"chatcmpl-1","object":"chat.completion","model":"qwen-plus","choices":[]}'
ARREARS = (
    b'{"error":{"message":"Access denied, please make sure your account is in good standing.",'
    b'"type":"Arrearage","param":null,"code":"Arrearage"},"request_id":"ds-1"}'
)


def _routes(**routes: list[Deployment]) -> tuple[ModelRoute, ...]:
    return tuple(
        ModelRoute(name=n.replace("_", "-"), deployments=tuple(d)) for n, d in routes.items()
    )


@pytest.fixture
def providers() -> tuple[Provider, ...]:
    return (
        Provider(name="a", base_url=A_URL, api_key=A_KEY, kind="dashscope"),
        Provider(name="b", base_url=B_URL, api_key=B_KEY),
    )


@pytest.fixture
def app(make_app: MakeApp, providers: tuple[Provider, ...]) -> Flask:
    return build(make_app, providers)


def build(make_app: MakeApp, providers: tuple[Provider, ...]) -> Flask:
    """`gpt-4o-mini` → a (qwen-plus) then b (qwen-plus-intl); `qwen-*` → a; `*` → b."""
    routes = (
        ModelRoute(
            name="gpt-4o-mini",
            deployments=(
                Deployment(provider="a", model="qwen-plus", weight=1000),
                Deployment(provider="b", model="qwen-plus-intl", weight=0.001),
            ),
        ),
        ModelRoute(name="qwen-*", deployments=(Deployment(provider="a"),)),
        ModelRoute(name="*", deployments=(Deployment(provider="b"),)),
    )
    return make_app(providers=providers, routes=routes, routing=RoutingPolicy(cooldown=60))


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


@pytest.fixture
def upstream() -> Iterator[responses.RequestsMock]:
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        yield mock


def chat(client: FlaskClient, auth: dict[str, str], **body: Any) -> Any:
    return client.post(CHAT, json={"messages": [], **body}, headers=auth)


def sent_body(call: Any) -> dict[str, Any]:
    return json.loads(call.request.body)


def prefer_a(app: Flask) -> None:
    """Weights 1000:0.001 make a first in practice; pin it so no draw can say otherwise."""
    app.extensions["gateway.upstream"].router._random.random = lambda: 0.0


def samples(client: FlaskClient, name: str) -> dict[frozenset, float]:
    text = client.get("/metrics").get_data(as_text=True)
    return {
        frozenset(s.labels.items()): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name
    }


def test_an_alias_rewrites_the_model_upstream_and_not_the_answer(
    app: Flask, client: FlaskClient, auth: dict[str, str], upstream: responses.RequestsMock
) -> None:
    prefer_a(app)
    upstream.post(f"{A_URL}/chat/completions", body=ANSWER, content_type="application/json")

    response = chat(client, auth, model="gpt-4o-mini", temperature=0.5)

    assert response.data == ANSWER  # the provider's bytes: its model name stays
    assert sent_body(upstream.calls[0])["model"] == "qwen-plus"
    assert sent_body(upstream.calls[0])["temperature"] == 0.5


def test_a_body_is_relayed_untouched_when_nothing_needs_changing(
    client: FlaskClient, auth: dict[str, str], upstream: responses.RequestsMock
) -> None:
    upstream.post(f"{B_URL}/chat/completions", body=ANSWER, content_type="application/json")
    body = b'{ "model" : "llama3", "messages":[] , "x": 1.50 }'

    client.post(CHAT, data=body, headers=auth, content_type="application/json")

    assert upstream.calls[0].request.body == body


@pytest.mark.parametrize(
    ("body", "sent"),
    [
        ({"model": "qwen-plus"}, False),  # added for DashScope, non-streamed
        ({"model": "qwen-plus", "enable_thinking": True}, True),  # the client's own kept
        ({"model": "qwen-plus", "stream": True}, None),  # streams may think
    ],
)
def test_dashscope_gets_enable_thinking_false_by_default(
    client: FlaskClient,
    auth: dict[str, str],
    upstream: responses.RequestsMock,
    body: dict[str, Any],
    sent: bool | None,
) -> None:
    upstream.post(f"{A_URL}/chat/completions", body=ANSWER, content_type="application/json")

    chat(client, auth, **body)

    assert sent_body(upstream.calls[0]).get("enable_thinking") == sent


def test_other_providers_get_no_enable_thinking(
    client: FlaskClient, auth: dict[str, str], upstream: responses.RequestsMock
) -> None:
    upstream.post(f"{B_URL}/chat/completions", body=ANSWER, content_type="application/json")

    chat(client, auth, model="llama3")

    assert "enable_thinking" not in sent_body(upstream.calls[0])


def test_each_provider_gets_its_own_key_only(
    app: Flask, client: FlaskClient, auth: dict[str, str], upstream: responses.RequestsMock
) -> None:
    prefer_a(app)
    upstream.post(f"{A_URL}/chat/completions", status=503, body=b'{"error":"busy"}')
    upstream.post(f"{B_URL}/chat/completions", body=ANSWER, content_type="application/json")

    assert chat(client, auth, model="gpt-4o-mini").status_code == 200

    to_a, to_b = upstream.calls
    assert to_a.request.headers["Authorization"] == f"Bearer {A_KEY}"
    assert to_b.request.headers["Authorization"] == f"Bearer {B_KEY}"
    for call, other in ((to_a, B_KEY), (to_b, A_KEY)):
        assert all(other not in v for v in call.request.headers.values())
        assert other.encode() not in call.request.body
    assert sent_body(to_b)["model"] == "qwen-plus-intl"


@pytest.mark.parametrize(
    "failure",
    [
        {"body": requests.ConnectionError("refused")},
        {"body": requests.ConnectTimeout("slow")},
        # A non-streamed read timeout falls back only when configured: test_cooldown_poisoning.
        {"status": 429, "body": b'{"error":"slow down"}'},
        {"status": 500, "body": b'{"error":"oops"}'},
        {"status": 400, "body": ARREARS, "content_type": "application/json"},
    ],
)
def test_a_failure_before_the_answer_falls_back(
    make_app: MakeApp,
    providers: tuple[Provider, ...],
    auth: dict[str, str],
    upstream: responses.RequestsMock,
    capsys: pytest.CaptureFixture[str],
    failure: dict[str, Any],
) -> None:
    app = build(make_app, providers)  # here: its log sink is the test's captured stdout
    client = app.test_client()
    prefer_a(app)
    upstream.post(f"{A_URL}/chat/completions", **failure)
    upstream.post(f"{B_URL}/chat/completions", body=ANSWER, content_type="application/json")

    response = chat(client, auth, model="gpt-4o-mini")
    response.close()

    assert response.status_code == 200
    assert response.data == ANSWER
    assert [c.request.url for c in upstream.calls] == [
        f"{A_URL}/chat/completions",
        f"{B_URL}/chat/completions",
    ]
    access = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    (line,) = [a for a in access if a.get("event") == "access"]
    assert (line["provider"], line["upstream_model"]) == ("b", "qwen-plus-intl")
    assert len(line["attempts"]) == 1
    assert line["attempts"][0].startswith("a: ")
    assert "upstream_error" not in line  # the request itself succeeded


def test_a_400_is_the_clients_answer_and_never_falls_back(
    app: Flask, client: FlaskClient, auth: dict[str, str], upstream: responses.RequestsMock
) -> None:
    prefer_a(app)
    error = (
        b'{"error":{"message":"bad messages","code":"invalid_parameter_error"},"request_id":"r"}'
    )
    upstream.post(f"{A_URL}/chat/completions", status=400, body=error)
    upstream.post(f"{B_URL}/chat/completions", body=ANSWER)

    response = chat(client, auth, model="gpt-4o-mini")

    assert response.status_code == 400
    assert response.data == error
    assert len(upstream.calls) == 1


def test_the_last_attempts_answer_is_relayed_as_it_is(
    app: Flask, client: FlaskClient, auth: dict[str, str], upstream: responses.RequestsMock
) -> None:
    prefer_a(app)
    upstream.post(f"{A_URL}/chat/completions", status=503, body=b'{"error":"a is busy"}')
    last = b'{"error":{"message":"b is busy too"},"request_id":"b-1"}'
    upstream.post(f"{B_URL}/chat/completions", status=429, body=last, headers={"Retry-After": "7"})

    response = chat(client, auth, model="gpt-4o-mini")

    assert response.status_code == 429
    assert response.data == last
    assert len(upstream.calls) == 2


def test_a_rate_limited_deployment_is_skipped_while_it_cools_down(
    app: Flask,
    client: FlaskClient,
    auth: dict[str, str],
    upstream: responses.RequestsMock,
) -> None:
    prefer_a(app)
    upstream.post(f"{A_URL}/chat/completions", status=429, headers={"Retry-After": "120"})
    upstream.post(f"{B_URL}/chat/completions", body=ANSWER, content_type="application/json")

    for _ in range(3):
        assert chat(client, auth, model="gpt-4o-mini").status_code == 200

    urls = [c.request.url for c in upstream.calls]
    assert urls == [f"{A_URL}/chat/completions"] + [f"{B_URL}/chat/completions"] * 3
    cooling = samples(client, "gateway_deployment_cooldown")
    assert cooling[frozenset({("provider", "a"), ("upstream_model", "qwen-plus")})] == 1


def test_attempts_and_fallbacks_are_counted(
    app: Flask, client: FlaskClient, auth: dict[str, str], upstream: responses.RequestsMock
) -> None:
    prefer_a(app)
    upstream.post(f"{A_URL}/chat/completions", body=requests.ConnectionError("refused"))
    upstream.post(f"{B_URL}/chat/completions", body=ANSWER, content_type="application/json")

    chat(client, auth, model="gpt-4o-mini").close()
    chat(client, auth, model="llama3").close()

    attempts = samples(client, "gateway_upstream_attempts_total")
    labels = {"provider": "a", "model": "gpt-4o-mini", "outcome": "connect"}
    assert attempts[frozenset(labels.items())] == 1
    labels = {"provider": "b", "model": "gpt-4o-mini", "outcome": "ok"}
    assert attempts[frozenset(labels.items())] == 1
    labels = {"provider": "b", "model": "other", "outcome": "ok"}  # "*": not a public name
    assert attempts[frozenset(labels.items())] == 1
    fallbacks = samples(client, "gateway_fallbacks_total")
    labels = {"provider": "a", "model": "gpt-4o-mini", "reason": "connect"}
    assert fallbacks == {frozenset(labels.items()): 1}
    requests_total = samples(client, "gateway_requests_total")
    labels = {"route": CHAT, "method": "POST", "status": "200"}
    assert requests_total[frozenset({**labels, "provider": "b", "model": "gpt-4o-mini"}.items())]


def test_no_route_is_a_404_without_any_upstream_call(
    make_app: MakeApp,
    providers: tuple[Provider, ...],
    auth: dict[str, str],
    upstream: responses.RequestsMock,
) -> None:
    routes = (ModelRoute(name="qwen-*", deployments=(Deployment(provider="a"),)),)
    client = make_app(providers=providers, routes=routes).test_client()

    response = chat(client, auth, model="gpt-4o")

    assert_openai_error(response, 404, "model_not_found")
    assert len(upstream.calls) == 0


def test_every_provider_at_capacity_is_a_503(
    make_app: MakeApp, auth: dict[str, str], upstream: responses.RequestsMock
) -> None:
    full = Provider(name="a", base_url=A_URL, api_key=A_KEY, max_concurrent=1)
    routes = (ModelRoute(name="m", deployments=(Deployment(provider="a"),)),)
    app = make_app(providers=(full,), routes=routes)
    router = app.extensions["gateway.upstream"].router
    plan = router.plan("m")
    held = router.acquire(plan.candidates[0])  # the one request a may serve at once

    response = chat(app.test_client(), auth, model="m")

    assert_openai_error(response, 503, "capacity_exceeded")
    assert len(upstream.calls) == 0
    held.release()


def test_a_failed_attempt_frees_its_providers_slot_for_the_next(
    make_app: MakeApp, auth: dict[str, str], upstream: responses.RequestsMock
) -> None:
    # Two models of one provider that serves one request at a time: the first answers
    # 503, which is no longer work in flight there, so the second may be tried.
    capped = Provider(name="a", base_url=A_URL, api_key=A_KEY, max_concurrent=1)
    deployments = (Deployment(provider="a", model="m1"), Deployment(provider="a", model="m2"))
    app = make_app(providers=(capped,), routes=(ModelRoute(name="m", deployments=deployments),))
    prefer_a(app)
    upstream.post(f"{A_URL}/chat/completions", status=503, body=b'{"error":"busy"}')
    upstream.post(f"{A_URL}/chat/completions", body=ANSWER, content_type="application/json")

    response = chat(app.test_client(), auth, model="m")

    assert response.status_code == 200
    assert [sent_body(c)["model"] for c in upstream.calls] == ["m1", "m2"]
    router = app.extensions["gateway.upstream"].router
    assert [router.in_flight(k) for k in router.keys] == [0, 0]


def test_a_key_of_another_provider_echoed_back_is_masked(
    app: Flask, client: FlaskClient, auth: dict[str, str], upstream: responses.RequestsMock
) -> None:
    prefer_a(app)
    echo = b'{"error":{"message":"keys seen: ' + A_KEY.encode() + b" and " + B_KEY.encode() + b'"}}'
    upstream.post(f"{A_URL}/chat/completions", status=400, body=echo)

    response = chat(client, auth, model="gpt-4o-mini")

    assert response.status_code == 400
    assert A_KEY.encode() not in response.data
    assert B_KEY.encode() not in response.data
    assert b"keys seen: sk-" in response.data


def test_models_lists_public_names_and_wildcard_providers_models(
    client: FlaskClient, auth: dict[str, str], upstream: responses.RequestsMock
) -> None:
    listed_a = {
        "data": [{"id": "qwen-max", "created": 5}, {"id": "deepseek-r1"}, {"id": "qwen-plus"}]
    }
    upstream.get(f"{A_URL}/models", json=listed_a)
    upstream.get(f"{B_URL}/models", json={"data": [{"id": "llama3"}, {"id": "qwen-turbo"}]})

    models = client.get("/v1/models", headers=auth).get_json()

    assert models["object"] == "list"
    found = {(m["id"], m["owned_by"]) for m in models["data"]}
    # a's deepseek-r1 would be routed to b by "*", and b's qwen-turbo to a by "qwen-*":
    # listed only where they would really go.
    assert found == {
        ("gpt-4o-mini", "a"),
        ("qwen-max", "a"),
        ("qwen-plus", "a"),
        ("llama3", "b"),
    }
    assert next(m for m in models["data"] if m["id"] == "qwen-max")["created"] == 5
    assert all(m["object"] == "model" for m in models["data"])


def test_models_are_cached_and_a_provider_that_is_down_is_skipped(
    client: FlaskClient, auth: dict[str, str], upstream: responses.RequestsMock
) -> None:
    upstream.get(f"{A_URL}/models", body=requests.ConnectionError("down"))
    upstream.get(f"{B_URL}/models", json={"data": [{"id": "llama3"}]})

    first = client.get("/v1/models", headers=auth)
    second = client.get("/v1/models", headers=auth)

    assert first.status_code == second.status_code == 200
    assert {m["id"] for m in second.get_json()["data"]} == {"gpt-4o-mini", "llama3"}
    assert len(upstream.calls) == 2  # one fetch per provider, then the cache


def test_concurrent_listings_share_one_fetch_per_provider(
    app: Flask, auth: dict[str, str], upstream: responses.RequestsMock
) -> None:
    fetches: list[str] = []
    answer = threading.Event()

    def slow_list(request: Any) -> tuple[int, dict[str, str], str]:
        fetches.append(request.url)
        answer.wait(10)
        return 200, {}, json.dumps({"data": [{"id": "llama3"}]})

    upstream.get(f"{A_URL}/models", json={"data": []})
    upstream.add_callback(responses.GET, f"{B_URL}/models", callback=slow_list)
    found: list[set[str]] = []

    def list_models() -> None:
        data = app.test_client().get("/v1/models", headers=auth).get_json()["data"]
        found.append({m["id"] for m in data})

    threads = [threading.Thread(target=list_models) for _ in range(4)]
    for thread in threads:
        thread.start()
    for _ in range(100):  # without one fetch at a time, all four soon reach the provider
        if len(fetches) == len(threads):
            break
        time.sleep(0.02)
    answer.set()
    for thread in threads:
        thread.join(30)

    assert fetches == [f"{B_URL}/models"]
    assert found == [{"gpt-4o-mini", "llama3"}] * len(threads)


def test_a_provider_dripping_its_model_list_is_cut_at_the_deadline(
    make_app: MakeApp, auth: dict[str, str]
) -> None:
    # A byte at a time, never silent long enough for the read timeout: only a deadline
    # for the whole fetch stops it (else every /v1/models request waits on it).
    def drip(request: RawRequest, conn: socket.socket) -> bool:
        conn.sendall(json_head(100_000) + b'{"data": [')
        for _ in range(400):  # at most 20 s
            conn.sendall(b" ")
            if dripping.wait_closed(conn, 0.05):
                return False
        return False

    dripping = RawUpstream(drip).start()
    try:
        provider = Provider(name="slow", base_url=dripping.url, api_key=A_KEY)
        routes = (ModelRoute(name="*", deployments=(Deployment(provider="slow"),)),)
        app = make_app(providers=(provider,), routes=routes)
        upstream = app.extensions["gateway.upstream"]
        app.extensions["gateway.models"] = ModelCatalog(upstream, deadline=0.5)

        response = app.test_client().get("/v1/models", headers=auth)
    finally:
        dripping.stop()

    # Nothing could be listed and no name is configured: an outage, not an empty list.
    assert_openai_error(response, 502, "upstream_unavailable")
    assert len(dripping.closed_at) == 1  # the gateway hung up, not the provider


def json_head(length: int) -> bytes:
    head = f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {length}\r\n\r\n"
    return head.encode()


@pytest.mark.parametrize(
    "answer",
    [
        {"status": 500, "json": {"data": [{"id": "x"}]}},
        {"body": b"not json"},
        {"json": {"data": "nope"}},
        {"json": [1, 2]},
    ],
)
def test_a_provider_answering_nonsense_to_models_is_skipped(
    client: FlaskClient,
    auth: dict[str, str],
    upstream: responses.RequestsMock,
    answer: dict[str, Any],
) -> None:
    upstream.get(f"{A_URL}/models", **answer)
    upstream.get(f"{B_URL}/models", json={"data": [{"id": "llama3"}]})

    response = client.get("/v1/models", headers=auth)

    assert response.status_code == 200
    assert {m["id"] for m in response.get_json()["data"]} == {"gpt-4o-mini", "llama3"}


def test_a_listed_id_holding_a_key_is_dropped(
    client: FlaskClient, auth: dict[str, str], upstream: responses.RequestsMock
) -> None:
    upstream.get(f"{A_URL}/models", json={"data": []})
    upstream.get(f"{B_URL}/models", json={"data": [{"id": f"leak-{A_KEY}"}, {"id": "llama3"}]})

    response = client.get("/v1/models", headers=auth)

    assert A_KEY not in response.get_data(as_text=True)
    assert {m["id"] for m in response.get_json()["data"]} == {"gpt-4o-mini", "llama3"}


def test_retrieve_answers_from_the_same_list(
    client: FlaskClient, auth: dict[str, str], upstream: responses.RequestsMock
) -> None:
    upstream.get(f"{A_URL}/models", json={"data": [{"id": "qwen-max"}]})
    upstream.get(f"{B_URL}/models", json={"data": []})

    alias = client.get("/v1/models/gpt-4o-mini", headers=auth)
    listed = client.get("/v1/models/qwen-max", headers=auth)
    unknown = client.get("/v1/models/qwen-unknown", headers=auth)

    assert alias.get_json() == {
        "id": "gpt-4o-mini",
        "object": "model",
        "created": 0,
        "owned_by": "a",
    }
    assert listed.get_json()["owned_by"] == "a"
    assert_openai_error(unknown, 404, "model_not_found")


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        ("7", 7.0),
        (" 120 ", 120.0),
        ("9" * 400, float("inf")),  # capped by max_cooldown in the router
        ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0),  # a date gone by: now
        ("", None),
        (None, None),
        # Not delay-seconds: the default cooldown, never "retry at once".
        ("nan", None),
        ("-5", None),
        ("1_000", None),
        ("1e3", None),
        ("\u0663", None),  # an Arabic-Indic three
        ("soon", None),
        ("Mon, 99 Foo 2020 25:61:61 GMT", None),
    ],
)
def test_retry_after_takes_digits_or_a_date_and_nothing_else(
    header: str | None, seconds: float | None
) -> None:
    assert retry_after(header) == seconds


def test_retry_after_a_date_without_a_zone_is_utc() -> None:
    when = email.utils.formatdate(time.time() + 3600, usegmt=True).replace("GMT", "-0000")

    found = retry_after(when)

    assert found is not None
    assert 3500 < found <= 3600
