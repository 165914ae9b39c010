"""The usage consumer: an aiokafka consumer group read in batches, inside the Faust app.

Faust hosts the worker (producer, topic declaration, timers, web server, signals, shutdown), but
its own consumer stays off (:class:`NoFaustConsumer`): Faust hands a stream one message at a
time through its conductor and a consumer thread, about 80 µs a message, which capped a worker
at ~11,000 events/s. Here ``getmany`` returns up to :data:`MAX_BATCH` records per call, and
the :class:`~detector.worker.app.Runtime` of each source topic (usage, and by-team when the
worker repartitions) runs them straight through its engines, so the worker costs about what
decoding and detection cost. With the repartition, this service also owns the idempotent
producer that forwards the usage runtime's packs to the by-team topic.

The group is ``kafka.group_id``, subscribed to both topics; partitions are assigned by
aiokafka's default (range) assignor, and the rebalance listener hands revocations and
assignments to the runtimes, which snapshot what they give up and restore what they get; the
consumer then seeks each partition to the offset after its snapshot. Offsets are committed
about once a second, only up to events whose alerts were delivered; they serve lag monitoring,
since a partition resumes from its snapshot, not from the committed offset.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import mode
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition  # type: ignore[import-untyped]
from aiokafka.errors import ConsumerStoppedError, KafkaError  # type: ignore[import-untyped]
from faust.app.base import BootStrategy

from detector.worker.align import to_pause
from detector.worker.snapshots import client_options

if TYPE_CHECKING:
    from detector.worker.app import Runtime

log = logging.getLogger("stormwatch.worker")

MAX_BATCH = 5000  # records per getmany: bounds the time the runtime's lock is held (~50 ms)
POLL_MS = 100  # how long getmany waits for records before the loop looks around
COMMIT_EVERY_SECONDS = 1.0
FORWARD_BATCH_BYTES = 1_000_000  # under the broker's default message.max.bytes (1,048,588): several packs a batch


class NoFaustConsumer(BootStrategy):
    """Start Faust without its consumer, conductor and tables: :class:`UsageConsumer` reads the usage topic."""

    enable_kafka_consumer = False


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, owner: UsageConsumer) -> None:
        self.owner = owner

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        revoked = list(revoked)
        for runtime in self.owner.runtimes.values():
            await runtime.revoked(revoked)
        await self.owner.commit()

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        assigned = list(assigned)
        self.owner.runtime.paused.clear()  # a new assignment starts unpaused
        for runtime in self.owner.runtimes.values():
            resume_at = await runtime.assigned(assigned)
            for tp, offset in resume_at.items():
                self.owner.consumer.seek(tp, offset)
            runtime.seek = self.owner.consumer.seek


class UsageConsumer(mode.Service):
    """Reads the usage topic in batches and feeds the runtime; saves and leaves the group on stop."""

    def __init__(self, runtimes: Sequence[Runtime], declare: Callable[[], Awaitable[None]], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.runtimes = {r.topic: r for r in runtimes}  # by source topic
        self.runtime = runtimes[0]  # of the usage topic
        self.declare = declare
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None  # forwards usage events to the by-team topic
        # What forward() hands the producer, in order: (key, value, headers, partition, future of the delivery).
        self._outbox: asyncio.Queue[tuple[bytes | None, bytes, list[tuple[str, bytes]], int | None, Any]] = (
            asyncio.Queue()
        )
        self._loop_done = asyncio.Event()
        self._committed: dict[TopicPartition, int] = {}
        self._last_commit = 0.0

    @property
    def consumer(self) -> AIOKafkaConsumer:
        assert self._consumer is not None, "UsageConsumer not started"
        return self._consumer

    async def on_start(self) -> None:
        k = self.runtime.k
        await self.declare()  # usage, by-team, alerts, dead-letter, breakers and state topics, when missing
        self._consumer = AIOKafkaConsumer(
            group_id=k.group_id,
            client_id=f"{k.group_id}-usage",
            enable_auto_commit=False,
            auto_offset_reset=k.auto_offset_reset,
            session_timeout_ms=int(k.session_timeout_seconds * 1000),
            heartbeat_interval_ms=int(min(3.0, k.session_timeout_seconds / 3) * 1000),
            max_poll_records=MAX_BATCH,
            **client_options(k),
        )
        self._consumer.subscribe(list(self.runtimes), listener=_Rebalance(self))
        if k.repartition_by_team:
            self._producer = AIOKafkaProducer(
                client_id=f"{k.group_id}-by-team",
                acks="all",
                enable_idempotence=True,  # forwards of one usage partition stay in order: repeats are told by offset
                linger_ms=5,
                max_batch_size=FORWARD_BATCH_BYTES,
                **client_options(k),
            )
            await self._producer.start()
            self.runtime.forward = self.forward
            self.runtime.fanout = sorted(await self._producer.partitions_for(k.by_team_topic))
            self.runtime.sources_total = len(await self._producer.partitions_for(k.usage_topic))
        await self._consumer.start()
        log.info(
            "stormwatch: %s -> %s (dead letters: %s, state: %s), group %s, brokers %s",
            k.usage_topic,
            k.alerts_topic,
            k.dlq_topic,
            k.state_topic,
            k.group_id,
            k.bootstrap_servers,
        )

    async def forward(
        self, key: bytes | None, value: bytes, headers: list[tuple[str, bytes]], partition: int | None
    ) -> Awaitable[Any]:
        """Queue one record for the by-team topic; returns an awaitable of its delivery.

        The producer takes one batch per partition at a time and makes the next ``send`` wait for a
        round trip; :meth:`_forwarder` sends in the background, so the next batch is judged meanwhile.
        The runtime awaits the deliveries before its offsets move (``Runtime.settle``).
        """
        queued = asyncio.get_running_loop().create_future()
        self._outbox.put_nowait((key, value, headers, partition, queued))
        return self._delivered(queued)

    @staticmethod
    async def _delivered(queued: asyncio.Future[Awaitable[Any]]) -> Any:
        return await (await queued)

    @mode.Service.task
    async def _forwarder(self) -> None:
        topic = self.runtime.k.by_team_topic
        # Not `while not self.should_stop`: the last batch and the shutdown snapshot (on_stop) wait for
        # their forwards, so this runs until the service cancels its tasks, after on_stop.
        while True:
            key, value, headers, partition, queued = await self._outbox.get()
            assert self._producer is not None
            try:
                queued.set_result(await self._producer.send(topic, value, key, partition, headers=headers))
            except Exception as error:  # the runtime's settle raises it
                queued.set_exception(error)

    @mode.Service.task
    async def _consume(self) -> None:
        try:
            while not self.should_stop:
                try:
                    batches = await self.consumer.getmany(timeout_ms=POLL_MS, max_records=MAX_BATCH)
                except ConsumerStoppedError:
                    return
                self._alive()
                for topic, runtime in self.runtimes.items():
                    mine = {tp: records for tp, records in batches.items() if tp.topic == topic}
                    if mine:
                        # Shielded: a stop must not cut a batch between the engines and the alert deliveries.
                        await asyncio.shield(runtime.process(mine))
                self._align()
                if time.monotonic() - self._last_commit >= COMMIT_EVERY_SECONDS:
                    await self.commit()
        finally:
            self._loop_done.set()

    @property
    def _by_team(self) -> Runtime | None:
        """The runtime of the by-team partitions (None when the worker does not repartition)."""
        k = self.runtime.k
        return self.runtimes.get(k.by_team_topic) if k.repartition_by_team else None

    def _alive(self) -> None:
        """Tell the by-team partitions which usage partitions this worker reads and is behind on.

        A usage partition is taken for silent after ``align_wait_seconds`` without a mark; on a busy
        or starved machine a partition merely behind can go that long between batches, and its
        events would then come late. One with records left to fetch is not silent.
        """
        k, by_team = self.runtime.k, self._by_team
        if by_team is None:
            return
        ends = {
            tp.partition: self.consumer.highwater(tp) for tp in self.consumer.assignment() if tp.topic == k.usage_topic
        }
        if behind := self.runtime.behind(ends):
            by_team.alive(behind, time.monotonic())

    def _align(self) -> None:
        """Pause the usage partitions that run ahead in event time while the by-team stage holds many events.

        While a backlog drains, a partition with fewer events gets through the day faster than one
        with more, and the by-team partitions hold its events until the slowest has caught up
        (:mod:`detector.worker.align`). Rather than hold ever more (and at last let them go late),
        the partitions ahead wait at the broker, as Flink's watermark alignment does; the slowest
        is never paused. Live traffic holds a fraction of a second of events and never pauses.
        """
        k, by_team = self.runtime.k, self._by_team
        if by_team is None:
            return
        wall = time.monotonic()
        held, low = by_team.alignment(wall)
        mine = self.consumer.assignment()
        marks = {tp: mark for tp, mark in self.runtime.watermarks().items() if tp in mine}
        paused = {TopicPartition(k.usage_topic, n) for n in self.runtime.paused}
        ahead = to_pause(held, low, marks, paused, k.align_max_held_events)
        if paused - ahead:
            self.consumer.resume(*(paused - ahead))
            self.runtime.resumed(paused - ahead, wall)
        if ahead - paused:
            self.consumer.pause(*(ahead - paused))
            self.runtime.stats.pauses += len(ahead - paused)
            self.runtime.paused.update(tp.partition for tp in ahead - paused)

    async def commit(self) -> None:
        """Commit the delivered positions that moved (best effort: a rebalance may refuse it); report lag."""
        self._last_commit = time.monotonic()
        assignment = self.consumer.assignment()
        positions = [item for r in self.runtimes.values() for item in r.positions().items()]
        metrics = self.runtime.feed.metrics if self.runtime.feed is not None else None
        if metrics is not None:
            done = dict(positions)
            for tp in assignment:
                end = self.consumer.highwater(tp)
                if end is not None:
                    metrics.set_consumer_lag(tp.topic, tp.partition, max(0, end - done.get(tp, 0)))
        moved = {tp: o for tp, o in positions if tp in assignment and self._committed.get(tp) != o}
        if not moved:
            return
        try:
            await self.consumer.commit(moved)
        except (KafkaError, AssertionError) as error:
            log.info("stormwatch: commit refused (%s); the next one will catch up", type(error).__name__)
            return
        self._committed.update(moved)

    async def on_stop(self) -> None:
        try:
            if self._consumer is not None:
                try:
                    await asyncio.wait_for(self._loop_done.wait(), timeout=30)
                except TimeoutError:
                    log.warning("stormwatch: the consume loop did not finish its batch in 30 s")
                for runtime in self.runtimes.values():
                    await runtime.save_all("shutdown")
                await self.commit()
                await self._consumer.stop()
            if self._producer is not None:
                await self._producer.stop()
        finally:
            log.info("stormwatch: stopping: %s", " | by team: ".join(r.summary() for r in self.runtimes.values()))
            for runtime in self.runtimes.values():
                await runtime.reader.stop()
