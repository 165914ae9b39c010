"""Smoke check for the test broker started by deploy/kafka/kafka.sh.

    deploy/kafka/kafka.sh up
    .venv/bin/python deploy/kafka/smoke.py [BOOTSTRAP]

BOOTSTRAP defaults to $KAFKA_BOOTSTRAP, else 127.0.0.1:$KAFKA_PORT (19092).

Creates a topic with AIOKafkaAdminClient, produces N messages, consumes them back in a
consumer group (committing offsets), deletes the topic, and checks that aiokafka runs
its C record extension. Exit 0 on success. Not a pytest module on purpose.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
import uuid

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from detector.worker.aiokafka_check import c_extension_in_use


async def main(bootstrap: str, n: int = 1000) -> None:
    topic = f"smoke-{uuid.uuid4().hex[:8]}"

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, num_partitions=3, replication_factor=1)])
        assert topic in await admin.list_topics(), "topic not listed after create"
    finally:
        await admin.close()

    sent = {f"msg-{i}".encode() for i in range(n)}
    t0 = time.perf_counter()
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    await producer.start()
    try:
        futs = [await producer.send(topic, key=str(i % 10).encode(), value=f"msg-{i}".encode()) for i in range(n)]
        metas = await asyncio.gather(*futs)
    finally:
        await producer.stop()
    partitions = {m.partition for m in metas}
    t_produce = time.perf_counter() - t0

    t0 = time.perf_counter()
    got: list[bytes] = []
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=f"{topic}-group",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    try:
        async with asyncio.timeout(60):
            while len(got) < n:
                batches = await consumer.getmany(timeout_ms=1000)
                for records in batches.values():
                    got.extend(r.value for r in records)
        await consumer.commit()
        committed = 0
        for tp in consumer.assignment():
            committed += (await consumer.committed(tp)) or 0
    finally:
        await consumer.stop()
    t_consume = time.perf_counter() - t0

    assert len(got) == n and set(got) == sent, f"got {len(got)} msgs, {len(set(got) & sent)} matching"
    assert committed == n, f"committed offsets sum {committed} != {n}"

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.delete_topics([topic])
    finally:
        await admin.close()

    print(
        f"ok: topic={topic} produced={n} to partitions={sorted(partitions)} in {t_produce:.2f}s, "
        f"consumed={len(got)} in {t_consume:.2f}s, committed={committed}, "
        f"c_extension={c_extension_in_use()}"
    )


if __name__ == "__main__":
    default = os.environ.get("KAFKA_BOOTSTRAP") or f"127.0.0.1:{os.environ.get('KAFKA_PORT', '19092')}"
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else default))
