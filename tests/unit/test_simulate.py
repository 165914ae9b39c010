"""The fleet simulator: deterministic, valid events, every scenario placed and doing what it says."""

from __future__ import annotations

import gzip
import itertools
import tomllib
from collections import Counter
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from detector.events import IncidentLabel, UsageEvent
from detector.pricing import PriceCatalog
from detector.simulate import Simulation, SimulationSpec, simulate, write_simulation
from detector.simulate.scenarios import BENIGN, INCIDENTS, RECURRING

DAY_SPEC = SimulationSpec(seed=11, days=1.0, warmup_hours=4.0, scale=0.2)
SMALL_SPEC = SimulationSpec(seed=3, days=0.25, warmup_hours=2.0, scale=0.2)


@pytest.fixture(scope="module")
def day() -> Simulation:
    return simulate(DAY_SPEC)


def _ts(event: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(event["timestamp"])


def _in_label(event: dict[str, Any], label: IncidentLabel) -> bool:
    field = {"api_key": "api_key_id", "session": "session_id", "team": "team", "agent": "agent_id"}
    value = event.get(field.get(label.entity.type, ""))
    return value == label.entity.id and label.start <= _ts(event) <= label.end


def test_same_seed_same_output_and_other_seed_differs() -> None:
    a, b = simulate(SMALL_SPEC), simulate(SMALL_SPEC)
    assert a.events == b.events
    assert a.labels == b.labels
    assert a.budgets == b.budgets
    c = simulate(SimulationSpec(seed=4, days=0.25, warmup_hours=2.0, scale=0.2))
    assert c.events[:100] != a.events[:100]


def test_events_validate(day: Simulation) -> None:
    rng = np.random.default_rng(0)
    sample = [day.events[i] for i in rng.choice(len(day.events), 3000, replace=False)]
    incident = [e for e in day.events for label in day.labels if label.kind != "benign" and _in_label(e, label)]
    assert len(incident) > 500
    for event in sample + incident:
        UsageEvent.model_validate(event)
    assert all(v is not None for e in sample for v in e.values())  # absent fields are left out


def test_sorted_and_labels_inside_incident_days(day: Simulation) -> None:
    stamps = [e["timestamp"] for e in day.events]
    assert stamps == sorted(stamps)
    assert all(s.endswith("Z") for s in stamps[:1000])
    begin = DAY_SPEC.start + timedelta(hours=DAY_SPEC.warmup_hours)
    end = begin + timedelta(days=DAY_SPEC.days)
    for label in day.labels:
        assert begin <= label.start <= label.end <= end, label


def test_every_scenario_appears_in_a_day(day: Simulation) -> None:
    seen = Counter((str(label.kind), label.scenario) for label in day.labels)
    expected = {(kind, name) for kind, group in INCIDENTS.items() for name in group}
    expected |= {("benign", name) for name in [*BENIGN, *RECURRING]}
    assert expected <= set(seen), expected - set(seen)
    kinds = Counter(str(label.kind) for label in day.labels)
    assert {k: kinds[k] for k in DAY_SPEC.incidents_per_day} == dict(DAY_SPEC.incidents_per_day)


def test_full_storm_multiplies_the_attempt_rate(day: Simulation) -> None:
    storms = [label for label in day.labels if label.scenario == "full_storm"]
    assert storms
    for label in storms:
        key = label.entity.id
        seconds = (label.end - label.start).total_seconds()
        before = label.start - timedelta(hours=1)
        during = sum(1 for e in day.events if e["api_key_id"] == key and label.start <= _ts(e) <= label.end)
        normal = sum(1 for e in day.events if e["api_key_id"] == key and before <= _ts(e) < label.start)
        assert during / seconds >= 3 * max(normal, 1) / 3600.0
        retries = [
            e.get("retry_attempt", 0)
            for e in day.events
            if e["api_key_id"] == key and label.start <= _ts(e) <= label.end
        ]
        assert max(retries) >= 19


def test_budget_burn_outpaces_the_budget(day: Simulation) -> None:
    catalog = PriceCatalog.default()
    for label in (lb for lb in day.labels if lb.kind == "budget_burn"):
        spend = sum(
            e.get("cost_usd", catalog.cost(e["model"], e["input_tokens"], e["output_tokens"]))
            for e in day.events
            if e["team"] == label.team and label.start <= _ts(e) <= label.end
        )
        hours = (label.end - label.start).total_seconds() / 3600
        allowed_per_hour = day.budgets[label.team] / (30 * 24)
        assert spend / hours >= 12 * allowed_per_hour


def test_costs_match_the_catalog_and_some_are_left_out(day: Simulation) -> None:
    catalog = PriceCatalog.default()
    ok = [e for e in day.events[:20_000] if e["status"] == "ok" and e["operation"] != "tool"]
    priced = [e for e in ok if "cost_usd" in e]
    assert 0.8 < len(priced) / len(ok) < 0.95
    for e in priced[:2000]:
        expected = catalog.cost(e["model"], e["input_tokens"], e["output_tokens"], e.get("cached_input_tokens", 0))
        assert e["cost_usd"] == round(expected, 6)
    failed = [e for e in day.events if e["status"] != "ok"]
    assert failed and all(e["cost_usd"] == 0 and e["output_tokens"] == 0 for e in failed)


def test_background_is_realistic(day: Simulation) -> None:
    incident_sessions = {lb.entity.id for lb in day.labels if lb.entity.type == "session"}
    steps = Counter(
        e["session_id"]
        for e in day.events
        if "session_id" in e and e["operation"] == "chat" and e["session_id"] not in incident_sessions
    )
    assert len(steps) > 50
    assert np.percentile(list(steps.values()), 95) < 40
    first_tries = [e for e in day.events[:50_000] if not e.get("retry_attempt")]
    error_share = sum(e["status"] != "ok" for e in first_tries) / len(first_tries)
    assert 0.003 < error_share < 0.03
    assert any(e.get("retry_attempt") == 3 for e in day.events)


def test_write_simulation(tmp_path: Path) -> None:
    spec = SimulationSpec(seed=5, days=0.1, warmup_hours=1.0, scale=0.1)
    paths = write_simulation(spec, tmp_path / "a")
    assert {"events", "labels", "config"} <= set(paths)
    with paths["config"].open("rb") as fh:
        config = tomllib.load(fh)
    assert set(config["teams"]) >= {"search", "support", "data-platform"}
    for team in config["teams"].values():
        assert team["monthly_budget_usd"] > 0
        assert team["spent_to_date_usd"] >= 0
    with gzip.open(paths["events"], "rb") as fh:
        events = [orjson.loads(line) for line in fh]
    assert events and all(e["timestamp"] <= f["timestamp"] for e, f in itertools.pairwise(events))
    labels = [IncidentLabel.model_validate_json(line) for line in paths["labels"].read_bytes().splitlines()]
    assert labels
    again = write_simulation(spec, tmp_path / "b")
    for name, path in paths.items():
        assert path.read_bytes() == again[name].read_bytes(), name
