"""The Kafka shell: usage events from a topic through the engine, alerts to a topic.

:func:`create_app` wires one Faust app per call (no module-level app, so tests and the CLI
build their own): the usage topic feeds one thin agent; the agent hands each message to a
:class:`UsageHandler` (validation, the engine, counters: no Faust, no I/O) and publishes
what comes back:

* a valid event goes through the one :class:`~detector.engine.Engine` of this process; every
  alert it returns goes to the alerts topic, keyed by ``incident_id``;
* a message that is not JSON or breaks the contract goes to the dead-letter topic with its
  original bytes and key, and the headers ``stormwatch-reason`` (what is wrong, one line),
  ``stormwatch-source-topic``, ``-partition`` and ``-offset``. The worker goes on.

A message is acknowledged (its offset becomes committable) only when the agent asks for the
next one, that is after its alerts or its dead letter were delivered to the broker.

A one-second timer advances event time with the wall clock once the stream has been quiet
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
import ssl
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import faust
from pydantic import ValidationError

from detector.engine import Engine
from detector.events import Alert, UsageEvent, utc_from_epoch
from detector.replay import explain
from detector.settings import Settings
from detector.worker.clock import IdleClock
from detector.worker.config import KafkaSettings

log = logging.getLogger("stormwatch.worker")

REASON_HEADER = "stormwatch-reason"
SOURCE_TOPIC_HEADER = "stormwatch-source-topic"
SOURCE_PARTITION_HEADER = "stormwatch-source-partition"
SOURCE_OFFSET_HEADER = "stormwatch-source-offset"
IDLE_TICK_SECONDS = 1.0


@dataclass(frozen=True, slots=True)
class Rejected:
    reason: str


@dataclass
class WorkerStats:
    events: int = 0
    rejected: int = 0
    alerts: int = 0
    idle_advances: int = 0
    alerts_by_kind: Counter[tuple[str, str]] = field(default_factory=Counter)


class UsageHandler:
    """Raw message bytes in, alerts or a reject reason out. All the worker's logic, none of its I/O."""

    def __init__(self, engine: Engine, clock: IdleClock) -> None:
        self.engine = engine
        self.clock = clock
        self.stats = WorkerStats()

    def handle(self, raw: bytes | None, wall: float) -> list[Alert] | Rejected:
        if raw is None:
            self.stats.rejected += 1
            return Rejected("empty message (null value)")
        try:
            ev = UsageEvent.model_validate_json(raw)
        except ValidationError as error:
            self.stats.rejected += 1
            return Rejected(explain(error))
        self.clock.saw_event(wall)
        try:
            alerts = self.engine.process(ev)
        except Exception as error:  # a bug must not stop the stream; the event is kept in the DLQ
            log.exception("engine failed on event %s", ev.event_id)
            self.stats.rejected += 1
            return Rejected(f"engine error: {type(error).__name__}: {error}")
        self.stats.events += 1
        return self._count(alerts)

    def idle_tick(self, wall: float) -> list[Alert]:
        """Advance event time over a quiet stream (see :mod:`detector.worker.clock`)."""
        now = self.clock.due(self.engine.stats.watermark, wall)
        if now is None:
            return []
        self.stats.idle_advances += 1
        return self._count(self.engine.advance(now))

    def _count(self, alerts: list[Alert]) -> list[Alert]:
        for a in alerts:
            self.stats.alerts += 1
            self.stats.alerts_by_kind[(a.kind.value, a.status.value)] += 1
        return alerts

    def summary(self) -> str:
        s, es = self.stats, self.engine.stats
        mark = utc_from_epoch(es.watermark).isoformat() if es.watermark > float("-inf") else "-"
        kinds = "".join(f" {k}.{st}={n}" for (k, st), n in sorted(s.alerts_by_kind.items()))
        return (
            f"events={s.events} rejected={s.rejected} alerts={s.alerts}{kinds} "
            f"idle_advances={s.idle_advances} late={es.late_events} watermark={mark}"
        )


def dlq_headers(reason: str, topic: str, partition: int, offset: int) -> list[tuple[str, bytes]]:
    return [
        (REASON_HEADER, reason.encode()),
        (SOURCE_TOPIC_HEADER, topic.encode()),
        (SOURCE_PARTITION_HEADER, str(partition).encode()),
        (SOURCE_OFFSET_HEADER, str(offset).encode()),
    ]


def broker_credentials(k: KafkaSettings) -> Any:
    """Faust credentials for the configured security protocol (None for PLAINTEXT)."""
    context = None
    if k.security_protocol in ("SSL", "SASL_SSL"):
        context = ssl.create_default_context(cafile=str(k.ssl_cafile) if k.ssl_cafile else None)
        if k.ssl_certfile is not None and k.ssl_keyfile is not None:
            context.load_cert_chain(str(k.ssl_certfile), str(k.ssl_keyfile))
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


def create_app(settings: Settings, engine: Engine | None = None) -> faust.App:
    """The Faust app of one worker process: topics, the usage agent, the idle and summary timers."""
    k = settings.kafka
    app = faust.App(
        k.group_id,
        broker=k.broker_urls(),
        broker_credentials=broker_credentials(k),
        store="memory://",  # no tables yet: all state is in this process's one Engine
        web_enabled=k.web_port is not None,
        web_port=k.web_port or 6066,
        web_bind="127.0.0.1",
        topic_partitions=k.partitions,
        topic_replication_factor=k.replication_factor,
        topic_disable_leader=True,  # no on_leader timers: skip the leader-election topic
        consumer_auto_offset_reset=k.auto_offset_reset,
        autodiscover=False,
        datadir=str(k.data_dir) if k.data_dir is not None else "{conf.name}-data",  # Faust's default
    )

    def topic(name: str, retention_days: float | None = None, compacting: bool | None = None) -> faust.TopicT:
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
        )

    usage_topic = topic(k.usage_topic)
    alerts_topic = topic(k.alerts_topic, retention_days=k.alerts_retention_days)
    dlq_topic = topic(k.dlq_topic, retention_days=k.dlq_retention_days)
    breakers_topic = topic(k.breakers_topic, compacting=True)

    handler = UsageHandler(engine or Engine.from_settings(settings), IdleClock(k.idle_advance_after_seconds))
    lock = asyncio.Lock()  # one engine: events and idle ticks take turns, alerts keep their order

    async def publish(alerts: Sequence[Alert]) -> None:
        pending = [
            await alerts_topic.send(key=a.incident_id.encode(), value=a.model_dump_json().encode()) for a in alerts
        ]
        await asyncio.gather(*pending)  # delivered before the event is acknowledged

    async def dead_letter(message: Any, reason: str) -> None:
        log.warning("rejected %s[%d]@%d: %s", message.topic, message.partition, message.offset, reason[:300])
        delivered = await dlq_topic.send(
            key=message.key,
            value=message.value,
            headers=dlq_headers(reason, message.topic, message.partition, message.offset),
        )
        await delivered

    async def consume(stream: Any) -> None:
        log.info(
            "stormwatch: %s -> %s (dead letters: %s), group %s, brokers %s",
            k.usage_topic,
            k.alerts_topic,
            k.dlq_topic,
            k.group_id,
            k.bootstrap_servers,
        )
        for topic in (alerts_topic, dlq_topic, breakers_topic):
            await topic.maybe_declare()
        async for event in stream.events():
            message = event.message
            async with lock:
                result = handler.handle(message.value, time.monotonic())
                if isinstance(result, Rejected):
                    await dead_letter(message, result.reason)
                elif result:
                    await publish(result)

    async def idle_tick() -> None:
        async with lock:
            alerts = handler.idle_tick(time.monotonic())
            if alerts:
                await publish(alerts)

    async def summary() -> None:
        log.info("stormwatch: %s", handler.summary())

    async def on_assigned(sender: Any, *args: Any, signal: Any, **kwargs: Any) -> None:
        assigned = args[0] if args else kwargs.get("assigned", ())
        parts = sorted(f"{tp.topic}[{tp.partition}]" for tp in assigned)
        log.info("stormwatch: assigned %s", " ".join(parts) or "nothing")

    async def on_shutdown(sender: Any, *args: Any, signal: Any, **kwargs: Any) -> None:
        log.info("stormwatch: stopping: %s", handler.summary())

    # Registered by call rather than as decorators, so each function keeps its own signature for mypy.
    app.agent(usage_topic, name=f"{k.group_id}.usage")(consume)
    app.timer(IDLE_TICK_SECONDS, name=f"{k.group_id}.idle_tick")(idle_tick)
    app.timer(k.summary_every_seconds, name=f"{k.group_id}.summary")(summary)
    app.on_partitions_assigned.connect(cast(Any, on_assigned))  # mode types receivers too narrowly
    app.on_before_shutdown.connect(cast(Any, on_shutdown))
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
