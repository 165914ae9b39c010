"""``detector feedback`` on a real broker: it finds the incident on the alerts topic and puts the label
beside it, with the incident's kind and entity, marked by the ``stormwatch-record: feedback`` header."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from detector.alerting.alerter import FEEDBACK, RECORD_HEADER
from detector.cli import main as cli_main
from detector.engine import Engine
from detector.events import Alert, IncidentFeedback
from tests.conftest import T0, normal_hour, retry_storm
from tests.integration.kafka_tools import create_topic, produce, read_all

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def storm_alerts() -> list[Alert]:
    engine = Engine.default()
    return [a for ev in normal_hour(T0) + retry_storm(T0 + 3600) for a in engine.process(ev)]


def test_feedback_labels_an_incident_found_on_the_alerts_topic(
    kafka_bootstrap: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    topic = f"it-feedback-{uuid.uuid4().hex[:8]}.alerts"
    monkeypatch.delenv("STORMWATCH_CONFIG", raising=False)
    monkeypatch.setenv("STORMWATCH_KAFKA__BOOTSTRAP_SERVERS", kafka_bootstrap)
    monkeypatch.setenv("STORMWATCH_KAFKA__ALERTS_TOPIC", topic)
    (firing, *later) = storm_alerts()
    records = [(a.incident_id.encode(), a.model_dump_json().encode()) for a in (firing, *later)]
    asyncio.run(create_topic(kafka_bootstrap, topic, partitions=3))
    asyncio.run(produce(kafka_bootstrap, topic, records))

    args = ["feedback", firing.incident_id, "false_alarm", "--by", "ana", "--note", "load test", "--silence", "2h"]
    assert cli_main(args) == 0
    assert cli_main(["feedback", "no-such-incident", "real"]) == 1

    on_topic = asyncio.run(read_all(kafka_bootstrap, topic))
    (label,) = [r for r in on_topic if dict(r.headers).get(RECORD_HEADER) == FEEDBACK]
    assert label.key == firing.incident_id.encode()  # beside the incident's own records
    fb = IncidentFeedback.model_validate_json(label.value)
    assert (fb.incident_id, fb.kind, fb.entity) == (firing.incident_id, firing.kind, firing.entity)
    assert (fb.label.value, fb.actor, fb.note, fb.silence_seconds) == ("false_alarm", "ana", "load test", 7200)
