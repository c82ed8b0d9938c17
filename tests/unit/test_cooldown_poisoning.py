"""Issue 16, items 1, 2 and 9: one tenant's request can't cool a provider for the others, a
non-streamed read timeout is not sent to a second provider unless configured (and what it
may have cost is listed), and a provider that refuses `stream_options` is asked without it.

Provider answers use OpenAI's and DashScope's real wordings.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import requests
import responses
from flask import Flask
from werkzeug.test import TestResponse

from gateway.config import Deployment, ModelRoute, Provider, RoutingPolicy
from gateway.upstream.providers import refuses_gateway_key, request_too_large
from gateway.upstream.router import Router
from tests.fake_upstream import expected_stream
from tests.unit.support import MakeApp, ScriptedAnswer

CHAT = "/v1/chat/completions"
A_URL, B_URL = "http://provider-a.test/v1", "http://provider-b.test/v1"
A_CHAT, B_CHAT = f"{A_URL}/chat/completions", f"{B_URL}/chat/completions"
A_KEY, B_KEY = "sk-provider-a-0123456789abcdef", "sk-provider-b-fedcba9876543210"
ANSWER = b'{"id":"chatcmpl-1","object":"chat.completion","model":"qwen-plus","choices":[]}'


def error(message: str, code: str | None = None, kind: str = "invalid_request_error") -> bytes:
    """OpenAI's error shape (DashScope's compatible mode uses it too)."""
    body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    return json.dumps(body).encode()


def dashscope(code: str, message: str) -> bytes:
    """DashScope's native error shape."""
    return json.dumps({"code": code, "message": message, "request_id": "ds-1"}).encode()


# A 401/403 about a model or the request: the client's, relayed, cools nothing.
MODEL_REFUSALS = [
    (403, error("Project `proj_abc` does not have access to model `gpt-x`", "model_not_found")),
    (404, error("The model `gpt-x` does not exist or you do not have access to it.")),
    (403, error("Model access denied.", "Model.AccessDenied", "Model.AccessDenied")),
    (403, dashscope("AccessDenied.Unpurchased", "Access to model denied. Please make sure...")),
    (401, error("You are not allowed to sample from this model", "model_not_allowed")),
    (403, b"<html><body>Forbidden</body></html>"),  # a WAF's: about this request
    (403, error("The model `invalid api key` does not exist", "model_not_found")),
]
# About the gateway's own credentials or account: every deployment of the provider cools.
KEY_REFUSALS = [
    (401, error(f"Incorrect API key provided: {A_KEY[:8]}****. You can find your API key at "
                "https://platform.openai.com/account/api-keys.", "invalid_api_key")),
    (401, dashscope("InvalidApiKey", "Invalid API-key provided.")),
    (401, error("Incorrect API key provided. ", "invalid_api_key")),  # DashScope compatible
    (401, b"Unauthorized"),
    (403, dashscope("Workspace.AccessDenied", "Workspace access denied.")),
    (403, error("Country, region, or territory not supported",
                "unsupported_country_region_territory")),
]  # fmt: skip


@pytest.mark.parametrize(("status", "body"), MODEL_REFUSALS)
def test_a_refusal_about_a_model_or_request_is_not_the_gateways_key(
    status: int, body: bytes
) -> None:
    assert not refuses_gateway_key(status, body, "invalid api key")


@pytest.mark.parametrize(("status", "body"), KEY_REFUSALS)
def test_a_refusal_of_the_gateways_key_is_recognised(status: int, body: bytes) -> None:
    assert refuses_gateway_key(status, body, "qwen-plus")


TOO_LARGE = error(
    "Request too large for gpt-4o in organization org-abc on tokens per min (TPM): Limit "
    "30000, Requested 50000. The input or output tokens must be reduced in order to run "
    "successfully. Visit https://platform.openai.com/account/rate-limits to learn more.",
    "rate_limit_exceeded",
    "tokens",
)
RATE_LIMITED = error(
    "Rate limit reached for gpt-4o in organization org-abc on tokens per min (TPM): Limit "
    "30000, Used 29000, Requested 2000. Please try again in 2s.",
    "rate_limit_exceeded",
    "tokens",
)


@pytest.mark.parametrize(
    ("body", "too_large"),
    [
        (TOO_LARGE, True),
        (error("This model's maximum context length is 8192 tokens.", "context_length_exceeded"),
         True),
        (dashscope("InvalidParameter", "Range of input length should be [1, 30720]"), True),
        (RATE_LIMITED, False),
        (error("You exceeded your current quota, please check your plan and billing details.",
               "insufficient_quota"), False),
        (dashscope("Throttling.RateQuota", "Requests rate limit exceeded, please try again later."),
         False),
        (dashscope("Throttling.AllocationQuota", "Allocated quota exceeded, please increase your "
                   "quota limit."), False),
        (error("You exceeded your current requests list.", "limit_requests", "limit_requests"),
         False),
        (b"", False),
    ],
)  # fmt: skip
def test_a_429_about_the_requests_size_is_told_from_one_about_the_rate(
    body: bytes, too_large: bool
) -> None:
    assert request_too_large(body, "gpt-4o") is too_large


# --- through the app ------------------------------------------------------------------
def build(make_app: MakeApp, *, a_usage: bool = True, **routing: Any) -> Flask:
    """`gpt-4o-mini` → a (qwen-plus) then b; `qwen-plus` → a alone; `*` → a then b."""
    providers = (
        Provider(name="a", base_url=A_URL, api_key=A_KEY, stream_usage=a_usage),
        Provider(name="b", base_url=B_URL, api_key=B_KEY),
    )
    routes = (
        ModelRoute(
            name="gpt-4o-mini",
            deployments=(
                Deployment(provider="a", model="qwen-plus", weight=1000),
                Deployment(provider="b", model="qwen-plus-intl", weight=0.001),
            ),
        ),
        ModelRoute(name="qwen-plus", deployments=(Deployment(provider="a"),)),
        ModelRoute(
            name="*",
            deployments=(Deployment(provider="a", weight=1000), Deployment(provider="b")),
        ),
    )
    app = make_app(providers=providers, routes=routes, routing=RoutingPolicy(**routing))
    app.extensions["gateway.upstream"].router._random.random = lambda: 0.0  # a first
    return app


def router_of(app: Flask) -> Router:
    router: Router = app.extensions["gateway.upstream"].router
    return router


@pytest.fixture
def upstream() -> Iterator[responses.RequestsMock]:
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        yield mock


def post(app: Flask, auth: dict[str, str], **body: Any) -> TestResponse:
    response = app.test_client().post(CHAT, json={"messages": [], **body}, headers=auth)
    response.get_data()
    response.close()  # the access line is written once the answer has ended
    return response


def urls(upstream: responses.RequestsMock) -> list[str]:
    return [str(c.request.url) for c in upstream.calls]


def body_of(call: Any) -> bytes:
    body = call.request.body
    assert isinstance(body, bytes)
    return body


def access(capsys: pytest.CaptureFixture[str]) -> list[dict[str, Any]]:
    logged = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    return [line for line in logged if line.get("event") == "access"]


@pytest.mark.parametrize(("status", "body"), MODEL_REFUSALS)
def test_one_tenants_model_refusal_is_relayed_and_cools_nothing(
    make_app: MakeApp, auth: dict[str, str], upstream: responses.RequestsMock, status: int,
    body: bytes,
) -> None:  # fmt: skip
    app = build(make_app)
    upstream.post(A_CHAT, status=status, body=body, content_type="application/json")

    refused = post(app, auth, model="invalid api key")  # through `*`: a first
    upstream.replace(responses.POST, A_CHAT, body=ANSWER, content_type="application/json")
    others = [post(app, auth, model=m).status_code for m in ("gpt-4o-mini", "qwen-plus") * 6]

    assert (refused.status_code, refused.data) == (status, body)  # as the provider said it
    assert urls(upstream) == [A_CHAT] * 13  # never sent on to b, and a served all 12
    assert others == [200] * 12
    assert router_of(app).cooling() == []


@pytest.mark.parametrize(("status", "body"), KEY_REFUSALS[:2])
def test_a_refusal_of_the_gateways_key_still_cools_the_whole_provider(
    make_app: MakeApp, auth: dict[str, str], upstream: responses.RequestsMock, status: int,
    body: bytes,
) -> None:  # fmt: skip
    app = build(make_app)
    upstream.post(A_CHAT, status=status, body=body)
    upstream.post(B_CHAT, body=ANSWER, content_type="application/json")

    assert post(app, auth, model="gpt-4o-mini").status_code == 200

    assert sorted(router_of(app).cooling()) == [("a", "*"), ("a", "qwen-plus")]


def test_a_429_request_too_large_is_relayed_and_the_next_request_is_served_there(
    make_app: MakeApp, auth: dict[str, str], upstream: responses.RequestsMock
) -> None:
    app = build(make_app)
    upstream.post(A_CHAT, status=429, body=TOO_LARGE, headers={"Retry-After": "300"})

    too_large = post(app, auth, model="gpt-4o-mini")
    upstream.replace(responses.POST, A_CHAT, body=ANSWER, content_type="application/json")
    normal = post(app, auth, model="gpt-4o-mini")

    assert (too_large.status_code, too_large.data) == (429, TOO_LARGE)
    assert normal.status_code == 200
    assert urls(upstream) == [A_CHAT, A_CHAT]  # the same body was not sent on to b
    assert router_of(app).cooling() == []


def test_a_429_about_the_rate_still_cools_for_its_retry_after(
    make_app: MakeApp, auth: dict[str, str], upstream: responses.RequestsMock
) -> None:
    app = build(make_app)
    upstream.post(A_CHAT, status=429, body=RATE_LIMITED, headers={"Retry-After": "300"})
    upstream.post(B_CHAT, body=ANSWER, content_type="application/json")

    assert post(app, auth, model="gpt-4o-mini").status_code == 200

    assert urls(upstream) == [A_CHAT, B_CHAT]
    assert router_of(app).cooling() == [("a", "qwen-plus")]


def test_three_identical_500s_do_not_cool_and_three_different_ones_do(
    make_app: MakeApp, auth: dict[str, str], upstream: responses.RequestsMock
) -> None:
    app = build(make_app, failures_before_cooldown=3)
    upstream.post(A_CHAT, status=500, body=error("Internal error", "internal_error"))
    upstream.post(B_CHAT, body=ANSWER, content_type="application/json")
    router = router_of(app)

    same = [post(app, auth, model="gpt-4o-mini", bad=1).status_code for _ in range(3)]
    after_same = router.cooling()
    different = [post(app, auth, model="gpt-4o-mini", n=i).status_code for i in range(3)]

    assert same + different == [200] * 6  # each fell back to b
    assert after_same == []
    assert router.cooling() == [("a", "qwen-plus")]


def test_on_a_wildcard_route_one_models_failures_do_not_cool_another(
    make_app: MakeApp, auth: dict[str, str], upstream: responses.RequestsMock
) -> None:
    app = build(make_app, failures_before_cooldown=1)
    upstream.post(A_CHAT, status=429, body=RATE_LIMITED)
    upstream.post(B_CHAT, body=ANSWER, content_type="application/json")

    assert post(app, auth, model="model-x").status_code == 200  # a 429s, b answers
    upstream.replace(responses.POST, A_CHAT, body=ANSWER, content_type="application/json")
    y = post(app, auth, model="model-y")
    x = post(app, auth, model="model-x")

    assert (y.status_code, x.status_code) == (200, 200)
    assert urls(upstream) == [A_CHAT, B_CHAT, A_CHAT, B_CHAT]  # y at a; x still skips a
    assert router_of(app).cooling() == [("a", "*")]  # the gauge: a's `*` deployment


def test_a_wildcard_routes_model_states_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway.upstream import router as module

    monkeypatch.setattr(module, "MODEL_STATES", 8)
    app_router = Router(
        _settings_with_wildcard(), clock=lambda: 1000.0
    )  # a fixed clock: every cooldown is still on
    for i in range(100):
        app_router.failed(("a", "*"), "rate_limited", model=f"m{i}")

    assert len(app_router._models) == 8
    plan = app_router.plan("m99")
    assert plan is not None and [c.provider.name for c in plan.candidates] == ["b"]


def _settings_with_wildcard() -> Any:
    from tests.unit.test_router import d, settings

    return settings({"*": [d("a"), d("b")]})


def test_a_non_streamed_read_timeout_is_not_sent_to_a_second_provider(
    make_app: MakeApp,
    auth: dict[str, str],
    upstream: responses.RequestsMock,
    capsys: pytest.CaptureFixture[str],
) -> None:
    app = build(make_app, failures_before_cooldown=3)
    for _ in range(3):
        upstream.post(A_CHAT, body=requests.ReadTimeout("generating"))
    upstream.post(B_CHAT, body=ANSWER, content_type="application/json")

    statuses = [post(app, auth, model="gpt-4o-mini").status_code for _ in range(3)]

    assert statuses == [504] * 3
    assert urls(upstream) == [A_CHAT] * 3  # one generation per request, never a second
    assert router_of(app).cooling() == []  # the same slow request thrice cools nothing
    lines = access(capsys)
    assert [line["upstream_error"] for line in lines] == ["timeout"] * 3
    assert all(line["usage_estimated"] for line in lines)  # the one attempt's prompt, charged


def test_with_read_timeout_in_fallback_on_it_falls_back_and_the_attempt_cost_is_listed(
    make_app: MakeApp,
    auth: dict[str, str],
    upstream: responses.RequestsMock,
    capsys: pytest.CaptureFixture[str],
) -> None:
    app = build(make_app, fallback_on=("connect", "timeout", "read_timeout", "429", "5xx"))
    upstream.post(A_CHAT, body=requests.ReadTimeout("generating"))
    upstream.post(B_CHAT, body=ANSWER, content_type="application/json")

    response = post(app, auth, model="gpt-4o-mini", content="x" * 400)

    assert response.status_code == 200
    assert urls(upstream) == [A_CHAT, B_CHAT]
    sent_to_a = body_of(upstream.calls[0])
    (line,) = access(capsys)
    assert line["attempts"] == [f"a: read_timeout (~{-(-len(sent_to_a) // 4)} tokens)"]
    assert line["abandoned_tokens"] == -(-len(sent_to_a) // 4) > 100


@pytest.mark.parametrize(
    "failure",
    [requests.ConnectTimeout("connecting"), requests.ConnectionError("refused")],
)
def test_a_connect_failure_still_falls_back_and_costs_nothing(
    make_app: MakeApp,
    auth: dict[str, str],
    upstream: responses.RequestsMock,
    capsys: pytest.CaptureFixture[str],
    failure: Exception,
) -> None:
    app = build(make_app)
    upstream.post(A_CHAT, body=failure)
    upstream.post(B_CHAT, body=ANSWER, content_type="application/json")

    assert post(app, auth, model="gpt-4o-mini").status_code == 200
    (line,) = access(capsys)
    assert "abandoned_tokens" not in line


def test_a_streams_timeout_before_its_head_still_falls_back(
    make_app: MakeApp, auth: dict[str, str], upstream: responses.RequestsMock
) -> None:
    app = build(make_app)
    upstream.post(A_CHAT, body=requests.ReadTimeout("no headers"))
    upstream.post(B_CHAT, body=expected_stream(2), content_type="text/event-stream")

    response = post(app, auth, model="gpt-4o-mini", stream=True)

    assert response.status_code == 200
    assert urls(upstream) == [A_CHAT, B_CHAT]


FIRST = b'data: {"choices":[{"delta":{"content":"tok0"}}]}\n\n'


@pytest.mark.parametrize(
    ("failure", "changes"),
    [
        (TimeoutError("read timed out"), {}),  # a generation longer than read_timeout
        (None, {"max_response_body_bytes": 200}),  # an answer over the limit
    ],
)
def test_a_long_generation_or_answer_mid_body_cools_nothing(
    make_app: MakeApp,
    auth: dict[str, str],
    upstream: responses.RequestsMock,
    failure: BaseException | None,
    changes: dict[str, Any],
) -> None:
    app = make_app(
        providers=(Provider(name="a", base_url=A_URL, api_key=A_KEY),),
        routes=(ModelRoute(name="qwen-plus", deployments=(Deployment(provider="a"),)),),
        routing=RoutingPolicy(failures_before_cooldown=1),
        **changes,
    )
    chunks = [FIRST] * (10 if changes else 1)
    upstream.add(ScriptedAnswer("POST", A_CHAT, chunks, failure))

    relayed = app.test_client().post(
        CHAT, json={"model": "qwen-plus", "messages": [], "stream": True}, headers=auth
    )
    body = relayed.get_data()
    relayed.close()

    assert body.startswith(FIRST) and b'"error"' in body  # it did fail
    assert router_of(app).cooling() == []


# --- stream_options ---------------------------------------------------------------------
def refusing_stream_options(
    sent: list[dict[str, Any]],
) -> Callable[[Any], tuple[int, dict[str, str], bytes]]:
    """A provider (an older vLLM, say) that answers 400 to a field it does not know."""

    def answer(request: Any) -> tuple[int, dict[str, str], bytes]:
        body = json.loads(request.body)
        sent.append(body)
        if "stream_options" in body:
            message = "1 validation error: stream_options: Extra inputs are not permitted"
            return 400, {"Content-Type": "application/json"}, error(message)
        return 200, {"Content-Type": "text/event-stream"}, expected_stream(3, model="qwen-plus")

    return answer


def test_a_provider_refusing_stream_options_is_asked_again_without_and_remembered(
    make_app: MakeApp,
    auth: dict[str, str],
    upstream: responses.RequestsMock,
    capsys: pytest.CaptureFixture[str],
) -> None:
    app = build(make_app)
    sent: list[dict[str, Any]] = []
    upstream.add_callback(responses.POST, A_CHAT, callback=refusing_stream_options(sent))

    first = post(app, auth, model="qwen-plus", stream=True)
    second = post(app, auth, model="qwen-plus", stream=True)

    assert first.status_code == second.status_code == 200
    assert first.data == second.data == expected_stream(3, model="qwen-plus")
    assert ["stream_options" in body for body in sent] == [True, False, False]
    assert urls(upstream) == [A_CHAT] * 3  # never sent to b
    first_line, second_line = access(capsys)
    assert first_line["attempts"] == ["a: stream_options_refused"]
    assert first_line["usage_estimated"] is True and second_line["usage_estimated"] is True
    assert router_of(app).cooling() == []


def test_a_400_the_client_caused_is_relayed_and_stream_options_kept(
    make_app: MakeApp, auth: dict[str, str], upstream: responses.RequestsMock
) -> None:
    app = build(make_app)
    bad = error("temperature must be at most 2", "invalid_parameter_error")
    upstream.post(A_CHAT, status=400, body=bad, content_type="application/json")

    refused = post(app, auth, model="qwen-plus", stream=True, temperature=9)
    upstream.replace(
        responses.POST,
        A_CHAT,
        body=expected_stream(2, usage=True),
        content_type="text/event-stream",
    )
    post(app, auth, model="qwen-plus", stream=True)

    assert (refused.status_code, refused.data) == (400, bad)
    sent = [json.loads(body_of(c)) for c in upstream.calls]
    assert ["stream_options" in body for body in sent] == [True, False, True]


def test_a_client_asking_for_usage_itself_is_never_retried(
    make_app: MakeApp, auth: dict[str, str], upstream: responses.RequestsMock
) -> None:
    app = build(make_app)
    sent: list[dict[str, Any]] = []
    upstream.add_callback(responses.POST, A_CHAT, callback=refusing_stream_options(sent))

    response = post(
        app, auth, model="qwen-plus", stream=True, stream_options={"include_usage": True}
    )

    assert response.status_code == 400  # the client's own field: its answer
    assert len(sent) == 1


def test_an_attempt_abandoned_after_the_provider_had_it_is_charged_with_the_answer() -> None:
    from gateway.policy.usage import settle_usage
    from gateway.record import RequestRecord

    record = RequestRecord("r", "POST", "/v1/chat/completions", "/v1/chat/completions")
    record.usage = {"prompt_tokens": 10, "completion_tokens": 5}
    record.abandoned_tokens = 46  # "a: read_timeout (~46 tokens)"
    assert settle_usage(record) == 61


@pytest.mark.parametrize(
    ("status", "body", "model"),
    [
        # Anthropic's generic wording for a resource (a beta, a tool) the key lacks.
        (
            403,
            b'{"type":"error","error":{"type":"permission_error","message":"Your API key '
            b'does not have permission to use the specified resource."}}',
            "claude-x",
        ),
        (
            403,
            b'{"error":{"message":"This request has been blocked by our content filters. '
            b'account flagged"}}',
            "m",
        ),
        # A client naming its model "model" does not erase that word from the message.
        (401, b'{"error":{"message":"You are not allowed to sample from this model"}}', "model"),
    ],
)
def test_a_refusal_a_request_can_steer_cools_no_provider(
    status: int, body: bytes, model: str
) -> None:
    assert refuses_gateway_key(status, body, model) is False
