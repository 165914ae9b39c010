"""``detector alerter``: the alerting agents on Kafka.

Reads the alerts topic (consumer group ``<group_id>.alerter``; an incident's records share a key,
so they arrive in order) and hands each record to the :class:`~detector.alerting.dispatch.Dispatcher`:
Slack and kill-switch webhooks through the durable outbox, breaker changes to the compacted
breakers topic (key ``<entity type>:<entity id>``). Owners' labels travel on the same topic with
the header ``stormwatch-record: feedback`` (:func:`publish_feedback`) and take effect when read.

The breakers topic is followed from its start for as long as the alerter runs, so the board knows
every breaker, including those opened or closed by hand with ``detector breaker`` while it runs
(a breaker closed by hand is not turned half-open by its old expiry); changes by hand made while it
runs are relayed to the owner's kill-switch webhooks. The responder (breakers, silences) is saved
next to the outbox after each batch that changed it, before the batch's offsets are committed; a
crash re-reads at most one batch, and the outbox, keyed by alert id, sends nothing twice. Breaker
changes are published at least once (a re-read batch may publish a change again; gateways keep
the higher version), each after its webhooks are stored. Deliveries finished and Slack threads
quiet for ``KEEP_SECONDS`` are pruned from the outbox every hour.

Time: breakers and silences run on the wall clock here (a gateway refuses in real time), while
``detector replay --notify`` runs the same responder in event time.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import pickle
import time
from pathlib import Path

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer  # type: ignore[import-untyped]
from aiokafka.admin import NewTopic  # type: ignore[import-untyped]
from pydantic import ValidationError

from detector.alerting.dispatch import Dispatcher
from detector.alerting.policy import Responder
from detector.breakers import POLICY_ACTOR, change_key
from detector.enforce import BreakerFollower, BreakerTable
from detector.events import Alert, BreakerChange, IncidentFeedback
from detector.settings import Settings
from detector.worker.snapshots import (
    RECORD_HEADER,
    StateReader,
    aiokafka_security,
    client_options,
    create_missing_topics,
)

log = logging.getLogger("stormwatch.alerter")

FEEDBACK = b"feedback"
TICK_SECONDS = 1.0
CATCH_UP_SECONDS = 60.0  # to read the breakers topic to its end at start
PRUNE_EVERY_SECONDS = 3600.0
KEEP_SECONDS = 30 * 86400.0  # finished deliveries and quiet Slack threads kept this long


async def ensure_topics(settings: Settings) -> None:
    """The alerts and breakers topics, when missing, as the worker makes them (whichever starts first)."""
    k = settings.kafka
    wanted = [
        NewTopic(
            k.alerts_topic,
            k.partitions,
            k.replication_factor,
            topic_configs={"retention.ms": str(int(k.alerts_retention_days * 86400 * 1000))},
        ),
        NewTopic(k.breakers_topic, k.partitions, k.replication_factor, topic_configs={"cleanup.policy": "compact"}),
    ]
    await create_missing_topics(k, wanted)


async def find_incident(settings: Settings, incident_id: str, timeout: float = 30.0) -> Alert | None:
    """The newest record of ``incident_id`` on the alerts topic (read from the beginning)."""
    reader = StateReader(settings.kafka, timeout=timeout)
    await reader.start()
    try:
        found: Alert | None = None
        key = incident_id.encode()
        async for r in reader.records(settings.kafka.alerts_topic):
            if r.key == key and dict(r.headers).get(RECORD_HEADER) != FEEDBACK:
                found = Alert.model_validate_json(r.value)
        return found
    finally:
        await reader.stop()


async def publish_feedback(settings: Settings, feedback: IncidentFeedback) -> None:
    """Put an owner's label on the alerts topic (keyed by incident, so it follows the incident's records)."""
    producer = AIOKafkaProducer(acks="all", **client_options(settings.kafka))
    await producer.start()
    try:
        await producer.send_and_wait(
            settings.kafka.alerts_topic,
            key=feedback.incident_id.encode(),
            value=feedback.model_dump_json().encode(),
            headers=[(RECORD_HEADER, FEEDBACK)],
        )
    finally:
        await producer.stop()


class Alerter:
    """The Kafka shell around one :class:`Dispatcher`."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        a = settings.alerting
        self.state_path = Path(a.outbox_path).with_suffix(".responder")
        self.producer: AIOKafkaProducer | None = None
        self.consumer: AIOKafkaConsumer | None = None
        self.follower: BreakerFollower | None = None
        self.dispatcher = Dispatcher(settings, publish_breaker=self._publish, echo=log.info, responder=self._load())
        self.handled = 0
        self.adopted = 0  # breaker changes made elsewhere, taken from the topic
        self._changed = True  # the responder changed since it was saved
        self._pruned_at = -math.inf

    def _load(self) -> Responder:
        if self.state_path.exists():
            try:
                responder: Responder = pickle.loads(self.state_path.read_bytes())
                return responder.configure(self.settings)  # the config may have changed since
            except Exception:
                log.exception("alerter: unreadable %s; starting from the breakers topic alone", self.state_path)
        return Responder(self.settings)

    def _adopt(self, change: BreakerChange) -> None:
        """A change read from the breakers topic: ours coming back, or one made by hand."""
        if not self.dispatcher.responder.board.apply(change):
            return  # ours, or older than what the board knows
        self.adopted += 1
        self._changed = True
        if self.follower is not None and self.follower.ready.done() and change.actor != POLICY_ACTOR:
            log.info("alerter: breaker %s %s by %s", change_key(change), change.state.value, change.actor)
            self.dispatcher.relay(change)

    def _drop(self, change: BreakerChange) -> None:
        """A breaker the breakers topic no longer holds (a tombstone, a breaker from before teams replaced)."""
        if self.dispatcher.responder.board.forget(change):
            self._changed = True
            log.info("alerter: breaker %s v%d let go: the topic no longer holds it", change_key(change), change.version)

    def _save(self) -> None:
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_bytes(pickle.dumps(self.dispatcher.responder))
        os.replace(tmp, self.state_path)

    async def _publish(self, change: BreakerChange) -> None:
        assert self.producer is not None
        await self.producer.send_and_wait(
            self.settings.kafka.breakers_topic,
            key=change_key(change).encode(),
            value=change.model_dump_json().encode(),
        )
        log.info("alerter: published breaker %s %s (%s)", change_key(change), change.state.value, change.reason)

    async def start(self) -> None:
        k = self.settings.kafka
        await ensure_topics(self.settings)
        self.follower = BreakerFollower(
            BreakerTable(),
            k.hosts(),
            k.breakers_topic,
            client_id=f"{k.group_id}.alerter-breakers",
            on_change=self._adopt,
            on_drop=self._drop,
            **aiokafka_security(k),
        )
        await self.follower.start()
        async with asyncio.timeout(CATCH_UP_SECONDS):
            await self.follower.ready
        log.info("alerter: %d breaker changes adopted from %s", self.adopted, k.breakers_topic)
        self.producer = AIOKafkaProducer(acks="all", **client_options(k))
        await self.producer.start()
        self.consumer = AIOKafkaConsumer(
            k.alerts_topic,
            group_id=f"{k.group_id}.alerter",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            **client_options(k),
        )
        await self.consumer.start()

    async def handle(self, value: bytes, headers: dict[str, bytes]) -> None:
        now = time.time()
        self._changed = True
        try:
            if headers.get(RECORD_HEADER) == FEEDBACK:
                feedback = IncidentFeedback.model_validate_json(value)
                await self.dispatcher.feedback(feedback, now)
                log.info("alerter: %s labelled %s by %s", feedback.incident_id, feedback.label.value, feedback.actor)
            else:
                await self.dispatcher.handle(Alert.model_validate_json(value), now)
        except ValidationError as error:
            log.warning("alerter: skipped a record that is neither an alert nor feedback: %s", error)
        self.handled += 1

    async def run(self, stop: asyncio.Event) -> None:
        assert self.consumer is not None
        senders = asyncio.ensure_future(self.dispatcher.run_senders(stop))
        try:
            while not stop.is_set():
                batches = await self.consumer.getmany(timeout_ms=int(TICK_SECONDS * 1000))
                for records in batches.values():
                    for r in records:
                        await self.handle(r.value, dict(r.headers))
                now = time.time()
                if await self.dispatcher.advance(now):
                    self._changed = True
                if self._changed:
                    self._save()  # before the commit: a re-read batch finds the breakers it opened
                    self._changed = False
                if batches:
                    await self.consumer.commit()
                if now - self._pruned_at >= PRUNE_EVERY_SECONDS:
                    self._pruned_at = now
                    if pruned := self.dispatcher.prune(now, KEEP_SECONDS):
                        log.info(
                            "alerter: pruned %d deliveries and threads older than %.0f days",
                            pruned,
                            KEEP_SECONDS / 86400,
                        )
        finally:
            stop.set()
            await senders

    async def stop(self) -> None:
        if self.follower is not None:
            await self.follower.stop()
        for client in (self.consumer, self.producer):
            if client is not None:
                await client.stop()
        await self.dispatcher.close()


def run_alerter(settings: Settings) -> int:
    """Run until SIGTERM or SIGINT."""
    import signal

    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] [%(process)d] [%(levelname)s] %(message)s")

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        alerter = Alerter(settings)
        await alerter.start()
        log.info(
            "alerter: %s -> Slack, webhooks and %s (dry run: %s)",
            settings.kafka.alerts_topic,
            settings.kafka.breakers_topic,
            alerter.dispatcher.dry_run,
        )
        try:
            await alerter.run(stop)
        finally:
            await alerter.stop()
            log.info("alerter: stopped after %d records: %s", alerter.handled, alerter.dispatcher.summary())

    asyncio.run(main())
    return 0


__all__ = ["FEEDBACK", "RECORD_HEADER", "Alerter", "find_incident", "publish_feedback", "run_alerter"]
