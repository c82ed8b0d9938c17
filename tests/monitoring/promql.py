"""The PromQL shipped in monitoring/, read from the files themselves and made evaluable.

Tests take every expression from the dashboard JSON and the rules YAML, so a panel or an
alert added tomorrow is checked without anyone listing it here.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
MONITORING = REPO / "monitoring"
DASHBOARD = MONITORING / "grafana" / "ai-gateway.json"
RULES = MONITORING / "prometheus" / "alerts.yml"
RULE_TESTS = MONITORING / "prometheus" / "alerts.test.yml"
SCRAPE_CONFIG = MONITORING / "prometheus" / "prometheus.yml"
# The scrape job every rule selects.
JOB = "ai-gateway"
# What Grafana would put in place of its own variables and the dashboard's.
VARIABLES = {"__rate_interval": "1m", "__interval": "1m", "__range": "5m", "job": JOB}

_VARIABLE = re.compile(r"\$\{(\w+)\}|\$(\w+)")
_METRIC = re.compile(r"\b(gateway_[a-z0-9_]+|up)\b")
_GROUPING = re.compile(r"\bby\s*\(([^)]*)\)")
_MATCHER_LABEL = re.compile(r"(\w+)\s*(?:=~|!~|!=|=)")
_SELECTOR = re.compile(r"\{([^}]*)\}")
# Outside these, a comparison operator is a comparison (inside, `!=` is a label matcher).
_QUOTED_OR_BRACKETED = re.compile(r'("(?:\\.|[^"\\])*"|\{[^}]*\}|\[[^\]]*\])')
_COMPARISON = re.compile(r"(==|!=|>=|<=|>(?!=)|<(?!=))(?!\s*bool\b)")
_ABSENT = re.compile(r"\babsent(?:_over_time)?\s*\(")


@dataclass(frozen=True)
class Expression:
    source: str  # where it is written, e.g. "panel 'Error ratio' B" or "alert AIGatewayDown"
    promql: str  # as written in the file


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, also those folded into a collapsed row."""
    found: list[dict[str, Any]] = []
    for panel in board["panels"]:
        found.append(panel)
        found.extend(panel.get("panels", []))
    return found


def panel_expressions() -> list[Expression]:
    return [
        Expression(f"panel {panel['title']!r} {target['refId']}", target["expr"])
        for panel in panels(dashboard())
        for target in panel.get("targets", [])
    ]


def rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(RULES.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def alert_expressions() -> list[Expression]:
    return [Expression(f"alert {rule['alert']}", rule["expr"].strip()) for rule in rules()]


def substitute(promql: str) -> str:
    """Grafana's variables replaced by literals; an unknown one is an error, not a guess."""

    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name not in VARIABLES:
            raise KeyError(f"no test value for the Grafana variable ${name} in {promql!r}")
        return VARIABLES[name]

    return _VARIABLE.sub(value, promql)


def keep_every_series(promql: str) -> str:
    """An alert's expression rewritten so that its threshold keeps series instead of dropping them.

    Under a healthy load an alert's `expr` is rightly empty: its comparison filters out every
    series on the good side of the threshold, so "empty" would prove nothing. With the
    comparison in its `bool` form (`x > 0.05` becomes `x > bool 0.05`) every series stays,
    valued 0 or 1, and `absent(x)`, which is empty exactly when `x` exists, is evaluated as
    `x`. The result is then non-empty exactly when the metrics, labels and joins the rule
    depends on exist, whether or not it would fire.
    """
    parts = _QUOTED_OR_BRACKETED.split(promql)
    # split() with one group: the even items lie outside strings, selectors and ranges.
    for index in range(0, len(parts), 2):
        parts[index] = _COMPARISON.sub(r"\1 bool", parts[index])
    return _unwrap_absent("".join(parts))


def _unwrap_absent(promql: str) -> str:
    match = _ABSENT.search(promql)
    if match is None:
        return promql
    depth, end = 1, match.end()
    while depth:
        depth += {"(": 1, ")": -1}.get(promql[end], 0)
        end += 1
    inner = promql[match.end() : end - 1]
    return _unwrap_absent(promql[: match.start()] + inner + promql[end:])


def metric_names(promql: str) -> set[str]:
    """The series names an expression reads (the gateway's, and Prometheus's `up`)."""
    return set(_METRIC.findall(_QUOTED_OR_BRACKETED.sub(" ", promql)))


def grouping_labels(promql: str) -> set[str]:
    """Labels named in `by (...)`: each should be on the result, or the panel lumps all in one."""
    labels = {label.strip() for group in _GROUPING.findall(promql) for label in group.split(",")}
    return labels - {"", "le"}  # histogram_quantile consumes le


def label_names(promql: str) -> set[str]:
    """Every label an expression names: in selectors and in `by (...)`."""
    in_selectors = {
        label
        for selector in _SELECTOR.findall(promql)
        for label in _MATCHER_LABEL.findall(selector)
    }
    return in_selectors | grouping_labels(promql)


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is not installed: run the suite with `make test`")
    return path
