"""Issue 16, items 1 and 2, under real gunicorn with fake providers answering as OpenAI and
DashScope do: one tenant's request cools nothing for the others, and a slow non-streamed
generation is generated at one provider only.

Provider `a` is preferred (weight 1000 against 0.001), as in test_routing.py. A request
scripts its own answer with a `fake` field, which both providers receive.
"""

from __future__ import annotations

from typing import Any

import pytest
import requests

from tests.constants import GATEWAY_KEY, SECOND_GATEWAY_KEY
from tests.e2e.conftest import Gateway, GatewayFactory
from tests.e2e.test_keys import access_lines
from tests.e2e.test_routing import KEYS
from tests.fake_upstream import FakeUpstream

pytestmark = pytest.mark.e2e

HOSTILE = {"Authorization": f"Bearer {GATEWAY_KEY}"}
OTHERS = {"Authorization": f"Bearer {SECOND_GATEWAY_KEY}"}
MODEL_ACCESS = {
    "error": {
        "message": "Project `proj_abc` does not have access to model `gpt-x`",
        "type": "invalid_request_error",
        "param": None,
        "code": "model_not_found",
    }
}
TOO_LARGE = {
    "error": {
        "message": "Request too large for qwen-plus in organization org-abc on tokens per min "
        "(TPM): Limit 30000, Requested 50000. The input or output tokens must be reduced in "
        "order to run successfully.",
        "type": "tokens",
        "param": None,
        "code": "rate_limit_exceeded",
    }
}


def config(a: FakeUpstream, b: FakeUpstream, *, read_timeout: int = 60, routing: str = "") -> str:
    return f"""
providers:
  a: {{base_url: {a.url}, api_key_env: A_API_KEY, read_timeout: {read_timeout}}}
  b: {{base_url: {b.url}, api_key_env: B_API_KEY, read_timeout: {read_timeout}}}
models:
  gpt-4o-mini:
    - {{provider: a, model: qwen-plus, weight: 1000}}
    - {{provider: b, model: qwen-plus-intl, weight: 0.001}}
  qwen-plus: [a]                         # the same deployment as gpt-4o-mini's first
  qwen-*: [a]
  "*":
    - {{provider: a, weight: 1000}}
    - {{provider: b, weight: 0.001}}
routing:
  cooldown: 300
{routing}
"""


def chat(gateway: Gateway, headers: dict[str, str], **body: Any) -> requests.Response:
    payload = {"messages": [{"role": "user", "content": "hi"}], **body}
    return requests.post(
        gateway.url + "/v1/chat/completions", json=payload, headers=headers, timeout=30
    )


def posted(upstream: FakeUpstream) -> int:
    return sum(r.method == "POST" for r in upstream.requests)


def test_one_403_about_a_model_refuses_no_other_tenants_request(
    start_gateway: GatewayFactory, a: FakeUpstream, b: FakeUpstream
) -> None:
    gateway = start_gateway(config(a, b), **KEYS)

    hostile = chat(
        gateway, HOSTILE, model="gpt-x", fake={"status": 403, "error_body": MODEL_ACCESS}
    )
    others = [chat(gateway, OTHERS, model=m).status_code for m in ["gpt-4o-mini", "qwen-max"] * 6]

    assert hostile.status_code == 403
    assert hostile.json() == MODEL_ACCESS  # the provider's words, not "the gateway's key"
    assert others == [200] * 12
    assert (posted(a), posted(b)) == (13, 0)  # a served all of them; nothing sent on to b
    assert "refused the gateway's credentials" not in gateway.logs()


def test_a_429_request_too_large_with_retry_after_cools_nothing(
    start_gateway: GatewayFactory, a: FakeUpstream, b: FakeUpstream
) -> None:
    gateway = start_gateway(config(a, b), **KEYS)
    script = {"status": 429, "error_body": TOO_LARGE, "headers": {"Retry-After": "300"}}

    too_large = chat(gateway, HOSTILE, model="gpt-4o-mini", fake=script)
    normal = chat(gateway, OTHERS, model="gpt-4o-mini")

    assert too_large.status_code == 429
    assert too_large.json() == TOO_LARGE
    assert normal.status_code == 200
    assert normal.json()["model"] == "qwen-plus"  # served by a
    assert (posted(a), posted(b)) == (2, 0)  # the same body never went to b


def test_three_identical_500s_cool_nothing(
    start_gateway: GatewayFactory, a: FakeUpstream, b: FakeUpstream
) -> None:
    gateway = start_gateway(config(a, b, routing="  failures_before_cooldown: 3"), **KEYS)

    # To a alone (no fallback), whose deployment gpt-4o-mini tries first.
    bad = [chat(gateway, HOSTILE, model="qwen-plus", fake={"status": 500}) for _ in range(3)]
    normal = chat(gateway, OTHERS, model="gpt-4o-mini")

    assert [r.status_code for r in bad] == [500] * 3
    assert normal.status_code == 200
    assert normal.json()["model"] == "qwen-plus"  # served by a: it is not cooling
    assert (posted(a), posted(b)) == (4, 0)


def test_on_a_wildcard_route_model_x_failing_does_not_cool_model_y(
    start_gateway: GatewayFactory, a: FakeUpstream, b: FakeUpstream
) -> None:
    gateway = start_gateway(config(a, b, routing="  failures_before_cooldown: 1"), **KEYS)
    a.forced = {"status": 503}

    failed_over = chat(gateway, HOSTILE, model="model-x")
    a.forced = {}
    y = chat(gateway, OTHERS, model="model-y")
    x = chat(gateway, OTHERS, model="model-x")

    assert failed_over.status_code == 200
    assert (y.status_code, x.status_code) == (200, 200)
    models_at_a = [r.body for r in a.requests if r.method == "POST"]
    assert len(models_at_a) == 2 and b'"model-y"' in models_at_a[1]  # y at a
    assert posted(b) == 2  # x, with a cooling for it, went to b both times


def test_a_slow_generation_past_read_timeout_is_generated_at_one_provider_only(
    start_gateway: GatewayFactory, a: FakeUpstream, b: FakeUpstream
) -> None:
    gateway = start_gateway(config(a, b, read_timeout=2), **KEYS)

    answers = [
        chat(gateway, HOSTILE, model="gpt-4o-mini", fake={"sleep_before": 4}) for _ in range(2)
    ]

    assert [r.status_code for r in answers] == [504, 504]
    assert (posted(a), posted(b)) == (2, 0)  # 2 generations for 2 requests, not 6
    lines = access_lines(gateway, 2)
    assert [line.get("attempts") for line in lines] == [None, None]


def test_a_read_timeout_falls_back_when_configured_and_lists_its_cost(
    start_gateway: GatewayFactory, a: FakeUpstream, b: FakeUpstream
) -> None:
    routing = '  fallback_on: [connect, timeout, read_timeout, "429", 5xx]'
    gateway = start_gateway(config(a, b, read_timeout=2, routing=routing), **KEYS)
    a.forced = {"sleep_before": 4}

    answer = chat(gateway, HOSTILE, model="gpt-4o-mini")

    assert answer.status_code == 200
    assert (posted(a), posted(b)) == (1, 1)
    (line,) = access_lines(gateway, 1)
    sent = next(r.body for r in a.requests if r.method == "POST")
    assert line["attempts"] == [f"a: read_timeout (~{-(-len(sent) // 4)} tokens)"]
