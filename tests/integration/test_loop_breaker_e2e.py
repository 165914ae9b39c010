"""End to end on a real broker: an agent loop → the worker's alert → the alerter trips the session's
breaker → a gateway's BreakerFollower → the ASGI middleware refuses that session, and only that one.

Also: an owner's ``false_alarm`` label closes the breaker again and the session passes.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest

from detector.alerting.alerter import Alerter, publish_feedback
from detector.enforce import BreakerFollower, BreakerMiddleware, BreakerTable
from detector.events import Entity, FeedbackLabel, IncidentFeedback, UsageEvent
from detector.settings import Settings
from tests.conftest import T0, make_event
from tests.integration.kafka_tools import Topics, Workers, consume_until, produce, record
from tests.integration.test_breakers_kafka import ok_app, request

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


def loop_and_healthy_sessions(start: float) -> list[UsageEvent]:
    """``s-loop`` cycles search/open/summarise every 4 s; ``s-ok`` does varied work on the same key."""
    loop = [
        make_event(start + 4.0 * i, session_id="s-loop", agent_id="triage", request_fingerprint=fp, output_tokens=120)
        for i, fp in enumerate(["plan", "read"] + ["search", "open", "summarise"] * 15)
    ]
    healthy = [
        make_event(start + 1.0 + 9.0 * i, session_id="s-ok", agent_id="triage", request_fingerprint=f"fp-{i}")
        for i in range(12)
    ]
    return sorted(loop + healthy, key=lambda ev: ev.timestamp)


def test_a_loop_trips_its_session_breaker_and_the_gateway_refuses_only_that_session(
    kafka_bootstrap: str,
    workers: Workers,
    tmp_path: Path,
) -> None:
    topics = Topics.fresh("e2e")
    settings = Settings.model_validate(
        {
            "kafka": topics.kafka(kafka_bootstrap, tmp_path / "faust-data"),
            "alerting": {
                "rules": [{"kind": "agent_loop", "min_severity": "info", "action": "trip", "breaker_ttl": "30m"}],
                "outbox_path": str(tmp_path / "outbox.sqlite"),
            },
        }
    )

    async def scenario() -> tuple[float, list[int], list[int]]:
        worker = workers.start(topics, partitions=2, idle_advance_after_seconds=1)
        await worker.await_line(r"stormwatch: assigned .*\.usage\[", timeout=30)
        alerter = Alerter(settings)
        await alerter.start()
        stop = asyncio.Event()
        running = asyncio.ensure_future(alerter.run(stop))
        table = BreakerTable()
        gateway = BreakerMiddleware(ok_app, table)
        try:
            async with BreakerFollower(table, kafka_bootstrap, topics.breakers) as follower:
                before = [(await request(gateway, s))[0] for s in ("s-loop", "s-ok")]
                t0 = time.monotonic()
                await produce(kafka_bootstrap, topics.usage, map(record, loop_and_healthy_sessions(T0)))
                await follower.wait_until(lambda t: not t.allowed(api_key="k-1", session="s-loop"), timeout=60)
                latency = time.monotonic() - t0
                during = [(await request(gateway, s))[0] for s in ("s-loop", "s-ok")]

                loops = await consume_until(kafka_bootstrap, topics.alerts, lambda rs: bool(rs), timeout=10)
                incident = loops[0].key.decode()
                label = IncidentFeedback(
                    feedback_id=str(uuid.uuid4()),
                    incident_id=incident,
                    kind="agent_loop",
                    entity=Entity(type="session", id="s-loop"),
                    label=FeedbackLabel.FALSE_ALARM,
                    actor="ana",
                    labelled_at=datetime.now(UTC),
                    silence_seconds=3600,
                    note="a planned evaluation run",
                )
                await publish_feedback(settings, label)
                await follower.wait_until(lambda t: t.allowed(api_key="k-1", session="s-loop"), timeout=30)
                closed = table.get("session:search/s-loop")
                assert closed is not None and closed.actor == "ana" and "false_alarm" in closed.reason
        finally:
            stop.set()
            await running
            await alerter.stop()
        return latency, before, during

    latency, before, during = asyncio.run(scenario())
    assert before == [200, 200]
    assert during == [429, 200], "the looping session is refused, the healthy one on the same key passes"
    print(f"loop produced -> gateway refusing in {latency:.2f} s")
    assert latency < 30
