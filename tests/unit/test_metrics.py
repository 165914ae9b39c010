"""Prometheus metrics: own registry, stormwatch_ names, bounded labels, gauges read from the view."""

from __future__ import annotations

from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from detector.web.metrics import EXPORTED, Metrics
from detector.web.view import OTHER, LiveView
from tests.conftest import T0, make_event
from tests.unit.test_web_view import make_alert, make_change


def samples(m: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(m.render().decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(m: Metrics, name: str, **labels: str) -> float:
    return samples(m)[(name, tuple(sorted(labels.items())))]


def test_metrics_live_on_their_own_registry_with_the_prefix() -> None:
    m = Metrics(LiveView())
    m.observe_event(make_event(T0), 1.0)
    assert not any(n.startswith("stormwatch_") for n in REGISTRY._names_to_collectors)
    names = {name for name, _ in samples(m)}
    assert names and all(n.startswith("stormwatch_") for n in names)
    Metrics()  # a second one in the same process does not clash
    assert m.registry is not Metrics().registry


def test_events_spend_rejects_and_alerts_are_counted() -> None:
    m = Metrics()
    m.observe_event(make_event(T0, team="search", model="gpt-4o"), 1.25)
    m.observe_event(make_event(T0, team="search", model="gpt-4o"), 0.75)
    m.observe_event(make_event(T0, team="ads", model="o3"), 3.0)
    m.observe_reject("not valid JSON: oops")
    m.observe_reject("team: Field required")
    m.observe_reject("team: Field required")
    m.observe_alert(make_alert(kind="retry_storm", status="firing", severity="critical"))
    m.observe_alert(make_alert(kind="retry_storm", status="updated", severity="critical", sequence=1))
    assert value(m, "stormwatch_events_processed_total") == 3
    assert value(m, "stormwatch_spend_usd_total", team="search", model="gpt-4o") == 2.0
    assert value(m, "stormwatch_spend_usd_total", team="ads", model="o3") == 3.0
    assert value(m, "stormwatch_events_rejected_total", reason="not_json") == 1
    assert value(m, "stormwatch_events_rejected_total", reason="missing_team") == 2
    assert value(m, "stormwatch_alerts_total", kind="retry_storm", status="firing", severity="critical") == 1
    assert value(m, "stormwatch_alerts_total", kind="retry_storm", status="updated", severity="critical") == 1
    # Firing series exist at zero from the start, so increase() sees the first alert.
    assert value(m, "stormwatch_alerts_total", kind="agent_loop", status="firing", severity="warning") == 0


def test_spend_labels_are_bounded() -> None:
    m = Metrics(max_spend_series=10)
    for i in range(500):
        m.observe_event(make_event(T0, team=f"t{i % 50}", model=f"m{i}"), 1.0)
    spend = {k: v for k, v in samples(m).items() if k[0] == "stormwatch_spend_usd_total"}
    assert len(spend) <= 11
    assert sum(spend.values()) == 500.0
    assert value(m, "stormwatch_spend_usd_total", team=OTHER, model=OTHER) == 490.0


def test_latency_lag_and_snapshots() -> None:
    m = Metrics()
    for seconds in (0.00003, 0.0004, 0.02, 3.0):
        m.observe_latency(seconds)
    m.set_consumer_lag("llm.usage", 0, 120)
    m.set_consumer_lag("llm.usage", 1, 5)
    m.mark_snapshot(0, 1_800_000_000.0, 4096)
    m.mark_event_seen(1_800_000_001.0)
    assert value(m, "stormwatch_processing_latency_seconds_count") == 4
    assert value(m, "stormwatch_processing_latency_seconds_bucket", le="0.0005") == 2
    assert value(m, "stormwatch_processing_latency_seconds_bucket", le="+Inf") == 4
    assert value(m, "stormwatch_consumer_lag", topic="llm.usage", partition="0") == 120
    assert value(m, "stormwatch_snapshot_timestamp_seconds", partition="0") == 1_800_000_000.0
    assert value(m, "stormwatch_snapshot_bytes", partition="0") == 4096
    assert value(m, "stormwatch_last_event_timestamp_seconds") == 1_800_000_001.0
    m.forget_partition("llm.usage", 0)
    m.forget_partition("llm.usage", 7)  # never set: fine
    lag = {k for k in samples(m) if k[0] == "stormwatch_consumer_lag"}
    assert lag == {("stormwatch_consumer_lag", (("partition", "1"), ("topic", "llm.usage")))}


def test_breaker_incident_and_watermark_gauges_come_from_the_view() -> None:
    view = LiveView()
    m = Metrics(view)
    assert value(m, "stormwatch_breaker_oldest_open_timestamp_seconds") == 0
    assert value(m, "stormwatch_event_time_watermark_seconds") == 0
    view.observe_event(make_event(T0 + 30), 1.0)
    view.observe_breaker(make_change("api_key:k1", "open", 1, at=T0))
    view.observe_breaker(make_change("session:s1", "open", 1, at=T0 + 10))
    view.observe_breaker(make_change("team:ads", "closed", 2, previous="open"))
    view.observe_alert(make_alert("a", kind="cost_spike", severity="critical"))
    view.observe_alert(make_alert("b", kind="cost_spike", severity="critical"))
    view.observe_alert(make_alert("c", kind="agent_loop", severity="warning"))
    view.observe_alert(make_alert("c", kind="agent_loop", severity="warning", status="resolved", sequence=1))
    assert value(m, "stormwatch_breakers", entity_type="api_key", state="open") == 1
    assert value(m, "stormwatch_breakers", entity_type="session", state="open") == 1
    assert value(m, "stormwatch_breakers", entity_type="team", state="closed") == 1
    assert value(m, "stormwatch_breakers", entity_type="agent", state="half_open") == 0
    assert value(m, "stormwatch_breaker_oldest_open_timestamp_seconds") == T0
    assert value(m, "stormwatch_incidents_active", kind="cost_spike", severity="critical") == 2
    assert value(m, "stormwatch_incidents_active", kind="agent_loop", severity="warning") == 0
    assert value(m, "stormwatch_event_time_watermark_seconds") == T0 + 30


def test_exported_names_are_exactly_what_is_exposed() -> None:
    view = LiveView()
    m = Metrics(view)
    m.observe_event(make_event(T0), 1.0)
    m.observe_reject("not valid JSON")
    m.observe_latency(0.001)
    m.set_consumer_lag("llm.usage", 0, 1)
    m.mark_snapshot(0, 1.0, 1)
    m.mark_event_seen(1.0)
    exposed = {name for name, _ in samples(m) if not name.endswith("_created")}
    assert exposed == EXPORTED
