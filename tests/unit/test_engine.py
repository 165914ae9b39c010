"""The engine end to end on hand-built traffic: alerts, determinism, snapshots, bounded memory."""

from __future__ import annotations

import os

import pytest

from detector.engine import Engine
from detector.events import UsageEvent
from detector.settings import Settings, load_settings
from tests.conftest import T0, make_event, normal_hour, retry_storm


def stream() -> list[UsageEvent]:
    """An hour of a healthy key, then a 5-minute retry storm, then an hour of calm."""
    return normal_hour(T0) + retry_storm(T0 + 3600) + normal_hour(T0 + 3900)


def run(engine: Engine, events: list[UsageEvent]) -> list[str]:
    out = []
    for ev in events:
        out += [f"{a.kind.value}:{a.status.value}:{a.alert_id}" for a in engine.process(ev)]
    return out


def test_storm_fires_once_and_resolves() -> None:
    alerts = run(Engine.default(), stream())
    kinds = [a.split(":")[:2] for a in alerts]
    assert kinds[0] == ["retry_storm", "firing"]
    assert kinds.count(["retry_storm", "firing"]) == 1
    assert ["retry_storm", "resolved"] in kinds


def test_same_events_same_alerts() -> None:
    assert run(Engine.default(), stream()) == run(Engine.default(), stream())


def test_snapshot_restore_mid_stream_gives_the_same_alerts() -> None:
    events = stream()
    whole = run(Engine.default(), events)
    engine = Engine.default()
    cut = 1800 + 1500  # in the middle of the storm, after it fired
    first = run(engine, events[:cut])
    restored = Engine.restore(engine.snapshot())
    assert first + run(restored, events[cut:]) == whole
    adopted = Engine.default().adopt(Engine.restore(engine.snapshot()))  # as the worker restores
    assert first + run(adopted, events[cut:]) == whole


def test_a_restored_engine_judges_by_the_settings_of_now_with_what_it_learned_before() -> None:
    events, cut = stream(), 3300  # the storm has fired; a tiny budget has been burning since the start
    before = Settings.model_validate({"teams": {"search": {"monthly_budget_usd": 5}}})
    engine = Engine.from_settings(before)
    first = run(engine, events[:cut])
    assert [a.split(":")[:2] for a in first].count(["budget_burn", "firing"]) == 1
    snap = engine.snapshot()
    assert not any(a.startswith("budget_burn:resolved") for a in run(Engine.restore(snap), events[cut:]))

    now = Settings.model_validate(
        {
            "teams": {"search": {"monthly_budget_usd": 50_000}},  # FinOps raised the budget
            "detectors": {"retry_storm": {"rate_ratio": 6.0}, "cost_spike": {"entity_types": ["api_key", "user"]}},
        }
    )
    restored = Engine.from_settings(now)
    assert restored.differences(Engine.restore(snap)) == [
        "budget_burn.budgets[search]: 5.0 -> 50000.0",
        "cost_spike.entity_types: ('api_key', 'team') -> ('api_key', 'user')",
        "retry_storm.rate_ratio: 3.0 -> 6.0",
    ]
    assert Engine.from_settings(before).differences(Engine.restore(snap)) == []
    restored.adopt(Engine.restore(snap))
    storm, spike = restored.detectors[1], restored.detectors[0]
    assert storm.rate_ratio == 6.0  # type: ignore[attr-defined]
    assert storm.entity_count() == engine.detectors[1].entity_count() > 0  # its baselines came along
    assert sorted(spike._stores) == ["api_key", "user"] and len(spike._stores["user"]) == 0  # type: ignore[attr-defined]
    assert restored.stats.events == cut
    rest = run(restored, events[cut:])
    assert [a.split(":")[:2] for a in rest] == [["retry_storm", "resolved"], ["budget_burn", "resolved"]]
    assert rest[0] == run(Engine.restore(snap), events[cut:])[0]  # the same incident, not a new one


def test_cost_comes_from_the_catalog_when_absent_and_unknown_models_are_counted() -> None:
    engine = Engine.default()
    engine.process(make_event(T0, model="gpt-4o", input_tokens=1_000_000, output_tokens=0))
    engine.process(make_event(T0 + 1, model="mystery-model"))
    engine.process(make_event(T0 + 2, model="mystery-model", cost_usd=1.5))
    assert engine.stats.spend_by_team["search"] == pytest.approx(2.5 + 1.5)
    assert engine.stats.unpriced_events == 1


def test_late_events_are_counted_not_dropped() -> None:
    engine = Engine.default()
    engine.process(make_event(T0 + 600))
    engine.process(make_event(T0))
    assert engine.stats.events == 2 and engine.stats.late_events == 1


def test_idle_sessions_are_let_go() -> None:
    engine = Engine.default()
    for s in range(3000):
        engine.process(make_event(T0 + s, session_id=f"s{s}", agent_id="a", request_fingerprint=str(s)))
    held = engine.entity_count()
    assert held < 3000 * 0.5  # sessions idle 15 min are gone; keys and teams stay
    # idle TTL + eviction period + touch granularity
    assert len(engine.detectors[2].sessions) <= 900 + 300 + 30  # type: ignore[attr-defined]


def test_settings_file_and_environment(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "stormwatch.toml"
    path.write_text("[teams.search]\nmonthly_budget_usd = 3000\n\n[detectors.retry_storm]\nrate_ratio = 4.0\n")
    monkeypatch.setitem(os.environ, "STORMWATCH_DETECTORS__RETRY_STORM__RATE_RATIO", "6")
    settings = load_settings(path)
    assert settings.budgets() == {"search": 3000.0}
    assert settings.detector_params("retry_storm") == {"rate_ratio": 6.0}
    engine = Engine.from_settings(settings)
    assert engine.detectors[1].rate_ratio == 6.0  # type: ignore[attr-defined]


def test_a_wrong_setting_names_the_field() -> None:
    with pytest.raises(ValueError, match=r"detectors\.agent_loop\.cycle_stepz"):
        Settings.model_validate({"detectors": {"agent_loop": {"cycle_stepz": 3}}})


def test_an_event_from_the_future_is_refused_and_detection_goes_on() -> None:
    """One event dated 2100 used to move event time there: no alert again until 2100 (found in review)."""
    from detector.engine import MAX_CLOCK_SKEW, OutOfTime
    from detector.worker.app import Rejected, UsageHandler
    from detector.worker.clock import IdleClock

    engine = Engine.default()
    engine.horizon = T0 + 7200 + MAX_CLOCK_SKEW  # the shell's clock reads T0 + 2 h
    for ev in normal_hour(T0):
        engine.process(ev)
    with pytest.raises(OutOfTime, match=r"timestamp: 26\d{3} days ahead of the clock, more than the 300 s"):
        engine.process(make_event(4_102_444_800.0, team="other"))  # 2100-01-01
    with pytest.raises(OutOfTime, match="before 2000-01-01"):
        engine.process(make_event(0.0))
    assert engine.stats.watermark < T0 + 3600 and engine.stats.events == 1800, "neither moved time nor counted"
    alerts = [a for ev in retry_storm(T0 + 3600, n=600) for a in engine.process(ev)]
    assert ("retry_storm", "firing") in {(a.kind.value, a.status.value) for a in alerts}

    handler = UsageHandler(engine, IdleClock(after=5.0))
    refused = handler.judge(make_event(T0 + 7200 + 3 * 3600))  # a local time (UTC+3) sent as UTC
    assert isinstance(refused, Rejected) and refused.reason.startswith("timestamp: 180 min ahead of the clock")
    assert handler.stats.rejected == 1


def test_names_from_events_do_not_grow_memory_past_the_bounds(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keys, teams and model names come from producers: every map they land in has a bound (found in review)."""
    import detector.engine as engine_module
    import detector.pricing as pricing
    from detector.detectors.cost_spike import CostSpike
    from detector.pricing import PriceCatalog

    monkeypatch.setattr(engine_module, "MAX_TEAMS", 100)
    monkeypatch.setattr(pricing, "MAX_MEMO", 100)
    spike = CostSpike(max_entities=200, ttl=600)
    engine = Engine([spike], PriceCatalog.default())
    for i in range(3_000):
        engine.process(make_event(T0 + i * 0.5, api_key_id=f"k{i}", team=f"team{i}", model=f"gpt-4o-x{i}"))
    held = spike.entity_count()
    assert held <= 400 and len(spike._teams) <= held, "an owner is remembered only for what the stores hold"
    assert len(engine.catalog._memo) <= 100
    assert len(engine.stats.spend_by_team) == 101 and engine.stats.spend_by_team["(other)"] > 0


def test_an_open_incident_keeps_a_bounded_set_of_entities() -> None:
    from detector.incidents import MAX_ENTITIES, IncidentBook
    from tests.unit.test_incidents import finding

    book = IncidentBook()
    for i in range(500):
        book.observe([finding(float(i), entity=f"k{i}")])
    (incident,) = book.open.values()
    assert len(incident.entities) == MAX_ENTITIES and any(e.id == "k499" for e in incident.entities)
