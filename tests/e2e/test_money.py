"""Money under real gunicorn: budgets that hold under concurrent bursts, across two
instances on one real redis-server and across the keys of a team; the cost of every answer
the same in the access log, /v1/usage and /metrics; prices reloaded on SIGHUP; and the
official SDK told not to retry a spent budget. The fake provider's `usage_from_size`
reports what the gateway reserves (ceil(bytes / 4) prompt tokens, max_tokens output), so a
burst of identical requests each costing c admits exactly floor(budget / c): never past the
budget, and within one request's cost of it."""

from __future__ import annotations

import hashlib
import math
import os
import re
import signal
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest
import requests

from gateway.policy.counters import Hold, RedisCounters
from tests.constants import GATEWAY_KEY
from tests.e2e.conftest import Gateway, GatewayFactory
from tests.e2e.test_keys import ADMIN, KEYS_ENV, TEAM, TEAM_B_KEY, TEAM_KEY, access_lines
from tests.e2e.test_reload import worker_pids
from tests.fake_upstream import FakeUpstream

TEAM_B = {"Authorization": f"Bearer {TEAM_B_KEY}"}
CHAT = "/v1/chat/completions"
# 1 CNY per million input tokens, 2 per million output: 1,000 and 2,000 nano-CNY a token.
PRICES = "prices:\n  currency: CNY\n  models:\n    qwen-plus: {input: 1, output: 2}\n"


def config(a: str = "", b: str = "", teams: str = "", prices: str = PRICES) -> str:
    """team-a (key_env TEAM_A_KEY) and team-b with their extra rules, teams, prices."""
    digest = hashlib.sha256(TEAM_B_KEY.encode()).hexdigest()
    return (
        f"keys:\n  - name: team-a\n    key_env: TEAM_A_KEY\n{a}"
        f"  - name: team-b\n    key: sha256:{digest}\n{b}" + teams + prices
    )


def body(max_tokens: int = 1000, **extra: Any) -> bytes:
    payload = {"model": "qwen-plus", "messages": [], "max_tokens": max_tokens}
    return orjson.dumps({**payload, "fake": {"usage_from_size": True}, **extra})


def nanos(payload: bytes, output: int) -> int:
    return math.ceil(len(payload) / 4) * 1000 + output * 2000


def post(gateway: Gateway, payload: bytes, headers: dict[str, str]) -> requests.Response:
    headers = {**headers, "Content-Type": "application/json"}
    return requests.post(gateway.url + CHAT, data=payload, headers=headers, timeout=30)


def burst(calls: list[tuple[Gateway, dict[str, str]]], total: int) -> list[requests.Response]:
    payload = body()
    with ThreadPoolExecutor(max_workers=32) as pool:
        return list(
            pool.map(
                lambda i: post(calls[i % len(calls)][0], payload, calls[i % len(calls)][1]),
                range(total),
            )
        )


def usage(gateway: Gateway) -> dict[str, Any]:
    report = requests.get(gateway.url + "/v1/usage", headers=ADMIN, timeout=5)
    assert report.status_code == 200, report.text
    return dict(report.json())


def spent(report: dict[str, Any], section: str, name: str, window: str) -> int:
    """What /v1/usage says `name` spent, in nano-units."""
    field = "key" if section == "keys" else "team"
    row = next(r for r in report[section] if r[field] == name)
    return int(Decimal(row["cost"][window]["spent"]) * 10**9)


def assert_spent_budget(refused: requests.Response, budget: str) -> None:
    assert refused.status_code == 429
    error = refused.json()["error"]
    assert error["code"] == "insufficient_quota" and f"{budget} CNY" in error["message"]
    assert refused.headers["x-should-retry"] == "false"


def test_a_concurrent_burst_admits_within_one_requests_maximum_cost(
    start_gateway: GatewayFactory, fake_upstream: FakeUpstream
) -> None:
    gateway = start_gateway(config(a="    budget_per_day: 0.02\n"), **KEYS_ENV)
    cost = nanos(body(), 1000)
    before = len(fake_upstream.requests)

    answers = burst([(gateway, TEAM)], 40)

    statuses = Counter(a.status_code for a in answers)
    assert statuses == Counter({200: 20_000_000 // cost, 429: 40 - 20_000_000 // cost})
    assert len(fake_upstream.requests) - before == statuses[200]  # nothing else sent
    assert_spent_budget(next(a for a in answers if a.status_code == 429), "0.02")
    total = spent(usage(gateway), "keys", "team-a", "day")
    assert total == statuses[200] * cost and 20_000_000 - cost < total <= 20_000_000


def test_two_instances_on_one_redis_hold_a_team_budget_shared_by_two_keys(
    start_gateway: GatewayFactory, redis_url: str
) -> None:
    teams = "teams:\n  - name: search\n    budget_per_month: 0.03\n"
    text = config(a="    team: search\n", b="    team: search\n", teams=teams)
    env = {**KEYS_ENV, "RATE_LIMIT_STORAGE_URI": redis_url}
    first, second = start_gateway(text, **env), start_gateway(text, **env)
    cost = nanos(body(), 1000)

    calls = [(first, TEAM), (second, TEAM_B), (first, TEAM_B), (second, TEAM)]
    answers = burst(calls, 60)

    admitted = sum(a.status_code == 200 for a in answers)
    assert admitted == 30_000_000 // cost
    refused = next(a for a in answers if a.status_code == 429)
    assert_spent_budget(refused, "0.03")
    assert "team 'search'" in refused.json()["error"]["message"]
    for gateway in (first, second):  # one count, whichever instance is asked
        report = usage(gateway)
        assert spent(report, "teams", "search", "month") == admitted * cost
        by_key = spent(report, "keys", "team-a", "month") + spent(report, "keys", "team-b", "month")
        assert by_key == admitted * cost


def test_a_model_without_a_price_is_refused_for_a_budgeted_key_only(
    start_gateway: GatewayFactory, fake_upstream: FakeUpstream
) -> None:
    gateway = start_gateway(config(a="    budget_total: 5\n"), **KEYS_ENV)
    before = len(fake_upstream.requests)

    refused = post(gateway, orjson.dumps({"model": "qwen-max", "messages": []}), TEAM)

    assert refused.status_code == 403
    error = refused.json()["error"]
    assert error["code"] == "model_not_priced" and "qwen-max" in error["message"]
    assert len(fake_upstream.requests) == before
    unbudgeted = post(gateway, orjson.dumps({"model": "qwen-max", "messages": []}), TEAM_B)
    assert unbudgeted.status_code == 200 and "x-gateway-cost" not in unbudgeted.headers
    (line, *_) = [x for x in access_lines(gateway, 2) if x["status"] == 200]
    assert "cost" not in line  # no price: no cost, never a made-up one


def metric_costs(gateway: Gateway) -> dict[str, Decimal]:
    text = requests.get(gateway.url + "/metrics", timeout=5).text
    found: dict[str, Decimal] = {}
    for key, value in re.findall(r'gateway_cost_total\{[^}]*key="([^"]+)"[^}]*\} (\S+)', text):
        found[key] = found.get(key, Decimal(0)) + Decimal(value)
    return found


def test_cost_in_the_access_log_equals_usage_and_the_metric(
    start_gateway: GatewayFactory,
) -> None:
    prices = PRICES + "  deployments:\n    - {provider: default, model: qwen-turbo, input: 3, "
    prices += "cached_input: 0.5, output: 4}\n"
    gateway = start_gateway(config(a="    budget_per_month: 100\n", prices=prices), **KEYS_ENV)
    cached = {
        "prompt_tokens": 1000,
        "completion_tokens": 7,
        "total_tokens": 1007,
        "prompt_tokens_details": {"cached_tokens": 600},
    }
    sent = [
        (TEAM, body(50)),
        (TEAM, body(70, stream=True)),
        (TEAM_B, body(30)),
        (TEAM, orjson.dumps({"model": "qwen-turbo", "messages": [], "fake": {"usage": cached}})),
    ]
    answers = []
    for headers, payload in sent:
        with post(gateway, payload, headers) as answer:
            assert answer.status_code == 200, answer.text
            answer.content  # noqa: B018 - read to the end
            answers.append(answer)

    lines = access_lines(gateway, len(sent))
    logged: Counter[str] = Counter()
    for line in lines:
        logged[line["key_name"]] += Decimal(line["cost"])  # type: ignore[assignment]
        assert line["currency"] == "CNY" and "cost_estimated" not in line
    # The deployment's price, cached tokens at cached_input: 400 x 3 + 600 x 0.5 + 7 x 4.
    assert answers[3].headers["x-gateway-cost"] == "0.001528"
    assert answers[0].headers["x-gateway-cost"] == money_of(nanos(body(50), 50))
    assert "x-gateway-cost" not in answers[1].headers  # a stream's comes last: log only
    report = usage(gateway)
    for key in ("team-a", "team-b"):
        assert spent(report, "keys", key, "month") == logged[key] * 10**9
        assert spent(report, "keys", key, "total") == logged[key] * 10**9
    assert metric_costs(gateway) == {k: Decimal(v) for k, v in logged.items()}


def money_of(amount: int) -> str:
    return format((Decimal(amount) / 10**9).normalize(), "f")


def test_new_prices_on_sighup_apply_to_the_next_request(
    start_gateway: GatewayFactory, tmp_path: Path
) -> None:
    path = tmp_path / "money_prices.yaml"
    path.write_text(config())
    gateway = start_gateway(GATEWAY_CONFIG=str(path), **KEYS_ENV)
    payload = body(10)
    assert post(gateway, payload, TEAM).headers["x-gateway-cost"] == money_of(nanos(payload, 10))
    workers = worker_pids(gateway)

    path.write_text(config(prices=PRICES.replace("{input: 1, output: 2}", "{input: 2, output: 4}")))
    gateway.process.send_signal(signal.SIGHUP)
    for _ in range(300):  # bounded: the old workers replaced
        if (pids := worker_pids(gateway)) and not pids & workers:
            break
        time.sleep(0.1)

    doubled = post(gateway, payload, TEAM)
    assert doubled.headers["x-gateway-cost"] == money_of(2 * nanos(payload, 10))


def test_the_sdk_raises_rate_limit_error_insufficient_quota_and_does_not_retry(
    start_gateway: GatewayFactory, fake_upstream: FakeUpstream
) -> None:
    gateway = start_gateway(config(a="    budget_per_day: 0.000001\n"), **KEYS_ENV)
    sdk = openai.OpenAI(base_url=gateway.url + "/v1", api_key=TEAM_KEY, max_retries=3)
    before = len(fake_upstream.requests)

    with pytest.raises(openai.RateLimitError) as spent_budget:
        sdk.chat.completions.create(model="qwen-plus", messages=[], max_tokens=100)

    assert spent_budget.value.code == "insufficient_quota"
    assert "0.000001 CNY" in spent_budget.value.message
    assert len(fake_upstream.requests) == before
    lines = access_lines(gateway, 1)
    time.sleep(0.5)  # a retry would have been logged by now
    assert [x["status"] for x in access_lines(gateway, 1)] == [429] == [x["status"] for x in lines]


def test_a_client_leaving_mid_stream_pays_for_what_was_relayed(
    start_gateway: GatewayFactory,
) -> None:
    gateway = start_gateway(config(a="    budget_per_day: 1\n"), **KEYS_ENV)
    payload = orjson.dumps(
        {
            "model": "qwen-plus",
            "messages": [],
            "stream": True,
            "max_tokens": 5000,
            "fake": {"chunks": 40, "delay": 0.1},
        }
    )
    headers = {**TEAM, "Content-Type": "application/json"}
    with requests.post(gateway.url + CHAT, data=payload, headers=headers, stream=True) as answer:
        assert answer.status_code == 200
        lines = answer.iter_lines()
        for _ in range(3):
            next(lines)
    (line,) = access_lines(gateway, 1)

    assert line["client_disconnected"] and line["cost_estimated"]
    cost = int(Decimal(line["cost"]) * 10**9)
    assert 0 < cost < nanos(payload, 5000)  # never nothing, never the whole reservation
    for _ in range(50):  # the settlement lands as the line is written
        if spent(usage(gateway), "keys", "team-a", "day") == cost:
            break
        time.sleep(0.1)
    assert spent(usage(gateway), "keys", "team-a", "day") == cost


def test_redis_counters_hold_settle_and_release_money_by_its_own_amount(redis_url: str) -> None:
    counters = RedisCounters(redis_url)
    keys = ("ai-gateway:tokens:{team:t}key_1:day:1", "ai-gateway:tokens:{team:t}:cost-total:all")
    limits = [0, -1000]
    now = time.time()
    assert counters.reserve(Hold("a", keys, (5, 600), now + 60), limits, now) == [0, 5, 600]
    assert counters.reserve(Hold("b", keys, (5, 401), now + 60), limits, now)[0] == 2
    assert counters.reserve(Hold("c", keys, (5, 400), now + 2), limits, now) == [0, 10, 1000]
    counters.settle(Hold("a", keys, (5, 600), now + 60), [(keys[0], 3), (keys[1], 250)], now)
    assert counters.read([*keys, keys[0]], now)[:2] == [8, 650]
    # "c" was never settled (its worker died): released at its deadline, by its amounts.
    assert counters.read([*keys, keys[0]], now + 3)[:2] == [3, 250]


def test_the_unbudgeted_env_key_is_still_served_and_costed(start_gateway: GatewayFactory) -> None:
    gateway = start_gateway(config(), **KEYS_ENV)
    answer = post(gateway, body(5), {"Authorization": f"Bearer {GATEWAY_KEY}"})
    assert answer.status_code == 200
    assert answer.headers["x-gateway-cost"] == money_of(nanos(body(5), 5))


@pytest.fixture(params=["sqlite", "redis"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, str]:
    if request.param == "redis":
        return {"RATE_LIMIT_STORAGE_URI": request.getfixturevalue("redis_url")}
    return {"TOKEN_STORE_FILE": str(tmp_path / "money_quotas.sqlite3")}


def test_a_killed_workers_money_hold_is_released_within_its_expiry(
    start_gateway: GatewayFactory, storage: dict[str, str]
) -> None:
    teams = "teams:\n  - name: search\n    budget_per_month: 1\n"
    text = config(a="    team: search\n    budget_per_day: 1\n", teams=teams)
    gateway = start_gateway(text, TOKEN_RESERVATION_TTL="8", **storage, **KEYS_ENV)
    payload = body(5000, stream=True, fake={"chunks": 100, "delay": 0.2})
    headers = {**TEAM, "Content-Type": "application/json"}
    stream = requests.post(gateway.url + CHAT, data=payload, headers=headers, stream=True)
    assert stream.status_code == 200
    lines = stream.iter_lines()  # kept: a dropped iterator closes the connection
    next(lines)  # under way
    killed_at = time.monotonic()
    held = nanos(payload, 5000)
    report = usage(gateway)
    assert spent(report, "keys", "team-a", "day") == held  # its maximum cost, in flight
    assert spent(report, "teams", "search", "month") == held

    workers = worker_pids(gateway)
    for pid in workers:
        os.kill(pid, signal.SIGKILL)  # mid-stream: nothing will ever settle it
    stream.close()
    for _ in range(300):  # bounded: the new worker answers, then the hold expires
        if (pids := worker_pids(gateway)) and not pids & workers:
            try:
                if spent(usage(gateway), "teams", "search", "month") == 0:
                    break
            except (requests.RequestException, AssertionError):
                pass
        time.sleep(0.1)
    report = usage(gateway)
    assert spent(report, "keys", "team-a", "day") == 0
    assert spent(report, "teams", "search", "month") == 0
    assert time.monotonic() - killed_at < 8 + 15  # within the expiry (plus polling)
