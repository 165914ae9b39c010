"""Durable engine state: snapshot records on a compacted topic, and reading them back.

A snapshot record holds the engine of one partition (of the usage topic, or of the by-team
topic the usage events are forwarded to): a one-line JSON header, a newline, then
the zlib-compressed :meth:`Engine.snapshot <detector.engine.Engine.snapshot>` pickle (followed,
for a by-team partition, by its pickled aligner: ``held_bytes`` of it). The
header says which partition it is, the offset of the last usage event the engine includes,
and the end offsets of the alerts topic when it was written (every alert the engine had raised
by then was delivered before them), so that a new owner can find the alerts published after it.

>>> snap = Snapshot(topic="llm.usage", partition=3, offset=41, alerts_end={0: 7, 1: 2}, engine=b"pickle" * 100)
>>> blob = snap.encode()
>>> blob.split(b"\\n", 1)[0]
b'{"v":1,"topic":"llm.usage","partition":3,"offset":41,"alerts_end":{"0":7,"1":2},"engine_bytes":600}'
>>> Snapshot.decode(blob) == snap, len(blob) < 200
(True, True)
>>> Snapshot.decode(b"garbage")
Traceback (most recent call last):
...
ValueError: not a stormwatch snapshot record
"""

from __future__ import annotations

import asyncio
import json
import ssl
import zlib
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition  # type: ignore[import-untyped]
from aiokafka.admin import AIOKafkaAdminClient, NewTopic  # type: ignore[import-untyped]

from detector.worker.config import KafkaSettings

ENVELOPE_VERSION = 1
SOURCE_TOPIC_HEADER = "stormwatch-source-topic"
SOURCE_PARTITION_HEADER = "stormwatch-source-partition"
SOURCE_OFFSET_HEADER = "stormwatch-source-offset"
RECORD_HEADER = "stormwatch-record"  # what a record on one of our topics is, when not the topic's usual kind


def state_key(usage_topic: str, partition: int) -> str:
    return f"{usage_topic}:{partition}"


@dataclass(frozen=True)
class Snapshot:
    topic: str
    partition: int
    offset: int  # the last usage offset the engine includes; -1: none yet
    alerts_end: Mapping[int, int]  # alerts-topic partition -> end offset when written
    engine: bytes  # Engine.snapshot(), uncompressed
    # A by-team partition: "<usage partition>:<team>" -> the last usage offset forwarded into this engine,
    sources: Mapping[str, int] = field(default_factory=dict)
    held: bytes = b""  # and its aligner (detector.worker.align), pickled: the events still waiting
    # Alert ids a previous owner published beyond ``offset`` that re-processing has not raised again yet.
    published: frozenset[str] = frozenset()

    def encode(self, level: int = 1) -> bytes:
        header = {
            "v": ENVELOPE_VERSION,
            "topic": self.topic,
            "partition": self.partition,
            "offset": self.offset,
            "alerts_end": {str(p): o for p, o in sorted(self.alerts_end.items())},
            "engine_bytes": len(self.engine),
        }
        if self.sources:
            header["sources"] = dict(sorted(self.sources.items()))
        if self.held:
            header["held_bytes"] = len(self.held)
        if self.published:
            header["published"] = sorted(self.published)
        body = zlib.compress(self.engine + self.held, level)
        return json.dumps(header, separators=(",", ":")).encode() + b"\n" + body

    @classmethod
    def decode(cls, blob: bytes) -> Snapshot:
        line, sep, body = blob.partition(b"\n")
        try:
            header = json.loads(line) if sep else None
        except ValueError:
            header = None
        if not isinstance(header, dict) or header.get("v") != ENVELOPE_VERSION:
            raise ValueError("not a stormwatch snapshot record")
        whole = zlib.decompress(body)
        split = int(header["engine_bytes"])
        return cls(
            topic=header["topic"],
            partition=int(header["partition"]),
            offset=int(header["offset"]),
            alerts_end={int(p): int(o) for p, o in header["alerts_end"].items()},
            engine=whole[:split],
            sources={str(k): int(o) for k, o in header.get("sources", {}).items()},
            held=whole[split:],
            published=frozenset(map(str, header.get("published", ()))),
        )


def ssl_context(k: KafkaSettings) -> ssl.SSLContext | None:
    """The TLS context of every client of ours (None without TLS): verifies the brokers, mutual TLS if set."""
    if k.security_protocol not in ("SSL", "SASL_SSL"):
        return None
    context = ssl.create_default_context(cafile=str(k.ssl_cafile) if k.ssl_cafile else None)
    if k.ssl_certfile is not None and k.ssl_keyfile is not None:
        context.load_cert_chain(str(k.ssl_certfile), str(k.ssl_keyfile))
    return context


def aiokafka_security(k: KafkaSettings) -> dict[str, Any]:
    """Keyword arguments for plain aiokafka clients, matching the Faust app's credentials."""
    kwargs: dict[str, Any] = {"security_protocol": k.security_protocol}
    if (context := ssl_context(k)) is not None:
        kwargs["ssl_context"] = context
    if k.security_protocol.startswith("SASL_"):
        assert k.sasl_password is not None  # checked by KafkaSettings
        kwargs |= {
            "sasl_mechanism": k.sasl_mechanism,
            "sasl_plain_username": k.sasl_username,
            "sasl_plain_password": k.sasl_password.get_secret_value(),
        }
    return kwargs


def client_options(k: KafkaSettings) -> dict[str, Any]:
    """Bootstrap servers and security settings, as every aiokafka client of ours takes them."""
    return {"bootstrap_servers": k.hosts(), **aiokafka_security(k)}


async def create_missing_topics(k: KafkaSettings, wanted: Sequence[NewTopic], timeout: float = 30.0) -> set[str]:
    """Create those of ``wanted`` that do not exist, and wait until each has a leader; the names created.

    For the shells that may start before the worker (the alerter, ``detector breaker``,
    ``detector produce``): a topic made by whichever starts first has the same settings.
    """
    admin = AIOKafkaAdminClient(**client_options(k))
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [t for t in wanted if t.name not in existing]
        if not missing:
            return set()
        response = await admin.create_topics(missing)
        for topic, code, *message in response.topic_errors:
            if code not in (0, 36):  # 36: TOPIC_ALREADY_EXISTS (created meanwhile)
                raise RuntimeError(f"could not create topic {topic}: error {code} {message}")
        async with asyncio.timeout(timeout):  # every partition has a leader before it is read or written
            while not all(
                t["error_code"] == 0 and t["partitions"] and all(p["leader"] >= 0 for p in t["partitions"])
                for t in await admin.describe_topics([t.name for t in missing])
            ):
                await asyncio.sleep(0.1)
        return {t.name for t in missing}
    finally:
        await admin.close()


class StateReader:
    """Reads our topics back (snapshots, alerts already published, an incident); a plain consumer, no group."""

    def __init__(self, k: KafkaSettings, timeout: float = 60.0) -> None:
        self.k = k
        self.timeout = timeout
        self._consumer: AIOKafkaConsumer | None = None
        self._partitions: dict[str, list[TopicPartition]] = {}

    async def start(self) -> None:
        self._consumer = AIOKafkaConsumer(
            group_id=None,
            enable_auto_commit=False,
            max_partition_fetch_bytes=self.k.snapshot_max_bytes,
            fetch_max_bytes=self.k.snapshot_max_bytes,
            **client_options(self.k),
        )
        await self._consumer.start()

    async def stop(self) -> None:
        if self._consumer is not None:
            await self._consumer.stop()
            self._consumer = None

    @property
    def consumer(self) -> AIOKafkaConsumer:
        assert self._consumer is not None, "StateReader not started"
        return self._consumer

    async def partitions(self, topic: str) -> list[TopicPartition]:
        """The partitions of ``topic``, waiting (up to the timeout) for a topic just created to show."""
        if topic not in self._partitions:
            async with asyncio.timeout(self.timeout):
                while not (found := (await self.consumer._client.fetch_all_metadata()).partitions_for_topic(topic)):
                    await asyncio.sleep(0.2)
            self._partitions[topic] = [TopicPartition(topic, p) for p in sorted(found)]
        return self._partitions[topic]

    async def end_offsets(self, topic: str) -> dict[int, int]:
        tps = await self.partitions(topic)
        return {tp.partition: o for tp, o in (await self.consumer.end_offsets(tps)).items()}

    async def latest(self, keys: Mapping[TopicPartition, Iterable[str]]) -> dict[str, Snapshot]:
        """The newest snapshot of each key, by the state-topic partition that holds it, reading back from the end.

        Windows of growing size are read backwards from each partition's end offset until every
        key is found (or the beginning is reached), so a restore reads about one snapshot per key,
        not the uncompacted history of the partition.
        """
        consumer = self.consumer
        tps = list(keys)
        consumer.assign(tps)
        begins = await consumer.beginning_offsets(tps)
        ends = await consumer.end_offsets(tps)
        found: dict[str, bytes | None] = {}
        async with asyncio.timeout(self.timeout):
            for tp in tps:
                wanted = set(keys[tp])
                begin, hi, window = begins[tp], ends[tp], 8
                while wanted - found.keys() and hi > begin:
                    lo = max(begin, hi - window)
                    consumer.seek(tp, lo)
                    newest: dict[str, bytes | None] = {}
                    while await consumer.position(tp) < hi:
                        for records in (await consumer.getmany(tp, timeout_ms=500)).values():
                            for r in records:
                                key = r.key.decode() if r.key is not None else ""
                                if r.offset < hi and key in wanted:
                                    newest[key] = r.value
                    for key, value in newest.items():
                        found.setdefault(key, value)
                    hi, window = lo, window * 4
        return {key: Snapshot.decode(v) for key, v in found.items() if v is not None}

    async def records(self, topic: str, since: Mapping[int, int] | None = None) -> AsyncIterator[Any]:
        """The records of ``topic`` from offsets ``since`` (per partition; default: the beginning) to its end now."""
        tps = await self.partitions(topic)
        consumer = self.consumer
        consumer.assign(tps)
        begins = await consumer.beginning_offsets(tps)
        ends = await consumer.end_offsets(tps)
        for tp in tps:
            consumer.seek(tp, max((since or {}).get(tp.partition, 0), begins[tp]))
        async with asyncio.timeout(self.timeout):
            while [tp for tp in tps if await consumer.position(tp) < ends[tp]]:
                for records in (await consumer.getmany(*tps, timeout_ms=500)).values():
                    for r in records:
                        yield r

    async def published_since(self, alerts_topic: str, since: Mapping[int, int], source: tuple[str, int]) -> set[str]:
        """Ids of the alerts that ``source`` (usage topic, partition) published after offsets ``since``."""
        want = (source[0].encode(), str(source[1]).encode())
        ids: set[str] = set()
        async for r in self.records(alerts_topic, since):
            headers = dict(r.headers)
            if (headers.get(SOURCE_TOPIC_HEADER), headers.get(SOURCE_PARTITION_HEADER)) == want:
                ids.add(json.loads(r.value)["alert_id"])
        return ids
