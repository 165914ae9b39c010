"""In-memory stand-ins for the Kafka side of :class:`detector.worker.app.Runtime`.

For what a broker cannot show quickly: hours of wall clock (``WallClock``), a worker replaced
twice in the middle of re-processing, a stop in the middle of live traffic. The Kafka tests
under ``tests/integration`` check the same runtime against a real broker.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiokafka import TopicPartition  # type: ignore[import-untyped]

from detector.engine import Engine
from detector.worker.app import Forward, Runtime, WorkerTopics
from detector.worker.config import KafkaSettings
from detector.worker.snapshots import SOURCE_PARTITION_HEADER, SOURCE_TOPIC_HEADER, Snapshot


@dataclass
class Rec:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]] = field(default_factory=list)


class Broker:
    """Topics of one partition each (whatever partition a record asks for)."""

    def __init__(self) -> None:
        self.logs: dict[str, list[Rec]] = {}

    def append(
        self, topic: str, key: bytes | None, value: bytes, headers: list[tuple[str, bytes]] | None = None
    ) -> Rec:
        log = self.logs.setdefault(topic, [])
        log.append(Rec(topic, 0, len(log), key, value, list(headers or [])))
        return log[-1]

    def values(self, topic: str) -> list[dict[str, Any]]:
        return [json.loads(r.value) for r in self.logs.get(topic, [])]


class FakeTopic:
    def __init__(self, broker: Broker, name: str) -> None:
        self.broker, self.name = broker, name

    async def maybe_declare(self) -> None:
        pass

    async def send(
        self, key: bytes | None = None, value: bytes = b"", headers: Any = None, partition: int | None = None
    ) -> asyncio.Future[None]:
        self.broker.append(self.name, key, value, headers)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done


class FakeReader:
    """The state and alerts topics as :class:`detector.worker.snapshots.StateReader` reads them."""

    def __init__(self, broker: Broker, k: KafkaSettings) -> None:
        self.broker, self.k = broker, k

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def partitions(self, topic: str) -> list[TopicPartition]:
        return [TopicPartition(topic, 0)]

    async def end_offsets(self, topic: str) -> dict[int, int]:
        return {0: len(self.broker.logs.get(topic, []))}

    async def latest(self, by_state: Mapping[Any, Any]) -> dict[str, Snapshot]:
        wanted = {key for keys in by_state.values() for key in keys}
        found = {}
        for r in self.broker.logs.get(self.k.state_topic, []):
            assert r.key is not None
            if r.key.decode() in wanted:
                found[r.key.decode()] = Snapshot.decode(r.value)
        return found

    async def published_since(self, alerts_topic: str, since: Mapping[int, int], source: tuple[str, int]) -> set[str]:
        wanted = (source[0].encode(), str(source[1]).encode())
        ids = set()
        for r in self.broker.logs.get(alerts_topic, [])[since.get(0, 0) :]:
            headers = dict(r.headers)
            if (headers.get(SOURCE_TOPIC_HEADER), headers.get(SOURCE_PARTITION_HEADER)) == wanted:
                ids.add(json.loads(r.value)["alert_id"])
        return ids


def runtime(
    broker: Broker,
    k: KafkaSettings,
    topic: str,
    make_engine: Callable[[], Engine],
    forward: Forward | None = None,
    forwarded: bool = False,
) -> Runtime:
    topics = WorkerTopics(
        alerts=FakeTopic(broker, k.alerts_topic),
        dlq=FakeTopic(broker, k.dlq_topic),
        breakers=FakeTopic(broker, k.breakers_topic),
        state=FakeTopic(broker, k.state_topic),
    )
    reader: Any = FakeReader(broker, k)
    return Runtime(k, topic, topics, make_engine, reader, forward=forward, forwarded=forwarded)


async def feed(rt: Runtime, topic: str, records: list[Rec], batch: int = 500) -> None:
    tp = TopicPartition(topic, 0)
    for i in range(0, len(records), batch):
        await rt.process({tp: records[i : i + batch]})
    await rt.settle()
