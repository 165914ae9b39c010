"""Real-broker check: the test Kafka from deploy/kafka works with aiokafka (+ its C extension).

Runs against the session broker of conftest.py ($KAFKA_BOOTSTRAP, or one started with
deploy/kafka/kafka.sh).
"""

from __future__ import annotations

import asyncio
import uuid
from collections import defaultdict
from typing import Any

import pytest

from detector.worker.aiokafka_check import c_extension_in_use

pytestmark = pytest.mark.integration


def test_aiokafka_c_extension_available() -> None:
    assert c_extension_in_use(), "aiokafka runs without its C record extension"


async def _roundtrip(bootstrap: str, n: int = 100, keys: int = 10) -> None:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    topic = f"it-broker-{uuid.uuid4().hex[:8]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, num_partitions=3, replication_factor=1)])

        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True, linger_ms=5)
        await producer.start()
        try:
            futs = [
                await producer.send(topic, key=f"k{i % keys}".encode(), value=f"k{i % keys}:{i // keys}".encode())
                for i in range(n)
            ]
            metas = await asyncio.gather(*futs)
            assert producer.client.cluster.partitions_for_topic(topic) == {0, 1, 2}
        finally:
            await producer.stop()

        consumer = AIOKafkaConsumer(
            topic,
            bootstrap_servers=bootstrap,
            group_id=f"{topic}-g",
            auto_offset_reset="earliest",
            enable_auto_commit=False,
        )
        await consumer.start()
        got: list[Any] = []
        try:
            async with asyncio.timeout(60):
                while len(got) < n:
                    for records in (await consumer.getmany(timeout_ms=1000)).values():
                        got.extend(records)
        finally:
            await consumer.stop()

        await admin.delete_topics([topic])
    finally:
        await admin.close()

    assert len(got) == n
    assert len({m.partition for m in metas}) > 1, "keys should spread over several partitions"
    seqs: dict[bytes, list[int]] = defaultdict(list)
    partitions: dict[bytes, set[int]] = defaultdict(set)
    for r in got:
        key, seq = r.value.decode().split(":")
        assert r.key == key.encode()
        seqs[r.key].append(int(seq))
        partitions[r.key].add(r.partition)
    assert len(seqs) == keys
    for key, s in seqs.items():
        assert s == list(range(n // keys)), f"out of order for {key!r}: {s}"
        assert len(partitions[key]) == 1, f"{key!r} landed on several partitions"


@pytest.mark.timeout(300)
def test_broker_roundtrip_keyed_order(kafka_bootstrap: str) -> None:
    assert c_extension_in_use()
    asyncio.run(_roundtrip(kafka_bootstrap))
