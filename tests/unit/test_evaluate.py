"""Scoring alerts against labels: what counts as found, as late, and as a false incident."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from detector.evaluate import score
from detector.events import Entity, IncidentLabel

T = datetime(2026, 11, 3, 9, tzinfo=UTC)


def label(kind: str, scenario: str, team: str = "t", start: datetime = T, minutes: int = 10) -> IncidentLabel:
    return IncidentLabel(
        label_id=f"{scenario}-{start:%H%M}",
        kind=kind,
        scenario=scenario,  # type: ignore[arg-type]
        entity=Entity(type="api_key", id="k"),
        team=team,
        start=start,
        end=start + timedelta(minutes=minutes),
    )


def alert(iid: str, kind: str, at: datetime, status: str = "firing", owner: str = "t") -> dict[str, Any]:
    return {
        "incident_id": iid,
        "kind": kind,
        "status": status,
        "owner": owner,
        "detected_at": at.isoformat(),
        "entity": {"type": "api_key", "id": "k"},
        "explanation": {"summary": "x"},
    }


def test_found_late_missed_and_false() -> None:
    labels = [
        label("retry_storm", "full_storm"),
        label("cost_spike", "premium_model_switch", start=T + timedelta(hours=2)),
        label("agent_loop", "fingerprint_cycle", start=T + timedelta(hours=4)),
        label("benign", "nightly_batch", start=T + timedelta(hours=6)),
    ]
    alerts = [
        alert("a", "retry_storm", T + timedelta(seconds=12)),
        alert("a", "retry_storm", T + timedelta(minutes=15), status="resolved"),
        alert("b", "cost_spike", T + timedelta(hours=2, minutes=3)),
        alert("c", "retry_storm", T + timedelta(hours=2, minutes=4)),  # a side effect in the same team
        alert("d", "cost_spike", T + timedelta(hours=6, minutes=5)),  # the benign batch: false
        alert("e", "budget_burn", T + timedelta(hours=9), owner="other"),  # nothing there: false
    ]
    card = score(labels, alerts, days=2.0)
    assert card.kinds["retry_storm"].latencies == [12.0]
    assert card.kinds["cost_spike"].latencies == [180.0]
    assert card.kinds["agent_loop"].recall == 0.0 and [m["scenario"] for m in card.missed] == ["fingerprint_cycle"]
    assert [(f["incident_id"], f["benign_scenario"]) for f in card.false_incidents] == [
        ("d", "nightly_batch"),
        ("e", None),
    ]
    assert card.false_per_day == 1.0
    assert card.kinds["retry_storm"].precision == 1.0 and card.kinds["cost_spike"].precision == 0.5


def test_a_detection_before_the_label_starts_counts_with_zero_latency_but_not_an_hour_before() -> None:
    labels = [label("retry_storm", "full_storm")]
    early = score(labels, [alert("a", "retry_storm", T - timedelta(seconds=30))], days=1.0)
    assert early.kinds["retry_storm"].latencies == [0.0]
    way_early = score(labels, [alert("a", "retry_storm", T - timedelta(hours=1))], days=1.0)
    assert way_early.kinds["retry_storm"].recall == 0.0 and len(way_early.false_incidents) == 1


def feedback(iid: str, kind: str, label_: str, n: int) -> dict[str, Any]:
    return {
        "feedback_id": f"f{n}",
        "incident_id": iid,
        "kind": kind,
        "label": label_,
        "actor": "ana",
        "entity": {"type": "api_key", "id": "k"},
        "labelled_at": T.isoformat(),
        "silence_seconds": 0,
    }


def test_owners_labels_on_the_alerts_topic_are_counted_newest_per_incident_and_not_taken_for_alerts() -> None:
    labels = [label("retry_storm", "full_storm")]
    alerts = [
        alert("a", "retry_storm", T + timedelta(seconds=12)),
        alert("b", "cost_spike", T + timedelta(hours=3)),
        alert("c", "cost_spike", T + timedelta(hours=5)),
        feedback("a", "retry_storm", "real", 1),
        feedback("b", "cost_spike", "real", 2),
        feedback("b", "cost_spike", "false_alarm", 3),  # changed their mind: the newest counts
        feedback("c", "cost_spike", "planned", 4),
    ]
    card = score(labels, alerts, days=1.0)
    assert card.kinds["cost_spike"].incidents == 2 and card.kinds["retry_storm"].incidents == 1
    assert {k: dict(v) for k, v in card.feedback.items()} == {
        "real": {"retry_storm": 1},
        "false_alarm": {"cost_spike": 1},
        "planned": {"cost_spike": 1},
    }
    assert card.owner_precision == 0.5  # 1 real against 1 false alarm; planned counts as neither
    assert card.to_json()["feedback"]["false_alarm"] == {"cost_spike": 1}
