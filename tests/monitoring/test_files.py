"""monitoring/ on its own: the rules pass promtool and their unit tests, the dashboard is
importable and shows what issue #9 asks for, and every expression is valid PromQL."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.monitoring.promql import (
    JOB,
    RULE_TESTS,
    RULES,
    SCRAPE_CONFIG,
    alert_expressions,
    dashboard,
    grouping_labels,
    keep_every_series,
    label_names,
    metric_names,
    panel_expressions,
    panels,
    promtool,
    rules,
    substitute,
)

DATASOURCE = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
# (metric, label): some panel must group that metric by that label.
PANELS_REQUIRED = [
    ("gateway_requests_total", "route"),
    ("gateway_requests_total", "status"),
    ("gateway_tokens_total", "key"),
    ("gateway_tokens_total", "model"),
    ("gateway_key_requests_total", "key"),
    ("gateway_upstream_attempts_total", "provider"),
    ("gateway_fallbacks_total", "provider"),
    ("gateway_deployment_cooldown", "provider"),
    ("gateway_key_rejections_total", "key"),
    ("gateway_key_quota_used_tokens", "key"),
    ("gateway_rate_limit_storage_up", "instance"),
    ("gateway_streams_in_flight", "instance"),
    # Money (issue #17): spend by team, key and model; each budget's share spent.
    ("gateway_cost_total", "team"),
    ("gateway_cost_total", "key"),
    ("gateway_cost_total", "model"),
    ("gateway_budget_spent", "owner"),
    # Load the worker sheds (issue #18): refused, timed out or dropped before the app.
    ("gateway_shed_requests_total", "reason"),
]
QUANTILES_REQUIRED = {
    "gateway_request_duration_seconds_bucket": {"0.5", "0.95", "0.99"},
    "gateway_stream_ttfb_seconds_bucket": {"0.5", "0.95"},
}
ALERTS_REQUIRED = {
    "AIGatewayDown",
    "AIGatewayNotScraped",
    "AIGatewayHigh5xxRatio",
    "AIGatewayUpstreamErrors",
    "AIGatewayLatencyP95High",
    "AIGatewayStreamTTFBHigh",
    "AIGatewayRateLimitStorageDown",
    "AIGatewayDeploymentCoolingDown",
    "AIGatewayKeyQuotaNearlyExhausted",
    "AIGatewayBudgetNearlySpent",
    "AIGatewayBudgetSpent",
    "AIGatewayShedding",
}


def run_promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool(), *args], capture_output=True, text=True, timeout=60, check=False
    )


def test_rules_pass_promtool_check() -> None:
    result = run_promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules())} rules found" in result.stdout


def test_alerts_pass_their_promtool_unit_tests() -> None:
    result = run_promtool("test", "rules", str(RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_unit_test_that_fires_it() -> None:
    document = yaml.safe_load(RULE_TESTS.read_text())
    fired = {
        check["alertname"]
        for test in document["tests"]
        for check in test.get("alert_rule_test", [])
        if check.get("exp_alerts")
    }
    assert {rule["alert"] for rule in rules()} <= fired


def test_the_alerts_issue_9_asks_for_exist_and_say_what_happened() -> None:
    assert {rule["alert"] for rule in rules()} >= ALERTS_REQUIRED
    for rule in rules():
        assert rule["labels"]["severity"] in {"critical", "warning"}, rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
        assert "for" in rule, f"{rule['alert']} would fire on a single evaluation"


def test_rules_select_the_job_the_example_scrape_config_defines() -> None:
    config = yaml.safe_load(SCRAPE_CONFIG.read_text())
    assert [job["job_name"] for job in config["scrape_configs"]] == [JOB]
    assert config["rule_files"] == [RULES.name]
    for expression in alert_expressions():
        selectors = re.findall(r"\b(?:gateway_[a-z0-9_]+|up)\b\s*(\{[^}]*\})?", expression.promql)
        assert selectors and all(f'job="{JOB}"' in s for s in selectors), expression.source


def test_the_example_scrape_config_passes_promtool(tmp_path: Path) -> None:
    # As deployed: the rules and the metrics key's file (a mounted Secret) beside it.
    for shipped in (SCRAPE_CONFIG, RULES):
        (tmp_path / shipped.name).write_text(shipped.read_text())
    (tmp_path / "metrics-key").write_text("stand-in-metrics-key\n")
    result = run_promtool("check", "config", str(tmp_path / SCRAPE_CONFIG.name))
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_example_scrape_job_sends_the_metrics_key_from_a_file() -> None:
    (job,) = yaml.safe_load(SCRAPE_CONFIG.read_text())["scrape_configs"]
    # From a file, never written in the config: the key is a secret.
    assert job["authorization"] == {"type": "Bearer", "credentials_file": "metrics-key"}


def test_every_expression_parses(tmp_path: Path) -> None:
    """promtool parses a rule file's expressions: each panel's and each rewritten alert's,
    with Grafana's variables filled in as the e2e test fills them, becomes a recording rule."""
    expressions = [substitute(e.promql) for e in panel_expressions()]
    expressions += [keep_every_series(e.promql) for e in alert_expressions()]
    recording = [{"record": f"check:expression_{i}", "expr": e} for i, e in enumerate(expressions)]
    path = tmp_path / "expressions.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "check", "rules": recording}]}))
    result = run_promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_uses_one_datasource_variable() -> None:
    board = dashboard()
    variables = {v["name"]: v for v in board["templating"]["list"]}
    source = variables["DS_PROMETHEUS"]
    assert (source["type"], source["query"]) == ("datasource", "prometheus")
    assert variables["job"]["datasource"] == DATASOURCE
    for panel in panels(board):
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE, panel["title"]
            assert target["expr"].strip(), panel["title"]


def test_dashboard_panels_have_unique_ids_and_refids_and_do_not_overlap() -> None:
    board = dashboard()
    assert board["uid"] and board["title"] and "id" not in board
    all_panels = panels(board)
    ids = [panel["id"] for panel in all_panels]
    assert len(ids) == len(set(ids))
    taken: set[tuple[int, int]] = set()
    for panel in all_panels:
        refs = [target["refId"] for target in panel.get("targets", [])]
        assert len(refs) == len(set(refs)), panel["title"]
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        cells = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not cells & taken, f"{panel['title']!r} overlaps another panel"
        taken |= cells


def test_dashboard_shows_what_issue_9_asks_for() -> None:
    expressions = [substitute(e.promql) for e in panel_expressions()]
    grouped = {
        (metric, label)
        for e in expressions
        for metric in metric_names(e)
        for label in grouping_labels(e)
    }
    assert [need for need in PANELS_REQUIRED if need not in grouped] == []
    for metric, wanted in QUANTILES_REQUIRED.items():
        quantiles = {q for e in expressions if metric in e for q in _quantiles(e)}
        assert quantiles >= wanted, metric
    assert any("gateway_fallbacks_total" in e for e in expressions)
    ratio = [e for e in expressions if 'status=~"5.."' in e]
    assert ratio and all("/" in e for e in ratio), "the 5xx panel should be a ratio"


def _quantiles(expression: str) -> set[str]:
    return set(re.findall(r"histogram_quantile\(\s*([0-9.]+)", expression))


@pytest.mark.parametrize(
    ("written", "evaluated"),
    [
        ('a{status!="5.."} > 0.05', 'a{status!="5.."} > bool 0.05'),
        ("a == 0", "a == bool 0"),
        ("a >= bool 1", "a >= bool 1"),
        ("a / (b > 0) > 0.9", "a / (b > bool 0) > bool 0.9"),
        ('absent(up{job="x"})', 'up{job="x"}'),
        ("absent_over_time(sum(rate(a[5m]))[10m:])", "sum(rate(a[5m]))[10m:]"),
        ('rate(a{route=~"/v1/.*"}[5m]) < 1', 'rate(a{route=~"/v1/.*"}[5m]) < bool 1'),
    ],
)
def test_alert_rewrite_keeps_series_and_leaves_matchers_alone(written: str, evaluated: str) -> None:
    assert keep_every_series(written) == evaluated


def test_substitute_fills_grafana_variables_and_refuses_unknown_ones() -> None:
    assert substitute('rate(a{job=~"$job"}[$__rate_interval])') == f'rate(a{{job=~"{JOB}"}}[1m])'
    assert substitute("increase(a[${__range}])") == "increase(a[5m])"
    with pytest.raises(KeyError, match="instance"):
        substitute('a{instance=~"$instance"}')


def test_label_and_metric_names_are_read_from_the_expression() -> None:
    promql = 'max by (key, window) (gateway_x{job="j", reason!="rpm"}[5m]) / up'
    assert metric_names(promql) == {"gateway_x", "up"}
    assert label_names(promql) == {"key", "window", "job", "reason"}
