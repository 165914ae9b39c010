"""The worker's runtime over in-memory topics: hours of quiet, two takeovers in a row, a stop under load.

Each of these went wrong once, and would take a broker minutes or hours of wall clock to show.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import pytest
from aiokafka import TopicPartition  # type: ignore[import-untyped]

import detector.worker.app as worker_app
from detector.engine import Engine
from detector.settings import Settings
from detector.wire import encode_usage
from detector.worker.app import Runtime
from detector.worker.config import KafkaSettings
from detector.worker.consumer import UsageConsumer
from tests.conftest import T0, make_event, normal_hour, retry_storm
from tests.unit.worker_fakes import Broker, Rec, feed, runtime


class WallClock:
    """The runtime's ``time.monotonic``, moved by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def wall(monkeypatch: pytest.MonkeyPatch) -> WallClock:
    clock = WallClock()
    monkeypatch.setattr(worker_app.time, "monotonic", clock)
    return clock


def usage_records(broker: Broker, topic: str) -> list[Rec]:
    for ev in normal_hour(T0) + retry_storm(T0 + 3600):
        broker.append(topic, ev.api_key_id.encode(), encode_usage(ev))
    return broker.logs[topic]


class Takeovers:
    """One usage partition (a normal hour, then a storm) that workers take from one another."""

    def __init__(self) -> None:
        self.k, self.broker = KafkaSettings(repartition_by_team=False), Broker()
        self.records = usage_records(self.broker, self.k.usage_topic)
        self.tp = TopicPartition(self.k.usage_topic, 0)
        self.cut = len(normal_hour(T0))  # where the storm begins

    async def worker(self) -> Runtime:
        """A worker that is assigned the partition (restoring its newest snapshot)."""
        w = runtime(self.broker, self.k, self.k.usage_topic, Engine.default)
        await w.assigned([self.tp])
        return w

    async def feed(self, w: Runtime, start: int, stop: int | None = None) -> None:
        await feed(w, self.k.usage_topic, self.records[start:stop])

    def published(self) -> Counter[str]:
        return Counter(a["alert_id"] for a in self.broker.values(self.k.alerts_topic))


def test_the_by_team_stage_resolves_on_the_idle_clock_once_traffic_stops(wall: WallClock) -> None:
    """Every alert comes from the by-team book, so its event time must run on when the stream goes quiet."""
    k, settings, broker = KafkaSettings(), Settings(), Broker()
    records = usage_records(broker, k.usage_topic)

    async def forward(key: bytes | None, value: bytes, headers: list[tuple[str, bytes]], _: int | None) -> Any:
        broker.append(k.by_team_topic, key, value, headers)
        return asyncio.sleep(0)

    async def scenario() -> list[str]:
        usage = runtime(broker, k, k.usage_topic, lambda: Engine.from_settings(settings, "key"), forward=forward)
        usage.fanout, usage.sources_total = [0], 1
        team = runtime(broker, k, k.by_team_topic, lambda: Engine.from_settings(settings, "team"), forwarded=True)
        await usage.assigned([TopicPartition(k.usage_topic, 0)])
        await team.assigned([TopicPartition(k.by_team_topic, 0)])
        done = 0

        async def pass_on() -> None:
            nonlocal done
            forwarded = broker.logs.get(k.by_team_topic, [])[done:]
            done += len(forwarded)
            await feed(team, k.by_team_topic, forwarded)

        for i in range(0, len(records), 500):
            wall.now += 0.1
            await feed(usage, k.usage_topic, records[i : i + 500])
            await pass_on()
        for _ in range(2 * 3600):  # the stream is quiet; the app's timer ticks every second
            wall.now += worker_app.IDLE_TICK_SECONDS
            await usage.idle_tick()
            await pass_on()
            await team.idle_tick()
            if not team.parts[0].handler.engine.book.open:
                break
        return [a["status"] for a in broker.values(k.alerts_topic)]

    statuses = asyncio.run(scenario())
    assert statuses[0] == "firing" and statuses[-1] == "resolved", statuses


def test_a_second_takeover_while_re_processing_does_not_publish_again(wall: WallClock) -> None:
    """W1 pages and dies; W2 restores, is revoked before it re-raises the page; W3 must still hold it back."""
    t = Takeovers()

    async def scenario() -> tuple[int, Counter[str]]:
        w1 = await t.worker()
        await t.feed(w1, 0, t.cut)
        await w1.save_all("periodic")
        await t.feed(w1, t.cut)  # pages; then kill -9: no snapshot after the page
        assert t.published(), "W1 paged"
        w2 = await t.worker()
        await t.feed(w2, t.cut, t.cut + 10)
        await w2.revoked([t.tp])  # a rebalance: snapshot far before the page
        w3 = await t.worker()
        held_back = len(w3.parts[0].published)
        await t.feed(w3, t.cut + 10)
        return held_back, t.published()

    held_back, published = asyncio.run(scenario())
    assert held_back >= 1, "W3 learns of W1's page from W2's snapshot"
    assert published and max(published.values()) == 1, published


class _Producer:
    def __init__(self, broker: Broker) -> None:
        self.broker = broker

    async def send(self, topic: str, value: bytes, key: bytes | None, partition: int | None, headers: Any) -> Any:
        self.broker.append(topic, key, value, headers)
        await asyncio.sleep(0.001)  # a round trip: forwards queue up behind it
        return asyncio.sleep(0)

    async def stop(self) -> None:
        pass


class _LiveTraffic:
    """A consumer that always has a batch of ten teams' events."""

    def __init__(self, broker: Broker, topic: str) -> None:
        self.broker, self.topic, self.t = broker, topic, T0

    async def getmany(self, timeout_ms: int = 0, max_records: int = 0) -> dict[TopicPartition, list[Rec]]:
        await asyncio.sleep(0.005)
        batch = []
        for i in range(50):
            ev = make_event(self.t, team=f"team-{i % 10}", api_key_id=f"k{i % 10}")
            self.t += 0.05
            batch.append(self.broker.append(self.topic, ev.api_key_id.encode(), encode_usage(ev)))
        return {TopicPartition(self.topic, 0): batch}

    def assignment(self) -> set[TopicPartition]:
        return {TopicPartition(self.topic, 0)}

    def highwater(self, tp: TopicPartition) -> None:
        return None

    async def commit(self, offsets: Any) -> None:
        pass

    async def stop(self) -> None:
        pass

    def pause(self, *tps: TopicPartition) -> None:
        pass

    def resume(self, *tps: TopicPartition) -> None:
        pass


def test_a_stop_under_live_traffic_saves_every_partition_and_ends() -> None:
    """The batch in hand when the stop comes is forwarded, then the shutdown snapshot is written."""
    k, settings, broker = KafkaSettings(), Settings(), Broker()

    class Consumer(UsageConsumer):
        async def on_start(self) -> None:
            self._consumer, self._producer = _LiveTraffic(broker, k.usage_topic), _Producer(broker)  # type: ignore[assignment]
            self.runtime.forward = self.forward
            self.runtime.fanout, self.runtime.sources_total = list(range(8)), 1

    async def scenario() -> int:
        usage = runtime(broker, k, k.usage_topic, lambda: Engine.from_settings(settings, "key"))
        team = runtime(broker, k, k.by_team_topic, lambda: Engine.from_settings(settings, "team"), forwarded=True)
        await usage.assigned([TopicPartition(k.usage_topic, 0)])
        consumer = Consumer([usage, team], declare=asyncio.sleep)
        await consumer.start()
        while len(broker.logs.get(k.by_team_topic, [])) < 200:  # forwarding in full flow
            await asyncio.sleep(0.01)
        saved = len(broker.logs.get(k.state_topic, []))
        await asyncio.wait_for(consumer.stop(), timeout=20)  # hung for good before the fix
        return len(broker.logs.get(k.state_topic, [])) - saved

    assert asyncio.run(scenario()) >= 1, "the shutdown snapshot was written"


def test_events_let_go_by_the_wall_clock_are_snapshotted_at_once(wall: WallClock) -> None:
    """A usage partition never heard from stops holding the others back after its grace: that release is
    the wall clock's doing, which a restore would redo differently, so the alerts it raised are saved."""
    k, settings, broker = KafkaSettings(), Settings(), Broker()
    records = usage_records(broker, k.usage_topic)  # a normal hour, then a storm

    async def forward(key: bytes | None, value: bytes, headers: list[tuple[str, bytes]], _: int | None) -> Any:
        broker.append(k.by_team_topic, key, value, headers)
        return asyncio.sleep(0)

    def by_team_snapshots() -> int:
        key = f"{k.by_team_topic}:0".encode()
        return sum(r.key == key for r in broker.logs.get(k.state_topic, []))

    async def scenario() -> tuple[int, int, int, int]:
        usage = runtime(broker, k, k.usage_topic, lambda: Engine.from_settings(settings, "key"), forward=forward)
        usage.fanout, usage.sources_total = [0], 2  # a second usage partition that never speaks
        team = runtime(broker, k, k.by_team_topic, lambda: Engine.from_settings(settings, "team"), forwarded=True)
        await usage.assigned([TopicPartition(k.usage_topic, 0)])
        await team.assigned([TopicPartition(k.by_team_topic, 0)])
        await feed(usage, k.usage_topic, records)
        await feed(team, k.by_team_topic, broker.logs[k.by_team_topic])
        held = len(team.parts[0].aligner or [])
        before, paged = by_team_snapshots(), len(broker.logs.get(k.alerts_topic, []))
        wall.now += k.align_wait_seconds + 1  # the silent partition's grace is over
        await team.idle_tick()
        paged = len(broker.logs.get(k.alerts_topic, [])) - paged
        return held, len(team.parts[0].aligner or []), paged, by_team_snapshots() - before

    held, left, paged, saved = asyncio.run(scenario())
    assert held > 0 and left < held, "held for the silent partition, then let go by the wall clock"
    assert paged > 0 and saved == 1


def test_the_consumer_vouches_for_the_usage_partitions_it_is_behind_on(wall: WallClock) -> None:
    k, settings, broker = KafkaSettings(), Settings(), Broker()

    class Behind:
        def __init__(self, end: int) -> None:
            self.end = end

        def assignment(self) -> set[TopicPartition]:
            return {TopicPartition(k.usage_topic, 0), TopicPartition(k.by_team_topic, 0)}

        def highwater(self, tp: TopicPartition) -> int:
            return self.end

    async def heard_at(end: int) -> tuple[float, float]:
        usage = runtime(broker, k, k.usage_topic, lambda: Engine.from_settings(settings, "key"))
        team = runtime(broker, k, k.by_team_topic, lambda: Engine.from_settings(settings, "team"), forwarded=True)
        await usage.assigned([TopicPartition(k.usage_topic, 0)])
        await team.assigned([TopicPartition(k.by_team_topic, 0)])
        usage.parts[0].offset = 41  # the engine has offsets up to 41
        aligner = team.parts[0].aligner
        assert aligner is not None
        aligner.heard(0, T0, wall=wall.now)
        consumer = UsageConsumer([usage, team], declare=asyncio.sleep)
        consumer._consumer = Behind(end)  # type: ignore[assignment]
        heard = wall.now
        wall.now += 2.5
        consumer._alive()
        return aligner.seen[0].heard_at - heard, aligner.seen[0].watermark

    assert asyncio.run(heard_at(end=50)) == (2.5, T0), "records 42-49 still to fetch: alive, watermark as it was"
    assert asyncio.run(heard_at(end=42)) == (0.0, T0), "caught up: not vouched for"


def test_a_worker_given_back_a_partition_another_worked_on_meanwhile_takes_its_snapshot(wall: WallClock) -> None:
    """W1 stalls past its session (a zombie), W2 takes the partition and pages, then W1 gets it back.

    W1 kept its engine, so it went back to its own old offset and paged W2's alerts again (review)."""
    t = Takeovers()

    async def scenario() -> Counter[str]:
        w1 = await t.worker()
        await t.feed(w1, 0, t.cut)
        await w1.revoked([t.tp])  # what it does when it finds itself out of the group
        w2 = await t.worker()
        await t.feed(w2, t.cut)  # pages
        await w2.revoked([t.tp])
        assert t.published(), "W2 paged"
        (resume,) = (await w1.assigned([t.tp])).values()  # back to W1, which still holds its engine
        await t.feed(w1, resume)
        return t.published()

    published = asyncio.run(scenario())
    assert max(published.values()) == 1, {i: n for i, n in published.items() if n > 1}


def test_a_worker_out_of_the_group_unaware_writes_no_snapshot_over_the_new_owners(wall: WallClock) -> None:
    """W1 stalls; W2 takes over and pages; W1's revoke comes late. Its old engine must not replace W2's
    snapshot, or the next owner would go back to W1's offset and page W2's alerts again (review)."""
    t = Takeovers()

    async def scenario() -> Counter[str]:
        w1 = await t.worker()
        await t.feed(w1, 0, t.cut)
        await w1.save_all("periodic")
        await t.feed(w1, t.cut, t.cut + 5)  # changed since: its revoke would write
        w2 = await t.worker()  # W1 was dropped from the group while it stalled
        await t.feed(w2, t.cut)  # pages
        await w2.save_all("periodic")
        await w1.revoked([t.tp])  # W1 wakes up and learns it is out
        w3 = runtime(t.broker, t.k, t.k.usage_topic, Engine.default)
        (resume,) = (await w3.assigned([t.tp])).values()  # W2 is gone; W3 takes over
        await t.feed(w3, resume)
        return t.published()

    published = asyncio.run(scenario())
    assert published and max(published.values()) == 1, {i: n for i, n in published.items() if n > 1}
