"""Real-broker check: the test Kafka from deploy/kafka works with aiokafka (+ its C extension).

Uses $KAFKA_BOOTSTRAP when set (a broker someone else runs); otherwise starts its own broker
with deploy/kafka/kafka.sh on 127.0.0.1:19192 (controller 19193, run dir in tmp_path) and
stops it afterwards.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import uuid
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.integration

KAFKA_SH = Path(__file__).resolve().parents[2] / "deploy" / "kafka" / "kafka.sh"
OWN_PORT = 19192  # distinct from the default 19092 of `make kafka-up`


def aiokafka_c_extension_in_use() -> bool:
    from aiokafka import util
    from aiokafka.record import default_records, legacy_records, memory_records

    # The record modules silently fall back to pure Python when the compiled modules are
    # missing or AIOKAFKA_NO_EXTENSIONS is set; check what they actually export.
    classes = (
        default_records.DefaultRecordBatchBuilder,
        default_records.DefaultRecordBatch,
        legacy_records.LegacyRecordBatchBuilder,
        memory_records.MemoryRecords,
    )
    return not util.NO_EXTENSIONS and all(c.__module__.startswith("aiokafka.record._crecords.") for c in classes)


@pytest.fixture
def bootstrap(tmp_path: Path) -> Iterator[str]:
    external = os.environ.get("KAFKA_BOOTSTRAP")
    if external:
        yield external
        return
    # No skip without Java: a missing broker must fail the run, not hide the Kafka tests.
    assert shutil.which("java") or os.environ.get("JAVA_HOME"), "need Java 17 (or KAFKA_BOOTSTRAP) for Kafka tests"
    env = {
        **os.environ,
        "KAFKA_PORT": str(OWN_PORT),
        "KAFKA_CONTROLLER_PORT": str(OWN_PORT + 1),
        "KAFKA_RUN_DIR": str(tmp_path / "kafka"),
    }
    try:
        up = subprocess.run(["bash", str(KAFKA_SH), "up"], env=env, capture_output=True, text=True, timeout=300)
        assert up.returncode == 0, f"kafka.sh up failed:\n{up.stderr}"
        yield up.stdout.strip().splitlines()[-1]
    finally:
        subprocess.run(["bash", str(KAFKA_SH), "down"], env=env, capture_output=True, timeout=120)


def test_aiokafka_c_extension_available() -> None:
    assert aiokafka_c_extension_in_use(), "aiokafka runs without its C record extension"


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
def test_broker_roundtrip_keyed_order(bootstrap: str) -> None:
    assert aiokafka_c_extension_in_use()
    asyncio.run(_roundtrip(bootstrap))
