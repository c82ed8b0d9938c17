"""Money: prices looked up deployment over model, tiers, exact arithmetic, budgets reserved
with the token windows and settled with the real cost (memory and SQLite stores here; Redis
in tests/e2e/test_money.py), and what a request sees: 403, 429, x-gateway-cost."""

from __future__ import annotations

import hashlib
import json
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import responses
from flask.testing import FlaskClient
from werkzeug.test import TestResponse

from gateway.config import KeyPolicy, ModelRoute, Pricing, Team
from gateway.config.schema import GatewayFile
from gateway.policy.counters import Hold, MemoryCounters
from gateway.policy.keys import Caller
from gateway.policy.prices import NANOS, PriceBook, cost_nanos, money, to_nanos, usage_cost
from gateway.policy.sqlite_counters import SqliteCounters
from gateway.policy.tokens import TokenBudget
from tests.constants import UNIT_UPSTREAM
from tests.unit.support import MakeApp, assert_openai_error

KEY = "budget-key-0123456789"
OTHER = "budget-key-9876543210"
ADMIN_KEY = "admin-key-0123456789"
CHAT = "/v1/chat/completions"
UPSTREAM_CHAT = f"{UNIT_UPSTREAM}/chat/completions"
PRICING = Pricing.model_validate(
    {
        "currency": "CNY",
        "default_max_tokens": 100,
        "models": {
            "qwen-plus": {
                "input": "0.8",
                "cached_input": "0.16",
                "output": "2",
                "tiers": [
                    {"above": 131072, "input": "2.4", "output": "20"},
                    {"above": 262144, "input": "4.8", "output": "48"},
                ],
            }
        },
        "deployments": [
            {"provider": "default", "model": "qwen-plus-cheap", "input": "0.1", "output": "0.2"}
        ],
    }
)


def policy(name: str = "money", key: str = KEY, **fields: Any) -> KeyPolicy:
    digest = hashlib.sha256(key.encode()).hexdigest()
    return KeyPolicy.model_validate({"name": name, "key": f"sha256:{digest}", **fields})


def post(client: FlaskClient, body: dict[str, Any], key: str = KEY) -> TestResponse:
    response = client.post(CHAT, data=json.dumps(body), headers={"Authorization": f"Bearer {key}"})
    response.close()  # as a server closes it: the answer is settled
    return response


# --- prices -------------------------------------------------------------------------


def test_a_deployments_price_wins_over_its_models() -> None:
    book = PriceBook(PRICING)
    assert book.price("qwen-plus", "default", "qwen-plus-cheap").input == Decimal("0.1")
    assert book.price("qwen-plus", "default", "qwen-plus").input == Decimal("0.8")
    with pytest.raises(KeyError):
        book.price("qwen-max", "default", "qwen-max")


def test_tiers_price_by_prompt_size() -> None:
    price = PRICING.models["qwen-plus"]
    assert cost_nanos(price, 1000, 0) == 1000 * 800  # 0.8 per million: 800 nano per token
    assert cost_nanos(price, 131_073, 0) == 131_073 * 2400
    assert cost_nanos(price, 300_000, 10) == 300_000 * 4800 + 10 * 48_000
    # A tier without cached_input prices cached tokens at its own input price.
    assert cost_nanos(price, 200_000, 0, cached=200_000) == 200_000 * 2400
    assert cost_nanos(price, 1000, 0, cached=500) == 500 * 800 + 500 * 160


def test_every_deployment_of_a_route_needs_a_price_to_be_served_to_a_budget() -> None:
    route = ModelRoute.model_validate(
        {"name": "qwen-*", "deployments": [{"provider": "default"}, {"provider": "other"}]}
    )
    pricing = Pricing.model_validate(
        {"deployments": [{"provider": "default", "model": "qwen-x", "input": 1, "output": 3}]}
    )
    with pytest.raises(KeyError):
        PriceBook(pricing, (route,)).max_cost("qwen-x", 10, 10)
    both = PRICING.model_copy(update={"models": {"qwen-x": PRICING.models["qwen-plus"]}})
    cheap_and_dear = PriceBook(both, (route,))
    assert cheap_and_dear.max_cost("qwen-x", 10, 10) == 10 * 800 + 10 * 2000  # the dearer


def test_a_million_answers_add_up_exactly() -> None:
    price = Pricing.model_validate({"models": {"m": {"input": "0.3", "output": "0.7"}}}).models["m"]
    total = sum(
        usage_cost(price, {"prompt_tokens": 7, "completion_tokens": 3}) for _ in range(10**6)
    )
    assert total == 10**6 * (7 * 300 + 3 * 700)
    assert money(total) == "4.2"  # 4.2 exactly; the same sum in floats drifts
    assert sum([(7 * 0.3 + 3 * 0.7) / 1e6] * 10**6) != 4.2
    assert money(1_234_500) == "0.0012345" and money(3 * NANOS) == "3"
    assert to_nanos(Decimal("0.000000001")) == 1


def test_usage_cost_reads_total_and_abandoned_attempts() -> None:
    price = PRICING.models["qwen-plus"]
    only_total = usage_cost(price, {"prompt_tokens": 10, "total_tokens": 30})
    assert only_total == 10 * 800 + 20 * 2000
    assert usage_cost(price, {"prompt_tokens": 10}, extra_prompt=5) == 15 * 800


def test_the_file_refuses_a_key_in_an_unknown_team_and_unordered_tiers() -> None:
    digest = "sha256:" + "0" * 64
    with pytest.raises(ValueError, match="team 'x' is not under teams"):
        GatewayFile.model_validate({"keys": [{"name": "k", "key": digest, "team": "x"}]})
    with pytest.raises(ValueError, match="ascending"):
        GatewayFile.model_validate(
            {
                "prices": {
                    "models": {
                        "m": {
                            "input": 1,
                            "output": 1,
                            "tiers": [
                                {"above": 9, "input": 1, "output": 1},
                                {"above": 2, "input": 1, "output": 1},
                            ],
                        }
                    }
                }
            }
        )


# --- reservation and settlement, per store -------------------------------------------


@pytest.fixture(params=["memory", "sqlite"])
def counters(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    if request.param == "memory":
        return MemoryCounters()
    return SqliteCounters(str(tmp_path / "money.sqlite3"))


def test_a_budget_is_held_whole_and_never_promised_past_itself(counters: Any) -> None:
    keys = ("ai-gateway:tokens:{k}:day:1", "ai-gateway:tokens:{k}:cost-day:1")
    limits = [0, -1000]  # no token limit; a budget of 1000
    first = counters.reserve(Hold("a", keys, (5, 600), 1e12), limits, 1.0)
    assert first == [0, 5, 600]
    assert counters.reserve(Hold("b", keys, (5, 401), 1e12), limits, 1.0)[0] == 2  # 1001
    assert counters.reserve(Hold("c", keys, (5, 400), 1e12), limits, 1.0) == [0, 10, 1000]
    # The first settles with its real cost: 600 held becomes 250 spent.
    counters.settle(Hold("a", keys, (5, 600), 1e12), [(keys[0], 3), (keys[1], 250)], 2.0)
    assert counters.read(list(keys), 2.0) == [8, 650]


def test_a_dead_reservation_releases_each_counter_by_its_own_amount(counters: Any) -> None:
    keys = ("ai-gateway:tokens:{k}:day:1", "ai-gateway:tokens:{k}:cost-total:all")
    counters.reserve(Hold("a", keys, (7, 9000), 100.0), [10, -10_000], 1.0)
    assert counters.read(list(keys), 99.0) == [7, 9000]
    assert counters.read(list(keys), 100.0) == [0, 0]


def test_a_team_budget_is_shared_and_a_key_must_fit_both(tmp_path: Path) -> None:
    budget = TokenBudget("memory://", str(tmp_path / "t.sqlite3"))
    team = Caller("team:search", "search", budget_per_month=1000)
    one = Caller("key_1", "one", budget_per_day=700, team=team)
    two = Caller("key_2", "two", team=team)
    held = budget.reserve(one, 1, money=600)
    assert held.full is None and held.money == 600
    refused = budget.reserve(two, 1, money=500)  # the team's month: 600 + 500 > 1000
    assert refused.full_slot is not None and refused.full_slot.team
    assert refused.full_slot.window.name == "month"
    budget.settle(held, 1, money=100)
    assert budget.reserve(two, 1, money=500).full is None
    assert budget.read_spend([one, two, team])[0] == [100, 100, 100]
    assert budget.read_spend([team])[0][1] == 600  # 100 spent + 500 in flight
    assert budget.reserve(one, 1, money=601).full_slot.window.name == "day"  # type: ignore[union-attr]


# --- what a request sees -------------------------------------------------------------


@pytest.fixture
def money_client(make_app: MakeApp) -> FlaskClient:
    teams = (Team(name="search", budget_per_day=Decimal("0.000050")),)
    keys = (
        policy(budget_per_day="0.00003", team="search"),
        policy("other", OTHER, team="search"),
    )
    app = make_app(key_policies=keys, teams=teams, pricing=PRICING, admin_api_key=ADMIN_KEY)
    return app.test_client()


def test_a_spent_budget_is_insufficient_quota_without_an_upstream_call(
    money_client: FlaskClient, upstream: responses.RequestsMock
) -> None:
    usage = {"prompt_tokens": 5, "completion_tokens": 6, "total_tokens": 11}
    upstream.post(UPSTREAM_CHAT, json={"id": "c", "usage": usage})
    body = {"model": "qwen-plus", "messages": [], "max_tokens": 6}

    answers = [post(money_client, body) for _ in range(4)]

    # Each costs 5 x 800 + 6 x 2000 = 16,000 nano-CNY and may cost (the body's estimate)
    # a little more: a budget of 30,000 takes one, then refuses the next.
    assert [a.status_code for a in answers][:2] == [200, 429]
    assert answers[0].headers["x-gateway-cost"] == "0.000016"
    assert answers[0].headers["x-gateway-cost-currency"] == "CNY"
    error = assert_openai_error(answers[1], 429, "insufficient_quota")
    assert "0.00003 CNY" in error["message"] and "resets at" in error["message"]
    assert answers[1].headers["x-should-retry"] == "false"
    assert len(upstream.calls) == 1 + sum(a.status_code == 200 for a in answers[2:])
    report = money_client.get("/v1/usage", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    row = next(k for k in report.json["keys"] if k["key"] == "money")
    assert row["cost"]["day"] == {
        "spent": "0.000016",
        "budget": "0.00003",
        "resets_at": row["cost"]["day"]["resets_at"],
    }
    assert report.json["teams"][0]["team"] == "search"
    assert report.json["teams"][0]["cost"]["day"]["spent"] == "0.000016"


def test_a_team_budget_refuses_the_other_key_too(
    money_client: FlaskClient, upstream: responses.RequestsMock
) -> None:
    usage = {"prompt_tokens": 5, "completion_tokens": 6, "total_tokens": 11}
    upstream.post(UPSTREAM_CHAT, json={"id": "c", "usage": usage})
    body = {"model": "qwen-plus", "messages": [], "max_tokens": 6}
    assert post(money_client, body, OTHER).status_code == 200
    assert post(money_client, body, OTHER).status_code == 200  # 32,000 of 50,000
    refused = post(money_client, body, OTHER)
    error = assert_openai_error(refused, 429, "insufficient_quota")
    assert "team 'search'" in error["message"]


def test_a_budgeted_key_asking_for_a_model_without_a_price_is_403(
    money_client: FlaskClient, upstream: responses.RequestsMock
) -> None:
    refused = post(money_client, {"model": "qwen-max", "messages": []})
    error = assert_openai_error(refused, 403, "model_not_priced")
    assert "qwen-max" in error["message"] and not upstream.calls


def test_a_request_without_max_tokens_reserves_the_default_cap(
    money_client: FlaskClient, upstream: responses.RequestsMock
) -> None:
    # 100 output tokens (default_max_tokens) at 2 per million: 200,000 nano > 30,000.
    refused = post(money_client, {"model": "qwen-plus", "messages": []})
    assert_openai_error(refused, 429, "insufficient_quota")
    assert not upstream.calls


def test_a_team_token_quota_holds_for_each_of_its_keys(
    make_app: MakeApp, upstream: responses.RequestsMock
) -> None:
    usage = {"prompt_tokens": 5, "completion_tokens": 6, "total_tokens": 11}
    upstream.post(UPSTREAM_CHAT, json={"id": "c", "usage": usage})
    keys = (policy(team="search"), policy("other", OTHER, team="search"))
    teams = (Team(name="search", tokens_per_day=10),)
    client = make_app(key_policies=keys, teams=teams).test_client()

    assert post(client, {"model": "m", "messages": []}).status_code == 200  # 11 of 10
    refused = post(client, {"model": "m", "messages": []}, OTHER)

    error = assert_openai_error(refused, 429, "insufficient_quota")
    assert "team 'search'" in error["message"] and "11 of 10" in error["message"]
    assert len(upstream.calls) == 1


def test_prices_and_budgets_past_what_the_counters_hold_exactly_are_refused() -> None:
    with pytest.raises(ValueError, match="less than or equal to 10000"):
        Pricing.model_validate({"models": {"m": {"input": 20_000, "output": 1}}})
    with pytest.raises(ValueError, match="less than or equal to 9000000"):
        Team(name="t", budget_total=Decimal(10**7))


@pytest.mark.parametrize(
    ("path", "body", "limit"),
    [
        (CHAT, {"model": "qwen-plus", "messages": []}, "max_tokens"),
        ("/v1/completions", {"model": "qwen-plus", "prompt": "x"}, "max_tokens"),
        ("/v1/responses", {"model": "qwen-plus", "input": "x"}, "max_tokens"),
    ],
)
def test_a_budgeted_request_with_no_output_limit_is_sent_the_one_it_reserved(
    make_app: MakeApp, upstream: responses.RequestsMock, path: str, body: dict[str, Any], limit: str
) -> None:
    # Without it the provider could generate past the budget: the hold assumed 100 tokens.
    answer = {
        "id": "c",
        "object": "chat.completion",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}
        ],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }
    upstream.post(UPSTREAM_CHAT, json=answer)
    upstream.post(f"{UNIT_UPSTREAM}/completions", json=answer)
    client = make_app(key_policies=(policy(budget_per_day="1"),), pricing=PRICING).test_client()
    sent = client.post(path, data=json.dumps(body), headers={"Authorization": f"Bearer {KEY}"})
    assert sent.status_code == 200, sent.data
    assert json.loads(upstream.calls[0].request.body)[limit] == 100
    unbudgeted = make_app(key_policies=(policy(),), pricing=PRICING).test_client()
    unbudgeted.post(path, data=json.dumps(body), headers={"Authorization": f"Bearer {KEY}"})
    assert limit not in json.loads(upstream.calls[1].request.body)


def test_a_budget_is_not_checked_in_memory_while_the_storage_is_down(
    make_app: MakeApp, upstream: responses.RequestsMock
) -> None:
    down = "redis://127.0.0.1:1"  # nothing listens there: every step fails at once
    app = make_app(
        key_policies=(policy(budget_per_day="1"),), pricing=PRICING, rate_limit_storage_uri=down
    )
    refused = post(app.test_client(), {"model": "qwen-plus", "messages": [], "max_tokens": 5})
    assert_openai_error(refused, 503, "budget_unavailable")
    assert refused.headers["Retry-After"] == "5"
    assert not upstream.calls
    # Token limits alone still fail open, as before.
    upstream.post(UPSTREAM_CHAT, json={"id": "c"})
    tokens_only = make_app(key_policies=(policy(tpm=1000),), rate_limit_storage_uri=down)
    assert post(tokens_only.test_client(), {"model": "m", "messages": []}).status_code == 200
