"""``detector worker`` against a real broker: alerts out, bad input to the DLQ, same alerts as replay.

Each test runs the worker as a subprocess on its own fresh topics and consumer group.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import time
from pathlib import Path
from typing import Any

import pytest

from detector.cli import main as cli_main
from detector.engine import Engine
from detector.events import Alert
from detector.settings import load_settings
from detector.simulate import SimulationSpec, write_simulation
from detector.wire import decode_usage
from detector.worker.app import (
    REASON_HEADER,
    SOURCE_OFFSET_HEADER,
    SOURCE_PARTITION_HEADER,
    SOURCE_TOPIC_HEADER,
)
from tests.conftest import T0, normal_hour, retry_storm
from tests.integration.kafka_tools import (
    Topics,
    Workers,
    committed_and_end,
    consume_until,
    create_topic,
    firing_storm,
    produce,
    read_all,
    record,
    topic_configs,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def test_storm_in_the_backlog_fires_within_seconds(kafka_bootstrap: str, workers: Workers) -> None:
    """An hour of normal traffic then a retry storm, produced before the worker starts."""
    topics = Topics.fresh("storm")
    events = normal_hour(T0) + retry_storm(T0 + 3600)

    async def scenario() -> tuple[Any, float]:
        await create_topic(kafka_bootstrap, topics.usage, partitions=4)
        await produce(kafka_bootstrap, topics.usage, map(record, events))
        worker = workers.start(topics)
        alerts = await consume_until(kafka_bootstrap, topics.alerts, firing_storm, timeout=30)
        return alerts, time.monotonic() - worker.started

    alerts, elapsed = asyncio.run(scenario())
    print(f"time from worker start to retry_storm firing: {elapsed:.2f} s")
    firing = next(r for r in alerts if json.loads(r.value)["status"] == "firing")
    alert = Alert.model_validate_json(firing.value)
    assert alert.kind.value == "retry_storm" and alert.entity.id in ("key-1", "search")
    assert firing.key == alert.incident_id.encode()
    assert (alert.detected_at - alert.started_at).total_seconds() <= 30
    assert elapsed < 20, f"first alert took {elapsed:.1f} s"

    configs = asyncio.run(topic_configs(kafka_bootstrap, [topics.alerts, topics.dlq, topics.breakers]))
    assert configs[topics.alerts]["retention.ms"] == str(7 * 86400 * 1000)
    assert configs[topics.dlq]["retention.ms"] == str(14 * 86400 * 1000)
    assert configs[topics.breakers]["cleanup.policy"] == "compact"
    assert configs[topics.alerts]["partitions"] == "8"


def test_bad_messages_go_to_the_dlq_and_good_ones_flow(kafka_bootstrap: str, workers: Workers) -> None:
    """A live worker (started first): two bad messages land in the DLQ with reasons; the storm still fires."""
    topics = Topics.fresh("dlq")
    good = normal_hour(T0) + retry_storm(T0 + 3600)
    negative = good[0].model_dump(mode="json") | {"event_id": "neg", "input_tokens": -5}
    not_json = (b"k-bad", b'{"event_id": "broken", "timestamp": ')
    negative_record = (b"key-1", json.dumps(negative).encode())
    records = [not_json, *map(record, good[:900]), negative_record, *map(record, good[900:])]

    async def scenario() -> tuple[list[Any], list[Any], float]:
        worker = workers.start(topics, partitions=2)
        await worker.await_line(r"stormwatch: assigned .*\.usage\[", timeout=30)  # the worker created the topic
        t0 = time.monotonic()
        await produce(kafka_bootstrap, topics.usage, records)
        dead, alerts = await asyncio.gather(
            consume_until(kafka_bootstrap, topics.dlq, lambda got: len(got) >= 2, timeout=30),
            consume_until(kafka_bootstrap, topics.alerts, firing_storm, timeout=30),
        )
        latency = time.monotonic() - t0
        await worker.await_line(rf"events={len(good)} rejected=2 ", timeout=30)
        return dead, alerts, latency

    dead, _alerts, latency = asyncio.run(scenario())
    # Everything processed (dead letters included) is committed when the worker stops.
    assert workers.stop_all() == [0]
    committed, ends = asyncio.run(committed_and_end(kafka_bootstrap, topics.group, topics.usage))
    assert committed == ends and sum(ends.values()) == len(records)
    print(f"time from producing {len(records)} messages to the firing alert: {latency:.2f} s")
    assert len(dead) == 2
    by_value = {r.value: r for r in dead}
    assert set(by_value) == {not_json[1], negative_record[1]}, "original bytes, unchanged"
    expected = [
        (not_json[1], b"k-bad", "not valid JSON: "),
        (negative_record[1], b"key-1", "input_tokens: Input should be greater than or equal to 0"),
    ]
    for raw, key, problem in expected:
        r = by_value[raw]
        headers = {k: v.decode() for k, v in r.headers}
        assert r.key == key
        assert problem in headers[REASON_HEADER], headers
        assert headers[SOURCE_TOPIC_HEADER] == topics.usage
        assert int(headers[SOURCE_PARTITION_HEADER]) in (0, 1)
        assert int(headers[SOURCE_OFFSET_HEADER]) >= 0


def test_worker_and_replay_give_the_same_alerts(kafka_bootstrap: str, workers: Workers, tmp_path: Path) -> None:
    """One partition, so the worker sees the replay's order: identical alert records, ids and all."""
    topics = Topics.fresh("same")
    events = normal_hour(T0) + retry_storm(T0 + 3600) + normal_hour(T0 + 3900)
    lines = [ev.model_dump_json().encode() for ev in events]
    events_path = tmp_path / "events.jsonl"
    events_path.write_bytes(b"\n".join(lines) + b"\n")
    replay_path = tmp_path / "replay-alerts.jsonl"
    assert cli_main(["replay", str(events_path), "--alerts-out", str(replay_path), "--quiet"]) == 0
    replayed = [json.loads(line) for line in replay_path.read_bytes().splitlines()]
    assert {(a["kind"], a["status"]) for a in replayed} >= {("retry_storm", "firing"), ("retry_storm", "resolved")}

    async def scenario() -> list[Any]:
        await create_topic(kafka_bootstrap, topics.usage, partitions=1)
        await produce(kafka_bootstrap, topics.usage, ((None, line) for line in lines))
        # Event time only: no idle advance while the backlog drains.
        worker = workers.start(topics, partitions=1, idle_advance_after_seconds=600)
        # Every alert comes from the by-team stage: wait for it to have them all, not for the usage stage.
        await worker.await_line(rf"by team: events={len(events)} rejected=0 alerts={len(replayed)} ", timeout=60)
        return await read_all(kafka_bootstrap, topics.alerts)

    published = asyncio.run(scenario())
    from_worker = [json.loads(r.value) for r in published]
    assert [r.key.decode() for r in published] == [a["incident_id"] for a in from_worker]
    key = lambda a: (a["kind"], a["status"], a["incident_id"])  # noqa: E731
    assert {key(a) for a in from_worker} == {key(a) for a in replayed}
    assert from_worker == replayed


def test_a_simulated_day_over_four_partitions_pages_the_incidents_of_a_replay(
    kafka_bootstrap: str, workers: Workers, tmp_path: Path
) -> None:
    """The fleet day of ``test_scopes`` (~260,000 events, every kind of incident) through 4 usage partitions.

    Keys' events are judged where they are keyed, teams' in the by-team stage, and every
    finding is booked by its team's by-team partition: the worker opens exactly the incidents
    one engine opens over the whole file, no fewer (none lost in the hand-off) and no more (no
    team spike paging apart from the key spike that caused it).
    """
    paths = write_simulation(SimulationSpec(seed=7, days=1.0, scale=0.25), tmp_path / "sim")
    with gzip.open(paths["events"], "rb") as f:
        lines = f.read().splitlines()
    events = [decode_usage(line) for line in lines]
    engine = Engine.from_settings(load_settings(paths["config"]))
    expected = {
        (a.kind.value, a.incident_id) for ev in events for a in engine.process(ev) if a.status.value == "firing"
    }
    assert {kind for kind, _ in expected} == {"cost_spike", "retry_storm", "agent_loop", "budget_burn"}

    def opened(records: list[Any]) -> set[tuple[str, str]]:
        return {
            (a["kind"], a["incident_id"])
            for a in map(json.loads, (r.value for r in records))
            if a["status"] == "firing"
        }

    topics = Topics.fresh("simday")

    async def scenario() -> list[Any]:
        await create_topic(kafka_bootstrap, topics.usage, partitions=4)
        config = {"STORMWATCH_CONFIG": str(paths["config"])}  # the simulated teams' budgets
        worker = workers.start(topics, env=config, partitions=4, idle_advance_after_seconds=600)
        await worker.await_line(r"stormwatch: assigned .*\.usage\[", timeout=30)
        await produce(
            kafka_bootstrap,
            topics.usage,
            ((ev.api_key_id.encode(), line) for ev, line in zip(events, lines, strict=True)),
        )
        await worker.await_line(rf"by team: events={len(events)} .* late=0 ", timeout=90)
        return await consume_until(kafka_bootstrap, topics.alerts, lambda got: opened(got) >= expected, timeout=30)

    assert opened(asyncio.run(scenario())) == expected


def test_idle_stream_still_gets_its_due_alert(kafka_bootstrap: str, workers: Workers) -> None:
    """Traffic stops just before the tick that would fire: the idle clock brings the alert out."""
    topics = Topics.fresh("idle")
    events = normal_hour(T0) + retry_storm(T0 + 3600)
    engine = Engine.default()
    cut = next(i for i, ev in enumerate(events) if engine.process(ev))  # the event whose arrival fires
    expected = Engine.default()
    for ev in events[:cut]:
        assert not expected.process(ev)
    due = [a for a in expected.advance(events[cut].timestamp.timestamp()) if a.status.value == "firing"]
    assert due, "the firing alert must be due by the cut event's time"

    async def scenario() -> list[Any]:
        await create_topic(kafka_bootstrap, topics.usage, partitions=1)
        await produce(kafka_bootstrap, topics.usage, map(record, events[:cut]))
        workers.start(topics, config_file=True, partitions=1, idle_advance_after_seconds=1)
        return await consume_until(kafka_bootstrap, topics.alerts, firing_storm, timeout=40)

    published = asyncio.run(scenario())
    got = [Alert.model_validate_json(r.value) for r in published]
    assert got[0] == due[0]
