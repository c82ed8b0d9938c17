"""Keys for teams under real gunicorn: model lists, token limits, quotas, usage, the SDK.

Token bursts are exact to within one request's tokens: a request is admitted while its
key's window is below the limit, holding its estimate (prompt bytes / 4 + max_tokens)
until its real tokens replace it. The fake provider here counts tokens the same way
(`usage_from_size`), so a burst of identical requests costing c tokens each admits exactly
ceil(limit / c) of them: between the limit and the limit plus one request's tokens.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest
import requests

from tests.constants import GATEWAY_KEY
from tests.e2e.conftest import Gateway, GatewayFactory, RedisServer
from tests.fake_upstream import STREAM_USAGE, FakeUpstream

TEAM_KEY = "team-a-key-0123456789"
TEAM_B_KEY = "team-b-key-9876543210"
ADMIN_KEY = "admin-key-for-tests-0123"
TEAM = {"Authorization": f"Bearer {TEAM_KEY}"}
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
KEYS_ENV = {"TEAM_A_KEY": TEAM_KEY, "GATEWAY_ADMIN_KEY": ADMIN_KEY}


def config(**team_rules: Any) -> str:
    digest = hashlib.sha256(TEAM_B_KEY.encode()).hexdigest()
    rules = "".join(f"    {name}: {json.dumps(value)}\n" for name, value in team_rules.items())
    return (
        "keys:\n"
        "  - name: team-a\n    key_env: TEAM_A_KEY\n" + rules + "  - name: team-b\n"
        f"    key: sha256:{digest}\n    models: [qwen-*]\n"
    )


def chat_calls(fake: FakeUpstream) -> int:
    return sum(1 for r in fake.requests if r.path.endswith("/chat/completions"))


def access_lines(gateway: Gateway, expected: int) -> list[dict[str, Any]]:
    """The access lines of /v1 requests, once `expected` of them are written (bounded)."""
    lines: list[dict[str, Any]] = []
    for _ in range(200):
        lines = [
            entry
            for entry in (json.loads(x) for x in gateway.logs().splitlines() if x.startswith("{"))
            if entry.get("event") == "access" and entry["path"].startswith("/v1/chat")
        ]
        if len(lines) >= expected:
            break
        time.sleep(0.05)
    return lines


def away_from_a_minute_boundary() -> None:
    """The tpm window is this clock minute: start a burst with at least 10 s of it left."""
    left = 60 - time.time() % 60
    if left < 10:
        time.sleep(left + 0.1)


def test_a_model_outside_the_list_is_403_and_never_sent(
    start_gateway: GatewayFactory, fake_upstream: FakeUpstream
) -> None:
    gateway = start_gateway(config(models=["qwen-*"]), **KEYS_ENV)
    sdk = openai.OpenAI(base_url=gateway.url + "/v1", api_key=TEAM_KEY, max_retries=0)
    before = chat_calls(fake_upstream)

    with pytest.raises(openai.PermissionDeniedError) as denied:
        sdk.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])

    assert denied.value.code == "model_not_allowed" and "gpt-4o" in denied.value.message
    assert chat_calls(fake_upstream) == before
    allowed = sdk.chat.completions.create(model="qwen-max", messages=[])
    assert allowed.usage is not None and chat_calls(fake_upstream) == before + 1


def burst(gateways: list[Gateway], total: int, max_tokens: int) -> list[requests.Response]:
    body = orjson.dumps(
        {
            "model": "qwen-plus",
            "messages": [],
            "max_tokens": max_tokens,
            "fake": {"usage_from_size": True},
        }
    )
    headers = {**TEAM, "Content-Type": "application/json"}

    def one(i: int) -> requests.Response:
        url = gateways[i % len(gateways)].url + "/v1/chat/completions"
        return requests.post(url, data=body, headers=headers, timeout=30)

    with ThreadPoolExecutor(max_workers=32) as pool:
        return list(pool.map(one, range(total), timeout=120))


def cost_of(answers: list[requests.Response]) -> int:
    costs = {a.json()["usage"]["total_tokens"] for a in answers if a.status_code == 200}
    assert len(costs) == 1  # identical requests, identical cost
    return costs.pop()


def test_a_burst_over_tpm_admits_the_limit_within_one_request(
    start_gateway: GatewayFactory,
) -> None:
    gateway = start_gateway(config(tpm=1000), GUNICORN_THREADS="64", **KEYS_ENV)
    away_from_a_minute_boundary()

    answers = burst([gateway], 60, max_tokens=50)

    statuses = Counter(a.status_code for a in answers)
    cost = cost_of(answers)
    assert statuses == Counter({200: math.ceil(1000 / cost), 429: 60 - math.ceil(1000 / cost)})
    assert 1000 <= statuses[200] * cost < 1000 + cost
    refused = next(a for a in answers if a.status_code == 429)
    assert refused.json()["error"]["type"] == "tokens"
    assert refused.headers["x-ratelimit-remaining-tokens"] == "0"


def test_two_instances_on_one_redis_share_one_token_budget(
    start_gateway: GatewayFactory, redis_url: str
) -> None:
    env = {**KEYS_ENV, "RATE_LIMIT_STORAGE_URI": redis_url}
    first = start_gateway(config(tpm=1000), **env)
    second = start_gateway(config(tpm=1000), **env)
    away_from_a_minute_boundary()

    answers = burst([first, second], 60, max_tokens=50)

    statuses = Counter(a.status_code for a in answers)
    admitted_by = Counter(a.url.split("/v1")[0] for a in answers if a.status_code == 200)
    assert statuses[200] == math.ceil(1000 / cost_of(answers))
    assert set(admitted_by) == {first.url, second.url}  # both served, from one budget
    usage = requests.get(second.url + "/v1/usage", headers=ADMIN, timeout=5).json()
    team = next(k for k in usage["keys"] if k["key"] == "team-a")
    assert team["minute"]["tokens"] == statuses[200] * cost_of(answers)
    assert (
        requests.get(first.url + "/v1/usage", headers=ADMIN, timeout=5).json()["keys"]
        == (usage["keys"])
    )


def test_a_daily_quota_is_insufficient_quota_for_the_sdk(start_gateway: GatewayFactory) -> None:
    gateway = start_gateway(config(tokens_per_day=20), **KEYS_ENV)
    sdk = openai.OpenAI(base_url=gateway.url + "/v1", api_key=TEAM_KEY, max_retries=0)
    first = sdk.chat.completions.create(model="qwen-plus", messages=[])
    second = sdk.chat.completions.create(model="qwen-plus", messages=[])  # 11 used: admitted
    assert first.usage is not None and second.usage is not None

    with pytest.raises(openai.RateLimitError) as spent:
        sdk.chat.completions.create(model="qwen-plus", messages=[])

    assert spent.value.code == "insufficient_quota"
    assert "resets at" in spent.value.message and "22 of 20" in spent.value.message
    assert spent.value.response.headers["x-should-retry"] == "false"


def raw_stream(url: str, headers: dict[str, str], body: dict[str, Any]) -> requests.Response:
    response = requests.post(url, data=orjson.dumps(body), headers=headers, timeout=30)
    assert response.status_code == 200
    return response


@pytest.mark.parametrize("asked", [False, True], ids=["client-did-not-ask", "client-asked"])
def test_a_stream_is_byte_identical_to_the_providers_own(
    start_gateway: GatewayFactory, fake_upstream: FakeUpstream, asked: bool
) -> None:
    gateway = start_gateway(config(tpm=100000), **KEYS_ENV)
    body: dict[str, Any] = {
        "model": "qwen-plus",
        "stream": True,
        "messages": [],
        "fake": {"chunks": 6},
    }
    if asked:
        body["stream_options"] = {"include_usage": True}
    direct = raw_stream(fake_upstream.url + "/chat/completions", {}, body)

    relayed = raw_stream(gateway.url + "/v1/chat/completions", TEAM, body)

    assert relayed.content == direct.content
    assert (b'"usage"' in relayed.content) is asked
    assert relayed.headers["x-ratelimit-limit-tokens"] == "100000"  # sent before the body
    (line,) = access_lines(gateway, 1)
    assert line["usage"] == STREAM_USAGE and line["key_name"] == "team-a"
    assert "usage_estimated" not in line


def test_usage_api_agrees_with_the_access_log(start_gateway: GatewayFactory) -> None:
    gateway = start_gateway(config(tokens_per_month=10**6), **KEYS_ENV)
    url = gateway.url + "/v1/chat/completions"
    odd_usage = {"prompt_tokens": -4, "completion_tokens": 10**18, "total_tokens": "x"}
    bodies: list[tuple[dict[str, str], dict[str, Any]]] = [
        (TEAM, {"model": "qwen-plus", "messages": []}),
        (TEAM, {"model": "qwen-plus", "messages": [], "stream": True}),
        (TEAM, {"model": "qwen-plus", "stream": True, "stream_options": {"include_usage": True}}),
        # A provider reporting usage in every chunk is charged once.
        (TEAM, {"model": "q", "stream": True, "fake": {"usage_in_every_chunk": True}}),
        # A provider that reports no usage: estimated.
        (TEAM, {"model": "qwen-plus", "messages": [], "fake": {"no_usage": True}}),
        # A stream the provider breaks off: estimated from what was relayed.
        (TEAM, {"model": "qwen-plus", "stream": True, "fake": {"chunks": 5, "die_after": 3}}),
        (TEAM, {"model": "qwen-plus", "stream": True, "fake": {"usage": odd_usage}}),
        ({"Authorization": f"Bearer {GATEWAY_KEY}"}, {"model": "qwen-plus", "messages": []}),
    ]
    for headers, body in bodies:
        with requests.post(url, data=orjson.dumps(body), headers=headers, timeout=30) as answer:
            assert answer.status_code == 200
            answer.content  # noqa: B018 - read to the end
    # A gateway key cannot read anyone's usage, its own neither.
    assert requests.get(gateway.url + "/v1/usage", headers=TEAM, timeout=5).status_code == 403

    lines = access_lines(gateway, len(bodies))
    report = requests.get(gateway.url + "/v1/usage", headers=ADMIN, timeout=5).json()

    logged: Counter[str] = Counter()
    for line in lines:
        usage = line["usage"]
        parts = usage.get("prompt_tokens", 0) + usage.get("completion_tokens", 0)
        logged[line["key_name"] or line["key_id"]] += max(parts, usage.get("total_tokens", 0))
    reported = {k["key"]: k["month"]["tokens"] for k in report["keys"] if k["month"]["tokens"]}
    assert reported == dict(logged)
    assert sum(1 for line in lines if line.get("usage_estimated")) == 2
    assert report["keys"][-1]["month"]["limit"] is None  # team-b: no quota


def test_a_redis_outage_keeps_answering_with_one_log_line(
    start_gateway: GatewayFactory, redis_server: RedisServer, tmp_path: Path
) -> None:
    gateway = start_gateway(
        config(tpm=10**6), RATE_LIMIT_STORAGE_URI=redis_server.url, LOG_LEVEL="INFO", **KEYS_ENV
    )
    url = gateway.url + "/v1/chat/completions"
    body = orjson.dumps({"model": "qwen-plus", "messages": []})
    assert requests.post(url, data=body, headers=TEAM, timeout=10).status_code == 200
    redis_server.process.kill()
    redis_server.process.wait(10)

    statuses = Counter(
        requests.post(url, data=body, headers=TEAM, timeout=10).status_code for _ in range(20)
    )

    assert statuses == Counter({200: 20})
    assert requests.get(gateway.url + "/ready", timeout=5).status_code == 200
    logs = gateway.logs()
    assert logs.count("token limit storage unreachable") == 1
    assert "Traceback" not in logs
