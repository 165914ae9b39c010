"""The Kafka shell: usage events from a topic through one engine per partition, alerts to a topic.

:func:`create_app` wires one Faust app per call (no module-level app, so tests and the CLI
build their own). Faust hosts the worker: producer, topic declaration, timers, web server and
shutdown; the usage topic is read in batches by :class:`~detector.worker.consumer.UsageConsumer`
(aiokafka, consumer group ``kafka.group_id``), which hands them to the :class:`Runtime`; the
runtime passes each message to the :class:`UsageHandler` of its partition (validation, the
engine, counters: no Faust, no I/O) and publishes what comes back:

* a valid event goes through the :class:`~detector.engine.Engine` of its usage partition; every
  alert it returns goes to the alerts topic, keyed by ``incident_id``, with the headers
  ``stormwatch-source-topic``, ``-partition`` and ``-offset`` (the event that raised it);
* a message that is not JSON or breaks the contract goes to the dead-letter topic with its
  original bytes and key, and the headers ``stormwatch-reason`` (what is wrong, one line) and
  the same source headers. The worker goes on.

**One engine per usage partition.** Producers key events by API key, so a key's events stay in
one partition and reach one engine in order; each partition has its own event time, idle clock
and snapshot, so partitions move between workers independently. Events, idle ticks, snapshots
and rebalances take turns under one lock.
**Repartition by team** (``kafka.repartition_by_team``, on by default). The engines of usage
partitions judge keys, agents and sessions only; each batch's valid events are forwarded to the
by-team topic (``<usage topic>.by-team``), keyed by team, in packs (:mod:`detector.worker.packs`),
where the by-team partitions' engines make the team-level judgements (``budget_burn``, team cost
spikes) over the whole team. The incidents are booked there too: a usage partition's engine
hands its findings about keys, agents and sessions to the by-team partition of their team
(:mod:`detector.worker.handoff`), whose book folds them with the team's own, as one engine's
book does in a replay, so a key's spike and the team spike it causes page once, and every
alert comes from the by-team partitions. Both topics are read by the same consumer group, and each by-team
partition has its engine, snapshot and restore like a usage partition; the usage offsets inside
the packs let it drop what a restored usage partition forwards again. Usage partitions do not
move in step (while a backlog drains, one may be hours of event time ahead of another), so each
by-team partition holds events in an :class:`~detector.worker.align.Aligner` until every live
usage partition's watermark (on marks sent after each batch) has passed them, and judges them in
event-time order; the held events are snapshotted with the engine.

**Durable state.** Every ``kafka.snapshot_every_seconds`` (wall clock), when partitions are
revoked and on graceful shutdown, each partition whose engine changed is written to the
compacted ``kafka.state_topic`` (key ``<usage topic>:<partition>``; format in
:mod:`detector.worker.snapshots`) with the offset of the last event it includes, taken only
after that event's alerts were delivered. The first event of a partition that has no snapshot
is preceded by a snapshot of its empty engine, so a processed partition always has one.
On assignment the worker reads the newest snapshot of each newly assigned partition, restores
its engine (``restored partition N from snapshot at offset X``) and seeks the consumer to
offset X+1, whatever the group had committed. The events in between are processed again; their alerts
that the previous owner already published (found on the alerts topic after the end offsets
recorded in the snapshot, by the source headers) are not published again.

**Guarantee**, per usage partition, whether a worker stops gracefully or is killed (kill -9):

* no event is lost to the engine and nothing learned is lost: every event after a snapshot's
  offset is applied exactly once to the engine restored from it (events are *delivered* at
  least once; a redelivered offset the engine already holds is skipped);
* every alert is published at least once (before its event counts as processed) and at most
  once per ``alert_id`` (ids are content-derived, so re-processing the same events from the
  same state gives the same ids). Alerts raised by the idle clock depend on the wall clock and
  need not repeat on re-processing, so the partition is snapshotted right after publishing
  them: a crash inside that one write may still give a second record.

Not covered: dead letters are at least once (a crash may re-send a few); a worker that lost its
partitions without knowing it yet (a long pause) may publish what the new owner publishes too
(no fencing: that needs Kafka transactions). A restored engine keeps what it learned and takes
the detector parameters of the settings it is restored with (:meth:`Engine.adopt`).
Events, idle ticks, snapshots and rebalances take turns under one lock; a batch holds it for at
most :data:`~detector.worker.consumer.MAX_BATCH` events.

A one-second timer advances event time with the wall clock once a partition has been quiet
for ``kafka.idle_advance_after_seconds`` (see :mod:`detector.worker.clock`): due alerts still
come out and incidents still resolve when traffic stops. Another timer logs a one-line
summary every ``kafka.summary_every_seconds``.

>>> handler = UsageHandler(Engine.default(), IdleClock(after=3.0))
>>> handler.handle(b'{"event_id": oops', wall=0.0)
Rejected(reason='not valid JSON: expected value at line 1 column 14')
>>> handler.handle(b'{"event_id":"e1","timestamp":"2026-11-02T09:30:00Z","team":"t","api_key_id":"k",'
...                b'"provider":"openai","model":"gpt-4o","operation":"chat","input_tokens":-1,'
...                b'"output_tokens":5,"status":"ok"}', wall=0.0)
Rejected(reason='input_tokens: Input should be greater than or equal to 0')
>>> handler.summary()
'events=0 rejected=2 alerts=0 idle_advances=0 late=0 watermark=-'
"""

from __future__ import annotations

import asyncio
import logging
import math
import pickle
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

import faust
from aiokafka import TopicPartition  # type: ignore[import-untyped]
from pydantic import ValidationError

from detector.engine import MAX_CLOCK_SKEW, Engine, OutOfTime
from detector.events import Alert, Usage, utc_from_epoch
from detector.replay import explain
from detector.settings import Settings
from detector.web import Feed, LiveView, Metrics
from detector.wire import decode_usage, encode_usage
from detector.worker import handoff
from detector.worker.align import MARK_EVERY_SECONDS, Aligner
from detector.worker.clock import IdleClock
from detector.worker.config import KafkaSettings
from detector.worker.consumer import NoFaustConsumer, UsageConsumer
from detector.worker.handoff import FINDINGS, Handed, by_team
from detector.worker.packs import packs_of, unpack
from detector.worker.snapshots import (
    RECORD_HEADER,
    SOURCE_OFFSET_HEADER,
    SOURCE_PARTITION_HEADER,
    SOURCE_TOPIC_HEADER,
    Snapshot,
    StateReader,
    ssl_context,
    state_key,
)
from detector.worker.web import WorkerWeb

log = logging.getLogger("stormwatch.worker")

__all__ = [
    "REASON_HEADER",
    "SOURCE_OFFSET_HEADER",
    "SOURCE_PARTITION_HEADER",
    "SOURCE_TOPIC_HEADER",
    "Partition",
    "Rejected",
    "Runtime",
    "UsageHandler",
    "WorkerStats",
    "create_app",
    "run_worker",
]

REASON_HEADER = "stormwatch-reason"
WATERMARK_HEADER = "stormwatch-watermark"  # on packs and marks: the usage partition's event time
SOURCES_HEADER = "stormwatch-sources"  # on packs and marks: how many usage partitions there are
MARK = b"watermark"  # RECORD_HEADER of a mark: a watermark with no events
# (key, value, headers, partition): sends one record to the by-team topic; returns its delivery.
Forward = Callable[[bytes | None, bytes, list[tuple[str, bytes]], int | None], Awaitable[Awaitable[Any]]]
IDLE_TICK_SECONDS = 1.0
PACK_BYTES = 256 * 1024  # a by-team record: several fit one producer batch (FORWARD_BATCH_BYTES)
STATE_SEGMENT_MS = 10 * 60 * 1000  # roll state segments often, so compaction can drop old snapshots


_N = TypeVar("_N", int, float)


def _pack_source(headers: Mapping[str, bytes], key: bytes | None, mark: bool) -> tuple[int, float, int]:
    """A by-team record's usage partition, its watermark and how many usage partitions there are.

    The by-team topic is input like any other (anyone may produce to it), so headers that are
    not ours raise ValueError saying what is wrong, for the dead letter: never a crash loop.
    """
    source = headers.get(SOURCE_PARTITION_HEADER)
    if source is None:
        raise ValueError(f"no {SOURCE_PARTITION_HEADER} header")
    if key is None and not mark:
        raise ValueError("no key (the team)")
    return (
        _parse(SOURCE_PARTITION_HEADER, source, int, "a partition", lambda n: n >= 0),
        _parse(WATERMARK_HEADER, headers.get(WATERMARK_HEADER, b"-inf"), float, "an event time", lambda t: t == t),
        _parse(SOURCES_HEADER, headers.get(SOURCES_HEADER, b"0"), int, "a partition count", lambda n: n >= 0),
    )


def _parse(name: str, raw: bytes, parse: Callable[[bytes], _N], what: str, ok: Callable[[_N], bool]) -> _N:
    try:
        value = parse(raw)
    except ValueError:
        raise ValueError(f"{name} {raw!r} is not {what}") from None
    if not ok(value):
        raise ValueError(f"{name} {raw!r} is not {what}")
    return value


@dataclass(frozen=True, slots=True)
class Rejected:
    reason: str


@dataclass
class WorkerStats:
    events: int = 0
    rejected: int = 0
    alerts: int = 0
    idle_advances: int = 0
    suppressed: int = 0  # alerts not published again: a previous owner of the partition had
    duplicates: int = 0  # forwarded events dropped: already in the engine
    pauses: int = 0  # usage partitions paused because they ran ahead of the by-team stage (detector.worker.align)
    alerts_by_kind: Counter[tuple[str, str]] = field(default_factory=Counter)


class UsageHandler:
    """Raw message bytes in, alerts or a reject reason out. All the worker's logic, none of its I/O.

    ``stats`` may be shared by the handlers of several partitions (the process's counters).
    """

    def __init__(self, engine: Engine, clock: IdleClock, stats: WorkerStats | None = None) -> None:
        self.engine = engine
        self.clock = clock
        self.stats = stats if stats is not None else WorkerStats()

    def handle(self, raw: bytes | None, wall: float) -> list[Alert] | Rejected:
        ev = self.decode(raw)
        if isinstance(ev, Rejected):
            return ev
        self.clock.saw_event(wall)
        return self.judge(ev)

    def decode(self, raw: bytes | None) -> Usage | Rejected:
        if raw is None:
            self.stats.rejected += 1
            return Rejected("empty message (null value)")
        try:
            return decode_usage(raw)
        except ValidationError as error:
            self.stats.rejected += 1
            return Rejected(explain(error))

    def apply_all(self, items: Iterable[Usage | Handed], wall: float) -> Iterator[tuple[Usage, list[Alert] | Rejected]]:
        """Events and handed findings through the engine in order; yields events that raised alerts or made it fail.

        Only events tell the idle clock the stream is live: findings handed over, or nothing at all,
        must not keep it from running event time on over a quiet stream.
        """
        judge, receive, live = self.judge, self.engine.receive, False
        for item in items:
            if isinstance(item, Handed):
                receive(item.at, item.findings)  # booked at the engine's tick of item.at
                continue
            if not live:
                self.clock.saw_event(wall)
                live = True
            if result := judge(item):
                yield item, result

    def judge(self, ev: Usage) -> list[Alert] | Rejected:
        """One valid event through the engine, without telling the idle clock (the caller tells it once a batch)."""
        try:
            alerts = self.engine.process(ev)
        except OutOfTime as error:  # dated before 2000 or past the clock: bad input, not a bug
            self.stats.rejected += 1
            return Rejected(str(error))
        except Exception as error:  # a bug must not stop the stream; the event is kept in the DLQ
            log.exception("engine failed on event %s", ev.event_id)
            self.stats.rejected += 1
            return Rejected(f"engine error: {type(error).__name__}: {error}")
        self.stats.events += 1
        return self._count(alerts) if alerts else alerts

    def advance(self, now: float) -> list[Alert]:
        """Event time on to ``now`` without an event (what every source of a by-team partition has passed)."""
        return self._count(self.engine.advance(now))

    def idle_tick(self, wall: float) -> list[Alert] | None:
        """Advance event time over a quiet stream (see :mod:`detector.worker.clock`); None: not due."""
        now = self.clock.due(self.engine.stats.watermark, wall)
        if now is None:
            return None
        self.stats.idle_advances += 1
        return self._count(self.engine.advance(now))

    def _count(self, alerts: list[Alert]) -> list[Alert]:
        for a in alerts:
            self.stats.alerts += 1
            self.stats.alerts_by_kind[(a.kind.value, a.status.value)] += 1
        return alerts

    def summary(self) -> str:
        return summary_line(self.stats, [self.engine])


def summary_line(s: WorkerStats, engines: Iterable[Engine]) -> str:
    engines = list(engines)
    late = sum(e.stats.late_events for e in engines)
    watermark = max((e.stats.watermark for e in engines), default=-math.inf)
    mark = utc_from_epoch(watermark).isoformat() if watermark > -math.inf else "-"
    kinds = "".join(f" {k}.{st}={n}" for (k, st), n in sorted(s.alerts_by_kind.items()))
    suppressed = f" suppressed={s.suppressed}" if s.suppressed else ""
    pauses = f" pauses={s.pauses}" if s.pauses else ""
    return (
        f"events={s.events} rejected={s.rejected} alerts={s.alerts}{kinds} "
        f"idle_advances={s.idle_advances}{suppressed}{pauses} late={late} watermark={mark}"
    )


@dataclass
class Partition:
    """One usage partition this worker owns: its handler (engine), where it is, what was saved."""

    number: int
    handler: UsageHandler
    offset: int = -1  # the last usage offset the engine includes (-1: none)
    acked: int = -1  # the last offset whose alerts and forwards were delivered (what the group may commit)
    saved_offset: int | None = None  # offset of the last snapshot written or restored (None: none yet)
    dirty: bool = False  # changed since the last snapshot
    published: set[str] = field(default_factory=set)  # alert ids a previous owner already published
    resumed: bool = False  # the first message since assignment was seen
    reseeks: int = 0  # times the consumer was sent back to offset + 1 since assignment
    sources: dict[str, int] = field(default_factory=dict)  # by-team: "<usage partition>:<team>" -> last offset
    aligner: Aligner[Usage | Handed] | None = None  # by-team: events (and findings) waiting for slower partitions
    marked_at: float = -math.inf  # usage, repartitioning: wall clock of the last marks sent

    def fresh_alerts(self, alerts: Sequence[Alert]) -> list[Alert]:
        """``alerts`` without those already published by a previous owner of the partition.

        Each id is held back once, then forgotten: an alert id is raised once, so what is left in
        :attr:`published` is what re-processing has yet to reach (and goes into the snapshot).
        """
        if not self.published:
            return list(alerts)
        fresh = [a for a in alerts if a.alert_id not in self.published]
        if len(fresh) < len(alerts):
            self.published.difference_update(a.alert_id for a in alerts)
        return fresh


def dlq_headers(reason: str, topic: str, partition: int, offset: int) -> list[tuple[str, bytes]]:
    return [(REASON_HEADER, reason.encode()), *source_headers(topic, partition, offset)]


def source_headers(topic: str, partition: int, offset: int) -> list[tuple[str, bytes]]:
    return [
        (SOURCE_TOPIC_HEADER, topic.encode()),
        (SOURCE_PARTITION_HEADER, str(partition).encode()),
        (SOURCE_OFFSET_HEADER, str(offset).encode()),
    ]


def broker_credentials(k: KafkaSettings) -> Any:
    """Faust credentials for the configured security protocol (None for PLAINTEXT)."""
    context = ssl_context(k)
    if k.security_protocol == "SSL":
        return faust.SSLCredentials(context)
    if k.security_protocol in ("SASL_PLAINTEXT", "SASL_SSL"):
        assert k.sasl_password is not None  # checked by KafkaSettings
        return faust.SASLCredentials(
            username=k.sasl_username,
            password=k.sasl_password.get_secret_value(),
            mechanism=k.sasl_mechanism,
            ssl_context=context,
        )
    return None


class Runtime:
    """The partitions this worker owns and everything done to them: batches, snapshots, restores, publishing.

    Its coroutines take turns under one lock; the consumer calls :meth:`process`, :meth:`revoked`
    and :meth:`assigned`, the timers :meth:`idle_tick` and :meth:`save_all`.
    """

    def __init__(
        self,
        k: KafkaSettings,
        topic: str,
        topics: WorkerTopics,
        make_engine: Callable[[], Engine],
        reader: StateReader,
        forward: Forward | None = None,
        forwarded: bool = False,
        feed: Feed | None = None,
    ) -> None:
        self.k = k
        self.topic = topic  # the source topic: usage, or by-team
        self.forward = forward  # usage events on to the by-team topic
        self.forwarded = forwarded  # the source is the by-team topic: drop what was forwarded twice
        self.label = "by-team " if forwarded else ""  # in log lines
        self.feed = feed  # the dashboard's view and metrics, when the worker serves them
        self.restored = False  # the first assignment was taken (for /readyz)
        self.topics = topics
        self.make_engine = make_engine
        self.reader = reader
        self.stats = WorkerStats()
        self.parts: dict[int, Partition] = {}
        self.lock = asyncio.Lock()
        self._state_partitions: list[int] = []  # of the state topic, known once the reader started
        self.seek: Callable[[TopicPartition, int], None] | None = None  # the consumer's, set on assignment
        self.fanout: list[int] = []  # usage runtime: the by-team partitions, to send marks to (set on start)
        self.sources_total = 0  # usage runtime: how many usage partitions there are (set on start)
        self.paused: set[int] = set()  # usage runtime: partitions paused, ahead of the by-team stage (consumer._align)
        self._unsettled: Awaitable[Any] | None = None  # the last batch's deliveries (see settle)
        self._unsettled_moved: list[tuple[Partition, int]] = []

    def new_partition(
        self, number: int, engine: Engine | None = None, aligner: Aligner[Usage | Handed] | None = None
    ) -> Partition:
        idle = self.k.idle_advance_after_seconds
        part = Partition(number, UsageHandler(engine or self.make_engine(), IdleClock(idle), self.stats))
        if self.forwarded:
            part.aligner = aligner or Aligner(0, self.k.align_wait_seconds, max_held=self.k.align_max_held_events)
        return part

    def summary(self) -> str:
        parts = self.parts
        where = ",".join(f"{n}@{parts[n].offset}" for n in sorted(parts))  # the last offset each engine holds
        line = f"{summary_line(self.stats, (p.handler.engine for p in parts.values()))} partitions={where or '-'}"
        if not self.forwarded:
            return line
        held = sum(len(p.aligner) for p in parts.values() if p.aligner is not None)
        forced = sum(p.aligner.forced for p in parts.values() if p.aligner is not None)
        return f"{line} duplicates={self.stats.duplicates} held={held} forced={forced}"

    async def reader_ready(self) -> StateReader:
        if not self._state_partitions:
            await self.reader.start()
            await self.topics.state.maybe_declare()
            self._state_partitions.extend(tp.partition for tp in await self.reader.partitions(self.k.state_topic))
        return self.reader

    def state_tp(self, number: int) -> TopicPartition:
        return TopicPartition(self.k.state_topic, self._state_partitions[number % len(self._state_partitions)])

    async def settle(self) -> None:
        """Wait for the last batch's alerts, dead letters and forwards to be delivered (under the lock).

        :meth:`process` does not wait for its own deliveries: the next batch is judged while they
        travel, and they are awaited before that batch is, before any snapshot and before offsets
        are committed, so neither ever covers an undelivered alert.
        """
        if self._unsettled is not None:
            unsettled, self._unsettled = self._unsettled, None
            await unsettled
        for part, offset in self._unsettled_moved:
            part.acked = offset
        self._unsettled_moved = []

    async def save(self, batch: Sequence[Partition]) -> int:
        """Write the partitions' engines to the state topic (under the lock); returns the bytes written."""
        await self.settle()  # a snapshot's offset covers only delivered alerts
        k, reader = self.k, await self.reader_ready()
        alerts_end = await reader.end_offsets(k.alerts_topic)  # every alert raised so far was delivered
        pending, size = [], 0
        for part in batch:
            engine = part.handler.engine.snapshot()
            held = pickle.dumps(part.aligner, protocol=pickle.HIGHEST_PROTOCOL) if part.aligner is not None else b""
            blob = Snapshot(
                self.topic, part.number, part.offset, alerts_end, engine, part.sources, held, frozenset(part.published)
            ).encode()
            size += len(blob)
            key = state_key(self.topic, part.number).encode()
            target = self.state_tp(part.number).partition
            pending.append(await self.topics.state.send(key=key, value=blob, partition=target))
        await asyncio.gather(*pending)  # one round trip for the lot
        metrics = self.feed.metrics if self.feed is not None and not self.forwarded else None
        for part in batch:
            part.saved_offset, part.dirty = part.offset, False
            if metrics is not None:
                metrics.mark_snapshot(part.number, time.time(), size // len(batch))
        return size

    async def save_all(self, why: str) -> None:
        """Snapshot every changed partition, one log line for the round.

        One partition at a time, each under the lock: pickling a big engine takes tens of
        milliseconds, and batches of the other partitions go on in between rather than wait for
        the whole round (8 partitions of a 1,000-key fleet held them up ~0.3 s).
        """
        t0 = time.perf_counter()
        saved, size = [], 0
        for number in sorted(self.parts):
            async with self.lock:
                part = self.parts.get(number)
                if part is None or not part.dirty:
                    continue
                size += await self.save([part])
                saved.append(f"{part.number}@{part.offset}")
        if saved:
            log.info(
                "stormwatch: snapshot (%s) of %spartitions %s: %d bytes in %.3f s",
                why,
                self.label,
                " ".join(saved),
                size,
                time.perf_counter() - t0,
            )

    async def restore(self, numbers: Sequence[int]) -> None:
        """Engines for newly assigned partitions: from their newest snapshot, or new (under the lock)."""
        k, reader = self.k, await self.reader_ready()
        by_state: dict[TopicPartition, list[str]] = {}
        for n in numbers:
            by_state.setdefault(self.state_tp(n), []).append(state_key(self.topic, n))
        snaps = await reader.latest(by_state) if by_state else {}
        for n in numbers:
            snap = snaps.get(state_key(self.topic, n))
            if snap is None:
                self.parts[n] = self.new_partition(n)
                log.info("stormwatch: %spartition %d has no snapshot: a new engine", self.label, n)
                continue
            aligner: Aligner[Usage | Handed] | None = None
            try:
                restored, engine = Engine.restore(snap.engine), self.make_engine()
                if changed := engine.differences(restored):
                    log.info(
                        "stormwatch: %spartition %d judges by settings changed since its snapshot: %s",
                        self.label,
                        n,
                        "; ".join(changed),
                    )
                engine.adopt(restored)
                if snap.held:
                    aligner = pickle.loads(snap.held)
                    assert aligner is not None
                    aligner.restarted(time.monotonic())
            except Exception:  # an unreadable snapshot must not stop the worker: start afresh after it
                log.exception("stormwatch: snapshot of partition %d at offset %d unreadable", n, snap.offset)
                engine, aligner = self.make_engine(), None
            part = self.parts[n] = self.new_partition(n, engine, aligner)
            part.offset = part.saved_offset = part.acked = snap.offset
            part.sources = dict(snap.sources)
            # What the owners before published beyond the snapshot's offset: those after the snapshot was
            # written, and those a previous restorer still held back when it wrote it.
            since = await reader.published_since(k.alerts_topic, snap.alerts_end, (self.topic, n))
            part.published = set(snap.published) | since
            log.info(
                "stormwatch: restored %spartition %d from snapshot at offset %d (%d events learned, %d bytes; "
                "%d alerts published since)",
                self.label,
                n,
                snap.offset,
                engine.stats.events,
                len(snap.engine),
                len(part.published),
            )

    async def publish(self, part: Partition, alerts: Sequence[Alert], offset: int) -> list[Awaitable[Any]]:
        """Send the alerts a previous owner did not already publish; returns the deliveries to await."""
        fresh = part.fresh_alerts(alerts)
        if len(fresh) < len(alerts):
            self.stats.suppressed += len(alerts) - len(fresh)
            log.info(
                "stormwatch: partition %d: not publishing again %s",
                part.number,
                " ".join(f"{a.kind.value}.{a.status.value}:{a.alert_id}" for a in alerts if a not in fresh),
            )
        headers = source_headers(self.topic, part.number, offset)
        if self.feed is not None:
            for a in alerts:
                self.feed.observe_alert(a)
        send = self.topics.alerts.send
        return [
            await send(key=a.incident_id.encode(), value=a.model_dump_json().encode(), headers=headers) for a in fresh
        ]

    async def dead_letter(
        self, key: bytes | None, value: bytes | None, topic: str, partition: int, offset: int, reason: str
    ) -> Awaitable[Any]:
        log.warning("rejected %s[%d]@%d: %s", topic, partition, offset, reason[:300])
        if self.feed is not None:
            self.feed.observe_reject(reason)
        headers = dlq_headers(reason, topic, partition, offset)
        return await self.topics.dlq.send(key=key, value=value, headers=headers)

    async def process(self, batches: Mapping[TopicPartition, Sequence[Any]]) -> int:
        """One fetched batch per partition through its engine; returns the events handled.

        Alerts, dead letters and forwards of the whole batch are sent together, and awaited (see
        :meth:`settle`) before the next batch, a snapshot or a commit.
        """
        handled = 0
        async with self.lock:
            await self.settle()
            wall = time.monotonic()
            pending: list[Awaitable[Any]] = []
            moved: list[tuple[Partition, int]] = []
            for tp, records in batches.items():
                part = self.parts.get(tp.partition)
                if part is None:
                    continue  # not ours any more
                fresh = [r for r in records if r.offset > part.offset]  # a redelivered offset is in the engine
                if not fresh:
                    continue
                first = fresh[0].offset
                if not part.resumed:
                    if part.saved_offset is not None and first > part.offset + 1 and self.seek and part.reseeks < 3:
                        # aiokafka may reset a just-assigned partition to the group's committed offset after
                        # the listener's seek (a race in its position refresh): go back to the snapshot's.
                        log.info(
                            "stormwatch: partition %d fetched from offset %d, seeking back to %d",
                            part.number,
                            first,
                            part.offset + 1,
                        )
                        self.seek(tp, part.offset + 1)
                        part.reseeks += 1  # should it keep failing, say so below
                        continue
                    part.resumed = True
                    if part.saved_offset is not None and first > part.offset + 1:
                        log.warning(
                            "stormwatch: partition %d resumes at offset %d, not %d: events in between not seen",
                            part.number,
                            first,
                            part.offset + 1,
                        )
                if part.saved_offset is None:  # first event of a partition never saved: save the empty engine
                    part.offset = part.acked = first - 1
                    await self.save([part])
                if self.forwarded:
                    for r in fresh:
                        handled += await self._unpack(part, r, wall, pending)
                    await self._release(part, wall, pending, fresh[-1].offset)
                else:
                    handled += await self._handle(part, fresh, wall, pending)
                moved.append((part, fresh[-1].offset))
            for part, offset in moved:
                part.offset, part.dirty = offset, True
            self._unsettled = asyncio.gather(*pending) if pending else None
            self._unsettled_moved = moved
            metrics = self.feed.metrics if self.feed is not None else None
            if metrics is not None and handled:
                metrics.observe_latency((time.monotonic() - wall) / handled)  # per event, this batch's mean
                metrics.mark_event_seen(time.time())
        return handled

    async def _handle(self, part: Partition, records: Sequence[Any], wall: float, pending: list[Awaitable[Any]]) -> int:
        """Usage records through the partition's engine; valid events forwarded by team, in packs."""
        handler = part.handler
        before = handler.engine.stats.watermark  # what this partition had passed when the batch began
        packs: dict[str, list[tuple[int, bytes]]] = {}
        feed, forward, engine = self.feed, self.forward is not None, handler.engine
        decode, judge = handler.decode, handler.judge
        handler.clock.saw_event(wall)
        engine.horizon = time.time() + MAX_CLOCK_SKEW
        for r in records:
            ev = decode(r.value)
            result = ev if isinstance(ev, Rejected) else judge(ev)
            if isinstance(result, Rejected):
                pending.append(await self.dead_letter(r.key, r.value, r.topic, r.partition, r.offset, result.reason))
                continue
            ev = cast(Usage, ev)  # judged, so valid
            if feed is not None:
                feed.observe_event(ev, engine.last_cost)
            if result:
                pending.extend(await self.publish(part, result, r.offset))
            if forward:
                packs.setdefault(ev.team, []).append((r.offset, r.value))
        if self.forward is not None:
            # A pack may only claim what held before the batch: the batch's other packs, for other teams,
            # may reach the same by-team partition later (in a later fetch there).
            headers = self._forward_headers(part, records[-1].offset, before)
            for team, events in packs.items():
                for blob in packs_of(events, PACK_BYTES):
                    pending.append(await self.forward(team.encode(), blob, headers, None))
            await self._hand_over(part, headers, pending)
            if wall - part.marked_at >= MARK_EVERY_SECONDS:
                await self._mark(part, records[-1].offset, wall, pending)
        return len(records)

    async def _mark(self, part: Partition, offset: int, wall: float, pending: list[Awaitable[Any]]) -> None:
        """Tell every by-team partition how far this usage partition has got in event time.

        Sent after all the batch's packs and findings, by the same producer, so it reaches every
        by-team partition after them: there, this partition has now passed its event time.
        """
        passed = part.handler.engine.event_time
        if passed == -math.inf:
            return
        assert self.forward is not None, "only a repartitioning worker marks"
        part.marked_at = wall
        mark = [*self._forward_headers(part, offset, passed), (RECORD_HEADER, MARK)]
        for p in self.fanout:
            pending.append(await self.forward(None, b"", mark, p))

    def _forward_headers(self, part: Partition, offset: int, watermark: float) -> list[tuple[str, bytes]]:
        """Headers of what goes to the by-team topic: where from, how far in event time, of how many sources."""
        return [
            *source_headers(self.topic, part.number, offset),
            (WATERMARK_HEADER, repr(watermark).encode()),
            (SOURCES_HEADER, str(self.sources_total).encode()),
        ]

    async def _hand_over(
        self, part: Partition, headers: list[tuple[str, bytes]], pending: list[Awaitable[Any]]
    ) -> None:
        """The findings the partition's engine made since the last call, on to their teams' by-team partitions.

        ``headers`` are those of the batch's packs (source, watermark before the batch, sources):
        a tick's findings come before the events at or after its time, which the batch holds.
        """
        engine = part.handler.engine
        if not engine.handed:
            return
        assert self.forward is not None, "only the engines of a repartitioning worker hand findings over"
        findings = [*headers, (RECORD_HEADER, FINDINGS)]
        for team, ticks in by_team(engine.handed).items():
            for blob in handoff.records(ticks):
                pending.append(await self.forward(team.encode(), blob, findings, None))
        engine.handed = []

    async def _unpack(self, part: Partition, r: Any, wall: float, pending: list[Awaitable[Any]]) -> int:
        """One by-team pack (or mark) into the partition's aligner; returns the events new to it.

        The packs of one team from one usage partition arrive in order (one idempotent producer at
        a time), and each event carries its usage offset, so what a restored usage partition
        forwards again (offsets up to the last one seen from it for that team) is dropped.
        """
        headers = dict(r.headers)
        mark = headers.get(RECORD_HEADER) == MARK
        try:
            usage_partition, watermark, total = _pack_source(headers, r.key, mark)
        except ValueError as error:
            pending.append(
                await self.dead_letter(r.key, r.value, r.topic, r.partition, r.offset, f"not a pack: {error}")
            )
            return 0
        aligner = part.aligner
        assert aligner is not None
        if mark:
            aligner.heard(usage_partition, watermark, wall, total)
            return 0
        if headers.get(RECORD_HEADER) == FINDINGS:
            await self._take_findings(part, r, usage_partition, pending)
            aligner.heard(usage_partition, watermark, wall, total)
            return 0
        stream = f"{usage_partition}:{r.key.decode()}"  # packs of one team from one usage partition
        seen = part.sources.get(stream, -1)
        decode, new = part.handler.decode, 0
        held: list[tuple[float, Usage]] = []
        try:
            for offset, raw in unpack(r.value):
                if offset <= seen:
                    self.stats.duplicates += 1
                    continue
                seen, new = offset, new + 1
                ev = decode(raw)
                if isinstance(ev, Rejected):
                    where = (self.k.usage_topic, usage_partition, offset)
                    pending.append(await self.dead_letter(r.key, raw, *where, ev.reason))
                    continue
                held.append((ev.timestamp.timestamp(), ev))
        except ValueError as error:
            pending.append(await self.dead_letter(r.key, r.value, r.topic, r.partition, r.offset, str(error)))
        aligner.add_all(held)
        part.sources[stream] = seen
        aligner.heard(usage_partition, watermark, wall, total)
        return new

    async def _take_findings(
        self, part: Partition, r: Any, usage_partition: int, pending: list[Awaitable[Any]]
    ) -> None:
        """A usage partition's findings about one team into the aligner, but for those already taken."""
        assert part.aligner is not None
        stream = f"findings:{usage_partition}:{r.key.decode()}"  # "<digit>..." are the packs' streams
        seen = part.sources.get(stream, -1)  # handoff.position of the last finding taken
        try:
            items = handoff.decode(r.value)
        except ValidationError as error:
            reason = f"not a findings record: {explain(error)}"
            pending.append(await self.dead_letter(r.key, r.value, r.topic, r.partition, r.offset, reason))
            return
        new, part.sources[stream], dropped = handoff.fresh(items, seen)
        self.stats.duplicates += dropped
        for handed in new:
            part.aligner.add(handed.order, handed)

    async def _release(self, part: Partition, wall: float, pending: list[Awaitable[Any]], offset: int) -> None:
        """By-team: the events every live usage partition has passed, through the engine in event-time order.

        Then the engine's event time moves on to what they have all passed, even where its own teams
        had no events: their ticks come as in one engine over every event, neither waiting for the
        teams' next event nor run before a slower usage partition has handed in its findings.
        """
        assert part.aligner is not None
        due = part.aligner.release(wall)
        if due:
            part.dirty = True
        for item, result in part.handler.apply_all(due, wall):
            if isinstance(result, Rejected):  # the engine failed on it: keep it in the DLQ
                raw = encode_usage(item)
                pending.append(await self.dead_letter(None, raw, self.topic, part.number, offset, result.reason))
            elif result:
                pending.extend(await self.publish(part, result, offset))
        low = part.aligner.low(wall)
        if -math.inf < low < math.inf and low >= part.handler.engine.next_tick:
            part.dirty = True
            if alerts := part.handler.advance(low):
                pending.extend(await self.publish(part, alerts, offset))

    async def idle_tick(self) -> None:
        async with self.lock:
            wall = time.monotonic()
            for part in list(self.parts.values()):
                if part.number in self.paused:
                    continue  # waiting for the by-team stage, not quiet: its event time stays
                if part.aligner is not None:
                    # Let go the events whose wait is over, and follow the usage partitions' event time.
                    pending: list[Awaitable[Any]] = []
                    await self._release(part, wall, pending, part.offset)
                    await asyncio.gather(*pending)
                    if pending:
                        # Batches release what the marks allow; what is left to this tick went because a usage
                        # partition fell silent, by the wall clock. A restore would give it its grace again and
                        # judge these events in another order: save the alerts they raised so they do not
                        # come again under other ids. (Not on every such release: draining a backlog with
                        # paused partitions, that would be a snapshot a second.)
                        await self.save([part])
                    if len(part.aligner) or part.aligner.low(wall) != math.inf:
                        continue  # event time comes from the usage partitions while any is live
                alerts = part.handler.idle_tick(wall)
                if alerts is None:
                    continue
                part.dirty = True
                engine, pending = part.handler.engine, []
                if engine.handed:
                    # The findings go to their teams with the event time the idle clock took this partition to,
                    # so the by-team stage need not wait for it to fall silent there too. (No marks: a quiet
                    # worker writes nothing, and a silent partition stops holding the by-team stage back.)
                    await self._hand_over(part, self._forward_headers(part, part.offset, engine.event_time), pending)
                if alerts:
                    pending.extend(await self.publish(part, alerts, part.offset))
                if pending:
                    await asyncio.gather(*pending)
                    await self.save([part])  # wall-clock alerts and findings need not repeat on re-processing

    async def revoked(self, partitions: Iterable[TopicPartition]) -> None:
        mine = [tp for tp in partitions if tp.topic == self.topic]
        log.info("stormwatch: revoked %s", " ".join(sorted(f"{tp.topic}[{tp.partition}]" for tp in mine)) or "nothing")
        if self.feed is not None and self.feed.metrics is not None:
            for tp in mine:
                self.feed.metrics.forget_partition(tp.topic, tp.partition)
        async with self.lock:
            for n in await self._overtaken(sorted(self.parts)):
                del self.parts[n]  # another worker has it already: write nothing over its newer snapshot
        await self.save_all("revoked")

    async def assigned(self, partitions: Iterable[TopicPartition]) -> dict[TopicPartition, int]:
        """Take the new assignment: drop partitions gone, restore new ones; returns where each must resume."""
        assigned = {tp.partition: tp for tp in partitions if tp.topic == self.topic}
        names = sorted(f"{tp.topic}[{tp.partition}]" for tp in assigned.values())
        log.info("stormwatch: assigned %s", " ".join(names) or "nothing")
        async with self.lock:
            await self.settle()
            for n in sorted(set(self.parts) - set(assigned)):
                del self.parts[n]  # saved when revoked
            for n in await self._overtaken(sorted(set(self.parts))):
                del self.parts[n]  # another worker had it meanwhile: take up where that one left off
            await self.restore(sorted(set(assigned) - set(self.parts)))
            for part in self.parts.values():
                part.resumed, part.reseeks = False, 0
            resume_at = {assigned[n]: p.offset + 1 for n, p in self.parts.items() if p.saved_offset is not None}
            self.restored = True
        log.info("stormwatch: resuming %s", " ".join(f"{tp.partition}@{o}" for tp, o in sorted(resume_at.items())))
        return resume_at

    async def _overtaken(self, kept: Sequence[int]) -> list[int]:
        """Of the partitions this worker keeps across a rebalance, those whose newest snapshot is not its own.

        A worker that stalled past its session left the group without knowing; another took its
        partitions, went on and paged. Given them back, its engines are behind that one's: going on
        from its own offset would page again what the other already had.
        """
        if not kept:
            return []
        by_state: dict[TopicPartition, list[str]] = {}
        for n in kept:
            by_state.setdefault(self.state_tp(n), []).append(state_key(self.topic, n))
        snaps = await (await self.reader_ready()).latest(by_state)
        overtaken = []
        for n in kept:
            snap = snaps.get(state_key(self.topic, n))
            if snap is not None and snap.offset != self.parts[n].saved_offset:
                log.warning(
                    "stormwatch: %spartition %d was worked on elsewhere (snapshot at %d, ours at %s): restoring it",
                    self.label,
                    n,
                    snap.offset,
                    self.parts[n].saved_offset,
                )
                overtaken.append(n)
        return overtaken

    def watermarks(self) -> dict[TopicPartition, float]:
        """The event time each partition's engine has reached."""
        return {TopicPartition(self.topic, n): p.handler.engine.stats.watermark for n, p in self.parts.items()}

    def resumed(self, partitions: Iterable[TopicPartition], wall: float) -> None:
        """Paused partitions go on: their wait was no quiet stream (see :mod:`detector.worker.clock`)."""
        for tp in partitions:
            self.paused.discard(tp.partition)
            part = self.parts.get(tp.partition)
            if part is not None:
                part.handler.clock.saw_event(wall)

    def alignment(self, wall: float) -> tuple[int, float]:
        """By-team: the events held, and the event time every live usage partition has passed."""
        held, low = 0, math.inf
        for p in self.parts.values():
            if p.aligner is not None:
                held += len(p.aligner)
                low = min(low, p.aligner.low(wall))
        return held, low

    def alive(self, sources: Iterable[int], wall: float) -> None:
        """By-team: these usage partitions are read by this worker and behind, so not silent (Aligner.alive)."""
        for p in self.parts.values():
            if p.aligner is not None:
                for n in sources:
                    p.aligner.alive(n, wall)

    def behind(self, ends: Mapping[int, int | None]) -> list[int]:
        """Of this worker's partitions, those with records past what the engine has (``ends``: high watermarks)."""
        return [n for n, p in self.parts.items() if (end := ends.get(n)) is not None and end > p.offset + 1]

    def positions(self) -> dict[TopicPartition, int]:
        """The next offset of each partition: what the group may commit."""
        return {TopicPartition(self.topic, n): p.acked + 1 for n, p in self.parts.items() if p.acked >= 0}


@dataclass(frozen=True)
class WorkerTopics:
    alerts: faust.TopicT
    dlq: faust.TopicT
    breakers: faust.TopicT
    state: faust.TopicT

    async def declare(self) -> None:
        for t in (self.alerts, self.dlq, self.breakers, self.state):
            await t.maybe_declare()


class StormwatchApp(faust.App):
    """A Faust app whose own consumer stays off: the usage topic is read by :class:`UsageConsumer` in batches."""

    BootStrategy = NoFaustConsumer


def create_app(settings: Settings) -> faust.App:
    """The Faust app of one worker process: topics, the usage consumer, the idle, snapshot and summary timers."""
    k = settings.kafka
    app = StormwatchApp(
        k.group_id,
        broker=k.broker_urls(),
        broker_credentials=broker_credentials(k),
        store="memory://",  # no Faust tables: engines are snapshotted to the state topic by this module
        web_enabled=k.web_port is not None,  # the server is ours: see detector.worker.web
        topic_partitions=k.partitions,
        topic_replication_factor=k.replication_factor,
        topic_disable_leader=True,  # no on_leader timers: skip the leader-election topic
        producer_max_request_size=k.snapshot_max_bytes,
        autodiscover=False,
        datadir=str(k.data_dir) if k.data_dir is not None else "{conf.name}-data",  # Faust's default
    )

    def topic(
        name: str,
        retention_days: float | None = None,
        compacting: bool | None = None,
        config: dict[str, str] | None = None,
    ) -> faust.TopicT:
        # internal=True: Faust creates the topic when it is missing (and leaves an existing one as it is).
        return app.topic(
            name,
            key_serializer="raw",
            value_serializer="raw",
            internal=True,
            partitions=k.partitions,
            retention=retention_days * 86400 if retention_days else None,
            compacting=compacting,
            deleting=False if compacting else None,
            config=config,
        )

    topics = WorkerTopics(
        alerts=topic(k.alerts_topic, retention_days=k.alerts_retention_days),
        dlq=topic(k.dlq_topic, retention_days=k.dlq_retention_days),
        breakers=topic(k.breakers_topic, compacting=True),
        state=topic(
            k.state_topic,
            compacting=True,
            config={
                "max.message.bytes": str(k.snapshot_max_bytes),
                "segment.ms": str(STATE_SEGMENT_MS),
                "min.cleanable.dirty.ratio": "0.1",
            },
        ),
    )
    usage = topic(k.usage_topic)
    sources = [usage]
    feed = None
    if k.web_port is not None:
        view = LiveView()
        feed = Feed(view, Metrics(view))
    if k.repartition_by_team:
        sources.append(topic(k.by_team_topic, retention_days=k.alerts_retention_days))
        runtimes = [
            Runtime(k, k.usage_topic, topics, lambda: Engine.from_settings(settings, "key"), StateReader(k), feed=feed),
            Runtime(
                k,
                k.by_team_topic,
                topics,
                lambda: Engine.from_settings(settings, "team"),
                StateReader(k),
                forwarded=True,
                feed=feed,
            ),
        ]
    else:
        whole = Runtime(k, k.usage_topic, topics, lambda: Engine.from_settings(settings), StateReader(k), feed=feed)
        runtimes = [whole]

    async def declare() -> None:
        for source in sources:
            await source.maybe_declare()
        await topics.declare()

    app.service(cast(Any, UsageConsumer(runtimes, declare, beacon=app.beacon)))
    if feed is not None:
        ready = lambda: all(r.restored for r in runtimes)  # noqa: E731
        app.web_server(WorkerWeb(settings, feed, ready, beacon=app.beacon))

    async def idle_tick() -> None:
        for runtime in runtimes:
            await runtime.idle_tick()

    async def snapshot_timer() -> None:
        for runtime in runtimes:
            await runtime.save_all("periodic")

    async def summary_timer() -> None:
        log.info("stormwatch: %s", " | by team: ".join(r.summary() for r in runtimes))

    # Registered by call rather than as decorators, so each function keeps its own signature for mypy.
    app.timer(IDLE_TICK_SECONDS, name=f"{k.group_id}.idle_tick")(idle_tick)
    app.timer(k.snapshot_every_seconds, name=f"{k.group_id}.snapshot")(snapshot_timer)
    app.timer(k.summary_every_seconds, name=f"{k.group_id}.summary")(summary_timer)
    return app


def run_worker(settings: Settings, loglevel: str = "info") -> int:
    """Run the worker until SIGTERM or SIGINT; returns the process exit code."""
    app = create_app(settings)
    worker = faust.Worker(app, loglevel=loglevel, quiet=True)
    try:
        worker.execute_from_commandline()
    except SystemExit as done:
        return int(done.code or 0)
    return 0
