"""Helpers for the worker's integration tests: fresh topics, produce, consume, a worker subprocess."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.partitioner import murmur2

from detector.events import UsageEvent
from detector.worker.config import KafkaSettings
from tests.conftest import make_event

REPO = Path(__file__).resolve().parents[2]


# -- traffic -----------------------------------------------------------------------------------


def record(ev: UsageEvent) -> tuple[bytes, bytes]:
    return ev.api_key_id.encode(), ev.model_dump_json().encode()


# -- topics and clients ------------------------------------------------------------------------


@dataclass(frozen=True)
class Topics:
    """Unique topic and group names for one test, and the worker environment that uses them."""

    usage: str
    alerts: str
    dlq: str
    breakers: str
    group: str

    @classmethod
    def fresh(cls, name: str) -> Topics:
        p = f"it-{name}-{uuid.uuid4().hex[:8]}"
        return cls(f"{p}.usage", f"{p}.alerts", f"{p}.usage.dlq", f"{p}.breakers", f"{p}-group")

    @property
    def by_team(self) -> str:
        """Where the workers forward usage events and findings by team (``kafka.by_team_topic``)."""
        return KafkaSettings(usage_topic=self.usage).by_team_topic

    def worker_env(self, bootstrap: str, data_dir: Path, **kafka: object) -> dict[str, str]:
        return {f"STORMWATCH_KAFKA__{k.upper()}": str(v) for k, v in self.kafka(bootstrap, data_dir, **kafka).items()}

    def kafka(self, bootstrap: str, data_dir: Path, **kafka: object) -> dict[str, object]:
        """The ``[kafka]`` settings of a worker on these topics."""
        return {
            "bootstrap_servers": bootstrap,
            "usage_topic": self.usage,
            "alerts_topic": self.alerts,
            "dlq_topic": self.dlq,
            "breakers_topic": self.breakers,
            "group_id": self.group,
            "data_dir": data_dir,
            "summary_every_seconds": 0.5,
            **kafka,
        }


async def create_topic(bootstrap: str, name: str, partitions: int) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, num_partitions=partitions, replication_factor=1)])
    finally:
        await admin.close()


async def topic_configs(bootstrap: str, names: Sequence[str]) -> dict[str, dict[str, str]]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        responses = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, n) for n in names])
        partitions = {t["topic"]: len(t["partitions"]) for t in await admin.describe_topics(list(names))}
    finally:
        await admin.close()
    out: dict[str, dict[str, str]] = {}
    for response in responses:
        for _error, _msg, _type, name, entries in response.resources:
            out[name] = {entry[0]: entry[1] for entry in entries}
            out[name]["partitions"] = str(partitions[name])
    return out


async def committed_and_end(bootstrap: str, group: str, topic: str) -> tuple[dict[int, int], dict[int, int]]:
    """The group's committed offset and the end offset, per partition of ``topic``."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        committed = await admin.list_consumer_group_offsets(group)
    finally:
        await admin.close()
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await consumer.start()
    try:
        mine = [tp.partition for tp in committed if tp.topic == topic]  # the group reads the by-team topic too
        ends = await consumer.end_offsets([TopicPartition(topic, p) for p in range(len(mine) or 1)])
    finally:
        await consumer.stop()
    return (
        {tp.partition: meta.offset for tp, meta in committed.items() if tp.topic == topic},
        {tp.partition: offset for tp, offset in ends.items()},
    )


async def produce(
    bootstrap: str,
    topic: str,
    records: Iterable[tuple[bytes | None, bytes]],
    headers: list[tuple[str, bytes]] | None = None,
) -> None:
    """Send ``(key, value)`` records to ``topic``, each with ``headers`` when given."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5, max_batch_size=256 * 1024)
    await producer.start()
    try:
        for key, value in records:
            await producer.send(topic, key=key, value=value, headers=headers)
        await producer.flush()
    finally:
        await producer.stop()


async def consume_until(
    bootstrap: str, topic: str, done: Callable[[list[ConsumerRecord[Any, Any]]], bool], timeout: float
) -> list[ConsumerRecord[Any, Any]]:
    """Read ``topic`` from the beginning (waiting for it to exist) until ``done(records)``."""
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", metadata_max_age_ms=300
    )
    await consumer.start()
    got: list[ConsumerRecord[Any, Any]] = []
    try:
        async with asyncio.timeout(timeout):
            while not done(got):
                for records in (await consumer.getmany(timeout_ms=200)).values():
                    got.extend(records)
    except TimeoutError:
        raise AssertionError(f"{topic}: condition not met within {timeout} s; got {len(got)} records") from None
    finally:
        await consumer.stop()
    return got


async def read_all(bootstrap: str, topic: str, timeout: float = 20.0) -> list[ConsumerRecord[Any, Any]]:
    """Everything in an existing topic up to its current end offsets."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        (described,) = await admin.describe_topics([topic])
    finally:
        await admin.close()
    assert described["error_code"] == 0, f"no topic {topic}: {described}"
    tps = [TopicPartition(topic, p["partition"]) for p in described["partitions"]]
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, auto_offset_reset="earliest")
    await consumer.start()
    got: list[ConsumerRecord[Any, Any]] = []
    try:
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        async with asyncio.timeout(timeout):
            while [tp for tp in tps if await consumer.position(tp) < ends[tp]]:
                for records in (await consumer.getmany(timeout_ms=200)).values():
                    got.extend(records)
    finally:
        await consumer.stop()
    return got


def cli_settings(monkeypatch: Any, bootstrap: str, **kafka: object) -> None:
    """The ``[kafka]`` settings of an in-process CLI call (``detector produce``, ``breaker``), by environment."""
    monkeypatch.delenv("STORMWATCH_CONFIG", raising=False)
    monkeypatch.setenv("STORMWATCH_KAFKA__BOOTSTRAP_SERVERS", bootstrap)
    for name, value in kafka.items():
        monkeypatch.setenv(f"STORMWATCH_KAFKA__{name.upper()}", str(value))


# -- the worker --------------------------------------------------------------------------------


class WorkerProcess:
    """``detector worker`` in a subprocess; its log lines are collected and can be awaited."""

    def __init__(self, env: dict[str, str], cwd: Path, args: Sequence[str] = ()) -> None:
        base = {k: v for k, v in os.environ.items() if not k.startswith("STORMWATCH_")}
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "detector.cli", "worker", *args],
            env={**base, "PYTHONUNBUFFERED": "1", **env},
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self._eof = False
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._eof = True
            self._changed.notify_all()

    def wait_for(self, pattern: str, timeout: float) -> re.Match[str]:
        """The first log line matching ``pattern``, waiting for it up to ``timeout`` seconds."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = 0
        with self._changed:
            while True:
                for line in self.lines[seen:]:
                    if m := regex.search(line):
                        return m
                seen = len(self.lines)
                left = deadline - time.monotonic()
                if self._eof or left <= 0:
                    why = "worker exited" if self._eof else f"not within {timeout} s"
                    raise AssertionError(f"no log line matching {pattern!r} ({why}):\n{self.tail()}")
                self._changed.wait(left)

    async def await_line(self, pattern: str, timeout: float) -> re.Match[str]:
        return await asyncio.to_thread(self.wait_for, pattern, timeout)

    def tail(self, n: int = 60) -> str:
        return "\n".join(self.lines[-n:])

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._reader.join(10)
        return self.proc.returncode


# -- workers of one test ------------------------------------------------------------------------


class Workers:
    """``detector worker`` subprocesses of one test, on the session broker."""

    def __init__(self, bootstrap: str, tmp_path: Path) -> None:
        self.bootstrap = bootstrap
        self.tmp_path = tmp_path
        self.running: list[WorkerProcess] = []

    def start(
        self, topics: Topics, config_file: bool = False, env: dict[str, str] | None = None, **kafka: object
    ) -> WorkerProcess:
        """Settings through STORMWATCH_KAFKA__* variables, or a ``[kafka]`` table with ``config_file``;
        ``env`` adds other variables (``STORMWATCH_WEB__API_TOKEN``, team budgets, ...)."""
        data_dir = self.tmp_path / "faust-data"
        settings_env: dict[str, str] = {}
        args: list[str] = []
        if config_file:
            table = topics.kafka(self.bootstrap, data_dir, **kafka)
            values = {k: v if isinstance(v, int | float) else str(v) for k, v in table.items()}
            config = self.tmp_path / "stormwatch.toml"
            config.write_text("[kafka]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items()))
            args = ["--config", str(config)]
        else:
            settings_env = topics.worker_env(self.bootstrap, data_dir, **kafka)
        self.running.append(WorkerProcess(settings_env | (env or {}), cwd=self.tmp_path, args=args))
        return self.running[-1]

    def stop_all(self) -> list[int]:
        codes = [worker.stop() for worker in self.running]
        for worker, code in zip(self.running, codes, strict=True):
            print(f"--- worker exit {code}, log tail:\n{worker.tail(25)}")
        self.running.clear()
        return codes


def firing_storm(records: list[Any]) -> bool:
    """Whether a retry_storm firing record is among ``records``."""
    return any(
        (a["kind"], a["status"]) == ("retry_storm", "firing") for a in map(json.loads, (r.value for r in records))
    )


def partition_of(key: str, partitions: int) -> int:
    """The usage partition of ``key`` (the Java client's and aiokafka's default partitioner)."""
    return (murmur2(key.encode()) & 0x7FFFFFFF) % partitions


def fleet(start: float, seconds: float, keys: list[str]) -> list[UsageEvent]:
    """Every key calling every 2 s, keys staggered so that event ids differ."""
    steps = int(seconds / 2)
    return [make_event(start + 2.0 * j + 0.1 * i, api_key_id=key) for j in range(steps) for i, key in enumerate(keys)]
