"""The Grafana dashboard and the Prometheus rules in deploy/ parse and use only metrics Stormwatch exports."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml  # type: ignore[import-untyped]

from detector.web.metrics import EXPORTED

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
DASHBOARD = DEPLOY / "grafana" / "stormwatch-dashboard.json"
RULES = DEPLOY / "prometheus" / "stormwatch-rules.yml"

METRIC = re.compile(r"\bstormwatch_[a-zA-Z0-9_]+")
DURATION = re.compile(r"^\d+[smhdw]$")
# PromQL functions and keywords the expressions may use besides metric names.
PROMQL_WORDS = {
    "sum", "max", "min", "avg", "count", "topk", "by", "without", "and", "or", "unless", "on", "ignoring",
    "rate", "increase", "delta", "deriv", "time", "absent", "clamp_min", "histogram_quantile", "le",
    "label_values",  # Grafana's, in template variables
}  # fmt: skip
FAMILY_SUFFIXES = ("_bucket", "_sum", "_count")


def dashboard_exprs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if isinstance(value, str) and (key in ("expr", "definition") or (key == "query" and "(" in value)):
                yield value
            else:
                yield from dashboard_exprs(value)
    elif isinstance(node, list):
        for item in node:
            yield from dashboard_exprs(item)


def rule_list() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def check_expr(expr: str) -> set[str]:
    """The metric names in ``expr``, after checking brackets balance and no unknown function is called."""
    stack: list[str] = []
    pairs = {")": "(", "]": "[", "}": "{"}
    text = re.sub(r'"[^"]*"', '""', expr)  # label values may hold anything
    for ch in text:
        if ch in "([{":
            stack.append(ch)
        elif ch in ")]}":
            assert stack and stack.pop() == pairs[ch], f"unbalanced brackets in {expr!r}"
    assert not stack, f"unbalanced brackets in {expr!r}"
    for word in re.findall(r"\b([a-z_]+)\s*\(", text):
        assert word in PROMQL_WORDS or word.startswith("stormwatch_"), f"unexpected function {word!r} in {expr!r}"
    return set(METRIC.findall(expr))


def family(name: str) -> str:
    for suffix in FAMILY_SUFFIXES:
        if name.endswith(suffix) and name[: -len(suffix)] + "_bucket" in EXPORTED:
            return name[: -len(suffix)]
    return name


def test_dashboard_parses_and_uses_only_exported_metrics() -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] == "stormwatch" and dash["title"]
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    assert len(panels) >= 12
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])
    for p in panels:
        assert p["targets"], f"panel {p['title']!r} has no query"
        assert p["datasource"]["uid"] == "${datasource}"
        grid = p["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24
    used: set[str] = set()
    for expr in dashboard_exprs(dash):
        used |= check_expr(expr)
    unknown = used - EXPORTED
    assert not unknown, f"the dashboard uses metrics Stormwatch does not export: {sorted(unknown)}"
    variables = {v["name"] for v in dash["templating"]["list"]}
    for expr in dashboard_exprs(dash["panels"]):
        for var in re.findall(r"\$([a-z_]+)", expr):
            assert var in variables, f"undefined variable ${var}"


def test_rules_parse_and_use_only_exported_metrics() -> None:
    rules = rule_list()
    assert len(rules) >= 6
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names))
    used: set[str] = set()
    for rule in rules:
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule["alert"]
        assert rule["alert"].startswith("Stormwatch")
        assert DURATION.match(rule["for"]), f"{rule['alert']}: for {rule['for']!r}"
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
        used |= check_expr(rule["expr"])
    unknown = used - EXPORTED
    assert not unknown, f"the rules use metrics Stormwatch does not export: {sorted(unknown)}"


def test_the_rules_cover_what_the_issue_asks_for() -> None:
    exprs = {r["alert"]: r["expr"] for r in rule_list()}
    assert "stormwatch_events_rejected_total" in exprs["StormwatchHighRejectionRate"]
    assert "stormwatch_consumer_lag" in exprs["StormwatchConsumerLagGrowing"]
    assert "stormwatch_events_processed_total" in exprs["StormwatchNoEvents"]
    assert "stormwatch_breaker_oldest_open_timestamp_seconds" in exprs["StormwatchBreakerOpenTooLong"]
    assert 'severity="critical"' in exprs["StormwatchCriticalIncident"]


def test_every_exported_metric_is_on_the_dashboard_or_in_a_rule() -> None:
    used: set[str] = set()
    for expr in [*dashboard_exprs(json.loads(DASHBOARD.read_text())), *(r["expr"] for r in rule_list())]:
        used |= {family(m) for m in check_expr(expr)}
    missing = {family(m) for m in EXPORTED} - used
    assert not missing, f"exported but shown nowhere: {sorted(missing)}"
