"""``detector produce``: usage events from a file onto the usage topic, to try a worker out.

Reads JSON Lines (a path, a ``.gz`` path or ``-``) and sends each line as it is, keyed by its
``api_key_id`` as the worker expects producers to key (see README, "Run it on Kafka"). A line
that is not an event goes too, without a key: the worker dead-letters it, which is how to see
the dead-letter topic at work. ``--rate`` paces the events (events per second of wall clock);
without it they go as fast as the broker takes them. The usage topic is created when missing,
with the partitions the worker would give it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from typing import Any

import orjson
from aiokafka import AIOKafkaProducer  # type: ignore[import-untyped]
from aiokafka.admin import NewTopic  # type: ignore[import-untyped]

from detector.replay import open_events
from detector.worker.config import KafkaSettings
from detector.worker.snapshots import client_options, create_missing_topics

IN_FLIGHT = 10_000  # sends not yet acknowledged before the next one waits


def key_of(line: bytes) -> bytes | None:
    """The line's ``api_key_id``, as the record key (None when the line is not a JSON object with one)."""
    try:
        event = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    key = event.get("api_key_id") if isinstance(event, dict) else None
    return key.encode() if isinstance(key, str) and key else None


async def produce(k: KafkaSettings, source: str, rate: float = 0.0) -> int:
    """Send every non-blank line of ``source`` to the usage topic; returns how many were sent."""
    await create_missing_topics(k, [NewTopic(k.usage_topic, k.partitions, k.replication_factor)])
    producer = AIOKafkaProducer(
        acks="all", enable_idempotence=True, linger_ms=10, max_batch_size=256 * 1024, **client_options(k)
    )
    await producer.start()
    sent, in_flight = 0, []
    start = time.monotonic()
    try:
        with open_events(source) as (lines, _):
            for line in lines:
                line = line.strip()
                if not line:
                    continue
                in_flight.append(await producer.send(k.usage_topic, value=line, key=key_of(line)))
                sent += 1
                if len(in_flight) >= IN_FLIGHT:
                    await _delivered(in_flight)
                if rate > 0 and (ahead := sent / rate - (time.monotonic() - start)) > 0:
                    await asyncio.sleep(ahead)
        await _delivered(in_flight)
    finally:
        await producer.stop()
    return sent


async def _delivered(in_flight: list[Awaitable[Any]]) -> None:
    await asyncio.gather(*in_flight)  # raises the first delivery that failed
    in_flight.clear()
