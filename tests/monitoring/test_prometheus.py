"""Every dashboard panel and every alert, evaluated by a real Prometheus scraping a real gateway.

One gateway under gunicorn gets a bounded mix of traffic — answers, streams, provider
errors, timeouts, broken streams, bad keys, unknown routes, a key over its rate limit —
while Prometheus scrapes it every second with the shipped configuration and rules. Its
GATEWAY_CONFIG (`gateway_config`) puts a provider that refuses connections before the fake
provider for the answers' model, so that the routing metrics have series too: attempts
that failed, fallbacks, a deployment cooling down. Then each expression, read from the
dashboard JSON and the rules YAML, must return series, with every label it groups by: a
panel or alert on a metric or label the gateway does not export fails here.

The configuration routes one model through a provider that refuses connections (so
fallbacks and cooldowns have series) and has a key with a small day quota that the load
spends (so the quota panel and alert have series): every expression must find its series.
"""

from __future__ import annotations

import re
import socket
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from tests.constants import GATEWAY_KEY, SECOND_GATEWAY_KEY
from tests.e2e.conftest import GatewayFactory
from tests.fake_upstream import FakeUpstream
from tests.monitoring.conftest import METRICS_KEY, Prometheus, start_prometheus, wait_until
from tests.monitoring.promql import (
    JOB,
    Expression,
    alert_expressions,
    dashboard,
    grouping_labels,
    keep_every_series,
    panel_expressions,
    substitute,
)

pytestmark = pytest.mark.e2e

# Metric (family) → the labels other branches are adding to it, or all its labels when the
# whole metric is new. Empty this once they have landed on main (the routing ones have).
# Sample name (gateway_requests_total, …_bucket) → its samples.
Exposition = dict[str, list[Sample]]

CHAT = {"model": "qwen-plus", "messages": [{"role": "user", "content": "Hello"}]}
STREAM = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
# The provider's scripted failures ask for another model: a route of their own, so that
# they cool down its deployment and never the one that serves CHAT (see gateway_config).
FAILING_CHAT = {**CHAT, "model": "qwen-max"}
FAILING_STREAM = {**STREAM, "model": "qwen-max"}
# A key of the file's `keys:` (issue #9), with a quota that its calls below spend.
QUOTA_KEY = "gw-test-key-quota-3b9e1d7a"
QUOTA_TOKENS_PER_DAY = 20  # the fake's answers report 11 tokens: the third call is over
# A key of a team with a budget its calls spend: free prompts, 6 output tokens at 1000 a
# million each (max_tokens 6 reserves exactly that), so two calls spend it, a third is over.
BUDGET_KEY = "gw-test-key-budget-5c2f8e91"
BUDGET = "0.012"


def gateway_config(upstream_url: str, refusing_port: int) -> str:
    """`down` refuses connections and comes first for qwen-plus (weights 1000 : 0.001), so
    each of those requests falls back to `fake` until `down` cools down, for longer than the
    test (cooldown 600 s); every other model goes to `fake` alone."""
    return f"""
providers:
  fake:
    base_url: {upstream_url}
    api_key_env: TARGET_API_KEY
  down:
    base_url: http://127.0.0.1:{refusing_port}/v1
    api_key_env: TARGET_API_KEY
models:
  qwen-plus:
    - {{provider: down, weight: 1000}}
    - {{provider: fake, weight: 0.001}}
  "*": fake
routing:
  cooldown: 600
keys:
  - {{name: quota, key_env: QUOTA_GATEWAY_KEY, tokens_per_day: {QUOTA_TOKENS_PER_DAY}}}
  - {{name: spender, key_env: BUDGET_GATEWAY_KEY, team: search, budget_per_day: {BUDGET}}}
teams:
  - {{name: search, budget_per_month: 1}}
prices:
  currency: CNY
  models:
    qwen-plus: {{input: 0, output: 1000}}
"""


@dataclass(frozen=True)
class Call:
    method: str
    path: str
    key: str | None = GATEWAY_KEY
    body: dict[str, Any] | None = None


# What the first key sends; the rate limit is set just above it, so none of it is refused.
FIRST_KEY_CALLS = [
    *[Call("POST", "/v1/chat/completions", body=CHAT)] * 20,
    *[Call("POST", "/v1/chat/completions", body={**STREAM, "fake": {"delay": 0.05, "usage": True}})]
    * 10,
    *[Call("POST", "/v1/embeddings", body={"model": "text-embedding-v3", "input": "Hi"})] * 5,
    *[Call("GET", "/v1/models")] * 3,
    *[Call("POST", "/v1/chat/completions", body={**FAILING_CHAT, "fake": {"status": 500}})] * 5,
    *[Call("POST", "/v1/chat/completions", body={**FAILING_CHAT, "fake": {"status": 429}})] * 3,
    # Broken by the provider mid-stream, and too slow for UPSTREAM_READ_TIMEOUT: upstream errors.
    *[Call("POST", "/v1/chat/completions", body={**FAILING_STREAM, "fake": {"die_after": 1}})] * 2,
    *[Call("POST", "/v1/chat/completions", body={**FAILING_CHAT, "fake": {"sleep_before": 2}})] * 2,
]
RATE_LIMIT = len(FIRST_KEY_CALLS) + 5
UNKNOWN_ROUTE = "/v1/no-such-route"
OTHER_CALLS = [
    *[Call("GET", "/v1/models", key=GATEWAY_KEY + "-wrong")] * 3,
    *[Call("GET", UNKNOWN_ROUTE, key=None)] * 2,
    # The second key goes 5 requests over its limit.
    *[Call("GET", "/v1/models", key=SECOND_GATEWAY_KEY)] * (RATE_LIMIT + 5),
]
# Sent one after the other, so that each answer's tokens are counted before the next call.
QUOTA_KEY_CALLS = [Call("POST", "/v1/chat/completions", key=QUOTA_KEY, body=CHAT)] * 3
BUDGET_KEY_CALLS = [
    Call("POST", "/v1/chat/completions", key=BUDGET_KEY, body={**CHAT, "max_tokens": 6})
] * 3


@dataclass
class Monitored:
    prometheus: Prometheus
    statuses: Counter[int | str]
    # The quota key's, apart: sent one after another, so their order is the quota's.
    quota_key_statuses: list[int | str]
    budget_key_statuses: list[int | str]
    # What the gateway's /metrics held after the load.
    exposition: Exposition


def send(base_url: str, call: Call) -> int | str:
    headers = {"Authorization": f"Bearer {call.key}"} if call.key else {}
    try:
        response = requests.request(
            call.method, base_url + call.path, json=call.body, headers=headers, timeout=10
        )
    except requests.RequestException as exc:
        return type(exc).__name__
    return response.status_code


def exported_series(base_url: str) -> Exposition:
    scrape = {"Authorization": f"Bearer {METRICS_KEY}"}
    text = requests.get(base_url + "/metrics", headers=scrape, timeout=10).text
    series: Exposition = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            series.setdefault(sample.name, []).append(sample)
    return series


def api_requests_seen(prometheus: Prometheus) -> float:
    result = prometheus.query(f'sum(gateway_requests_total{{job="{JOB}", route=~"/v1/.*"}})')
    return float(result[0]["value"][1]) if result else -1


def every_series_sampled_twice(prometheus: Prometheus) -> bool:
    # rate() needs two samples in its window: a series born in the last scrape has one.
    matrix = prometheus.query(f'{{job="{JOB}", __name__=~"gateway_.+"}}[1m]')
    return bool(matrix) and min(len(series["values"]) for series in matrix) >= 2


@pytest.fixture(scope="module")
def down_port() -> Iterator[int]:
    """A loopback port bound and never listened on: a connection to it is refused at once,
    and no other process can take the port while the module's tests run."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        yield held.getsockname()[1]


@pytest.fixture(scope="module")
def monitored(tmp_path_factory: pytest.TempPathFactory, down_port: int) -> Iterator[Monitored]:
    upstream = FakeUpstream(record=False).start()
    gateways = GatewayFactory(tmp_path_factory.mktemp("gateway"), upstream.url)
    started: list[Prometheus] = []
    try:
        gateway = gateways(
            config=gateway_config(upstream.url, down_port),
            RATE_LIMIT_REQUESTS_PER_MINUTE=str(RATE_LIMIT),
            UPSTREAM_READ_TIMEOUT="1",
            QUOTA_GATEWAY_KEY=QUOTA_KEY,
            BUDGET_GATEWAY_KEY=BUDGET_KEY,
            METRICS_KEY=METRICS_KEY,
        )
        target = gateway.url.removeprefix("http://")
        prometheus = start_prometheus(tmp_path_factory.mktemp("prometheus"), target)
        started.append(prometheus)
        # Bounded: a fixed list of calls, each with a 10 s timeout.
        with ThreadPoolExecutor(max_workers=8) as pool:
            statuses = Counter(pool.map(lambda c: send(gateway.url, c), FIRST_KEY_CALLS))
            statuses += Counter(pool.map(lambda c: send(gateway.url, c), OTHER_CALLS))
        quota_key_statuses = [send(gateway.url, call) for call in QUOTA_KEY_CALLS]
        budget_key_statuses = [send(gateway.url, call) for call in BUDGET_KEY_CALLS]
        # Each call to a /v1 route is counted once its answer is complete.
        calls = FIRST_KEY_CALLS + OTHER_CALLS + QUOTA_KEY_CALLS + BUDGET_KEY_CALLS
        sent = sum(1 for call in calls if call.path != UNKNOWN_ROUTE)
        wait_until(
            lambda: api_requests_seen(prometheus) >= sent,
            30,
            f"Prometheus to scrape all {sent} /v1 requests",
            prometheus.logs,
        )
        wait_until(
            lambda: every_series_sampled_twice(prometheus),
            30,
            "two samples of every series",
            prometheus.logs,
        )
        yield Monitored(
            prometheus,
            statuses,
            quota_key_statuses,
            budget_key_statuses,
            exported_series(gateway.url),
        )
    finally:
        for prometheus in started:
            prometheus.stop()
        gateways.stop_all()
        upstream.stop()


def test_the_load_produced_every_kind_of_answer(monitored: Monitored) -> None:
    statuses = monitored.statuses
    assert statuses[200] >= 20 and statuses[401] == 3 and statuses[404] == 2, statuses
    # At least the second key's 5 over its limit; the provider's own 429s may be mapped.
    assert statuses[429] >= 5, statuses
    # The provider's 500s and the two timeouts, whatever status a router maps them to.
    assert sum(n for status, n in statuses.items() if str(status).startswith("5")) >= 7
    # No client saw the refused connections: each of those attempts fell back to the fake.
    assert statuses[502] == 0, statuses
    # Two answers of 11 tokens, then the day's 20 are spent.
    assert monitored.quota_key_statuses == [200, 200, 429], monitored.quota_key_statuses
    assert monitored.budget_key_statuses == [200, 200, 429], monitored.budget_key_statuses


def test_the_refusing_provider_was_fallen_back_from_and_cools_down(monitored: Monitored) -> None:
    fallbacks = {
        (s.labels["provider"], s.labels["model"], s.labels["reason"])
        for s in monitored.exposition["gateway_fallbacks_total"]
        if s.value > 0
    }
    cooling = {
        (s.labels["provider"], s.labels["upstream_model"])
        for s in monitored.exposition["gateway_deployment_cooldown"]
        if s.value == 1
    }
    assert fallbacks == {("down", "qwen-plus", "connect")}
    assert ("down", "qwen-plus") in cooling, cooling
    assert ("fake", "qwen-plus") not in cooling, cooling


def test_prometheus_loaded_and_evaluates_every_alert_rule(monitored: Monitored) -> None:
    prometheus = monitored.prometheus

    def rules() -> list[dict[str, Any]]:
        groups = prometheus.api("rules")["groups"]
        return [rule for group in groups for rule in group["rules"]]

    wait_until(
        lambda: all(rule["health"] != "unknown" for rule in rules()),
        20,
        "every rule to be evaluated once",
        prometheus.logs,
    )
    evaluated = {rule["name"]: (rule["health"], rule.get("lastError", "")) for rule in rules()}
    assert set(evaluated) == {e.source.removeprefix("alert ") for e in alert_expressions()}
    assert {name: state for name, state in evaluated.items() if state != ("ok", "")} == {}


def test_dashboard_variables_offer_the_gateway_job(monitored: Monitored) -> None:
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] != "query":
            continue
        match = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", variable["query"])
        assert match, f"{variable['name']}: an unexpected query {variable['query']!r}"
        metric, label = match.groups()
        values = monitored.prometheus.api(f"label/{label}/values", **{"match[]": metric})
        assert JOB in values, variable["name"]


@pytest.mark.parametrize("expression", panel_expressions(), ids=lambda e: e.source)
def test_panel_shows_series(monitored: Monitored, expression: Expression) -> None:
    assert_series(monitored, expression, substitute(expression.promql))


@pytest.mark.parametrize("expression", alert_expressions(), ids=lambda e: e.source)
def test_alert_has_series_to_judge(monitored: Monitored, expression: Expression) -> None:
    monitored.prometheus.query(expression.promql)  # as written: valid, empty or not
    assert_series(monitored, expression, keep_every_series(expression.promql))


def assert_series(monitored: Monitored, expression: Expression, promql: str) -> None:
    result = monitored.prometheus.query(promql)
    unlabelled = sorted(
        label
        for label in grouping_labels(promql)
        if not any(series["metric"].get(label) for series in result)
    )
    if result and not unlabelled:
        return
    problem = f"no series from {promql!r}" if not result else f"no series has {unlabelled}"
    exported = sorted(name for name in monitored.exposition if name.startswith("gateway_"))
    pytest.fail(f"{expression.source}: {problem} (the gateway exports {exported})")
