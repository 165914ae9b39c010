"""``detector bench kafka``: one worker on a real broker, against raw aiokafka, and alert latency.

Four measurements in one run, on one local broker (``--bootstrap``, else ``$KAFKA_BOOTSTRAP``,
else one started with ``deploy/kafka/kafka.sh up`` on 127.0.0.1:19392 and stopped at the end):

* **raw consume**: simulated fleet traffic (the same as ``bench replay``: seed 11) is produced
  to a fresh topic, keyed by ``api_key_id``; an aiokafka consumer (no group, all partitions
  assigned) reads the whole topic and only counts the messages. Best of ``--repeat``.
* **worker**: the real ``detector worker`` (a subprocess, settings by ``STORMWATCH_KAFKA__*``,
  a fresh group) drains that pre-filled topic. It logs its summary (``events=N ...``) every
  0.5 s; each line is stamped when it arrives here, and an event counts as done when the end
  of the pipeline has it (the by-team stage, when the worker repartitions). The **steady** rate
  is measured between the first lines with 1% and with 99% of the events done: neither the
  start-up (process start, group join, first fetch) nor the end of the drain is in it. The end
  is not throughput: the by-team stage holds the last few dozen events of a backlog until the
  usage partitions behind them have been silent for ``kafka.align_wait_seconds`` (3 s; see
  :mod:`detector.worker.align`). The **whole drain** rate, from the first line with events done
  to the line with all of them, has both in it. The time until the group's committed offsets
  reach the end offsets is reported beside them, start-up included.
* **in memory**: the same events, no Kafka, in this process: decoded only, and decoded and run
  through one engine of the default settings (the replay's: the least detection a worker does
  per event, since it runs a key and a team stage). No worker can beat the second figure, so
  its ratio to the raw consume rate is the ceiling of the worker's. Best of ``--repeat``.
* **alert latency**: a second worker on fresh, empty topics; then events are produced at a
  steady ``--rate`` (10,000/s) for ``--seconds``, each with ``timestamp`` = the wall-clock
  time it was handed to the producer, so event time *is* produce time. The stream is normal
  traffic over 1,000 keys plus, every 0.2 s, a retry storm starting on a fresh key of its own
  team (20 failing attempts/s for 12 s; one team each, as the incident book folds a team's
  storms into one incident), so retry_storm alerts keep coming. The engine judges on
  5-second event-time ticks: an alert with ``detected_at = T`` was made due by the first
  event with ``timestamp >= T``. Its latency is the wall time the alert record was read from
  the alerts topic minus that event's produce time (taken from the list of produce times;
  an upper bound when events of another partition carried the worker past ``T`` later).
  Alerts the idle clock brings out after the stream stops are left out.

The C record extension of aiokafka is checked and reported: without it throughput drops
several times (``AIOKAFKA_NO_EXTENSIONS=1`` or a build without a compiler).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import gzip
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition  # type: ignore[import-untyped]
from aiokafka.admin import AIOKafkaAdminClient, NewTopic  # type: ignore[import-untyped]
from rich.console import Console
from rich.table import Table

from detector.bench import in_memory
from detector.worker.aiokafka_check import c_extension_in_use

KAFKA_SH = Path(__file__).resolve().parents[1] / "deploy" / "kafka" / "kafka.sh"
BENCH_PORT = 19392  # distinct from 19092 (make kafka-up), 19192 and 19292 (tests)
SUMMARY_EVERY = 0.5  # seconds between the worker's summary lines while benchmarking
STEADY = (0.01, 0.99)  # the share of events done where the worker's rate is measured from, and to
TARGET_EVENTS_PER_S = 50_000.0
TARGET_RAW_RATIO = 0.5
TARGET_P99_MS = 1000.0


# -- broker and clients ------------------------------------------------------------------------


def _port_open(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        return True
    return False


@contextlib.contextmanager
def broker(bootstrap: str | None, console: Console) -> Iterator[str]:
    """``bootstrap`` or ``$KAFKA_BOOTSTRAP``; else a private broker from ``deploy/kafka/kafka.sh``."""
    given = bootstrap or os.environ.get("KAFKA_BOOTSTRAP")
    if given:
        yield given
        return
    if not KAFKA_SH.exists():
        raise SystemExit(f"no broker: pass --bootstrap or set KAFKA_BOOTSTRAP ({KAFKA_SH} is not here)")
    run_dir = tempfile.mkdtemp(prefix="stormwatch-bench-kafka-")
    taken = any(_port_open(port) for port in (BENCH_PORT, BENCH_PORT + 1))
    env = {**os.environ, "KAFKA_PORT": "0" if taken else str(BENCH_PORT), "KAFKA_RUN_DIR": run_dir}  # 0: any free
    env.pop("KAFKA_CONTROLLER_PORT", None)
    try:
        with console.status("starting a broker (deploy/kafka/kafka.sh up) ..."):
            up = subprocess.run(["bash", str(KAFKA_SH), "up"], env=env, capture_output=True, text=True, timeout=300)
        if up.returncode != 0:
            raise SystemExit(f"kafka.sh up failed:\n{up.stderr}")
        address = up.stdout.strip().splitlines()[-1]
        console.print(f"broker: {address} (started here, run dir {run_dir})")
        yield address
    finally:
        subprocess.run(["bash", str(KAFKA_SH), "down"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(run_dir, ignore_errors=True)


async def create_topics(bootstrap: str, names: list[str], partitions: int) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(n, num_partitions=partitions, replication_factor=1) for n in names])
    finally:
        await admin.close()


async def delete_topics(bootstrap: str, names: list[str]) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        gone = [n for n in names if n in existing]
        if gone:
            await admin.delete_topics(gone)
    finally:
        await admin.close()


async def produce(bootstrap: str, topic: str, records: list[tuple[bytes, bytes]]) -> float:
    """Send every record (keyed, so the default partitioner spreads keys); seconds until all are acked."""
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks=1, linger_ms=20, max_batch_size=512 * 1024, max_request_size=8 * 2**20
    )
    await producer.start()
    try:
        t0 = time.perf_counter()
        send = producer.send
        for key, value in records:
            await send(topic, value=value, key=key)
        await producer.flush()
        return time.perf_counter() - t0
    finally:
        await producer.stop()


async def raw_consume(bootstrap: str, topic: str, partitions: int, expected: int) -> float:
    """Read the whole topic with a plain aiokafka consumer (no group), only counting: seconds."""
    tps = [TopicPartition(topic, p) for p in range(partitions)]
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest")
    await consumer.start()
    try:
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        t0 = time.perf_counter()
        n = 0
        async with asyncio.timeout(120):
            while n < expected:
                for records in (await consumer.getmany(timeout_ms=500)).values():
                    n += len(records)
        return time.perf_counter() - t0
    finally:
        await consumer.stop()


async def committed_total(bootstrap: str, group: str, topic: str) -> int:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(group)
    finally:
        await admin.close()
    return sum(meta.offset for tp, meta in offsets.items() if tp.topic == topic and meta.offset > 0)


# -- the worker ----------------------------------------------------------------------------------


@dataclass
class Topics:
    """Fresh names for every ``*_topic`` setting of the worker, and a fresh consumer group."""

    names: dict[str, str]  # KafkaSettings field -> topic name
    group: str

    @classmethod
    def fresh(cls, name: str) -> Topics:
        from detector.worker.config import KafkaSettings

        p = f"bench-{name}-{uuid.uuid4().hex[:8]}"
        fields = [f for f in KafkaSettings.model_fields if f.endswith("_topic")]
        return cls({f: f"{p}.{f.removesuffix('_topic')}" for f in fields}, f"{p}-group")

    @property
    def usage(self) -> str:
        return self.names["usage_topic"]

    @property
    def alerts(self) -> str:
        return self.names["alerts_topic"]

    def all(self) -> list[str]:
        return list(self.names.values())


@dataclass
class Worker:
    """``detector worker`` in a subprocess; its log lines are kept with the monotonic time they arrived."""

    proc: subprocess.Popen[str]
    started: float
    lines: list[tuple[float, str]] = field(default_factory=list)

    @classmethod
    def start(
        cls, bootstrap: str, topics: Topics, workdir: Path, partitions: int, settings: Mapping[str, str] | None = None
    ) -> Worker:
        kafka: dict[str, object] = {
            **(settings or {}),
            "bootstrap_servers": bootstrap,
            **topics.names,
            "group_id": topics.group,
            "partitions": partitions,
            "data_dir": workdir / "faust-data",
            "summary_every_seconds": SUMMARY_EVERY,
        }
        env = {k: v for k, v in os.environ.items() if not k.startswith("STORMWATCH_")}
        env |= {f"STORMWATCH_KAFKA__{k.upper()}": str(v) for k, v in kafka.items()}
        env["PYTHONUNBUFFERED"] = "1"
        started = time.monotonic()
        proc = subprocess.Popen(
            [sys.executable, "-m", "detector.cli", "worker"],
            env=env,
            cwd=workdir,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        worker = cls(proc, started)
        threading.Thread(target=worker._read, daemon=True).start()
        return worker

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append((time.monotonic(), line.rstrip("\n")))

    def tail(self, n: int = 30) -> str:
        return "\n".join(line for _, line in self.lines[-n:])

    async def wait_for(self, text: str, timeout: float) -> float:
        """Monotonic arrival time of the first log line containing ``text``."""
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            for t, line in self.lines[seen:]:
                if text in line:
                    return t
            seen = len(self.lines)
            if self.proc.poll() is not None:
                raise RuntimeError(f"the worker exited ({self.proc.returncode}):\n{self.tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"no log line with {text!r} within {timeout:.0f} s:\n{self.tail()}")
            await asyncio.sleep(0.02)

    def summaries(self) -> list[tuple[float, dict[str, str]]]:
        """(arrival time, fields) of every summary line so far (``stormwatch: events=N rejected=N ...``)."""
        out = []
        for t, line in self.lines:
            if "stormwatch: events=" in line:
                usage, _, team = line.split("stormwatch: ", 1)[1].partition(" | by team: ")
                fields = dict(kv.split("=", 1) for kv in usage.split() if "=" in kv)
                fields |= {f"team_{k}": v for k, v in (kv.split("=", 1) for kv in team.split() if "=" in kv)}
                out.append((t, fields))
        return out

    def counts(self) -> list[tuple[float, int]]:
        """(arrival time, events + rejected) of every summary line so far, at the end of the pipeline.

        With the by-team repartition an event is done when the by-team stage has it too.
        """
        return [(t, int(f.get("team_events", f["events"])) + int(f["rejected"])) for t, f in self.summaries()]

    def last_summary(self) -> str:
        return next((line for _, line in reversed(self.lines) if "stormwatch: events=" in line), "")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


async def worker_throughput(
    bootstrap: str,
    topics: Topics,
    total: int,
    partitions: int,
    workdir: Path,
    console: Console,
    settings: Mapping[str, str] | None = None,
) -> dict[str, float]:
    """Start a worker on the pre-filled usage topic; events/s while it drains it (see the module doc)."""
    worker = Worker.start(bootstrap, topics, workdir, partitions, settings)
    try:
        t_assigned = await worker.wait_for("stormwatch: assigned", timeout=60)
        deadline = time.monotonic() + max(120.0, total / 2_000)
        while not (counts := worker.counts()) or counts[-1][1] < total:
            if worker.proc.poll() is not None:
                raise RuntimeError(f"the worker exited ({worker.proc.returncode}):\n{worker.tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the worker did not process {total:,} events in time:\n{worker.tail()}")
            await asyncio.sleep(0.05)
        t_done = counts[-1][0]
        committed_at = None
        while time.monotonic() < t_done + 15:
            if await committed_total(bootstrap, topics.group, topics.usage) >= total:
                committed_at = time.monotonic()
                break
            await asyncio.sleep(0.1)
        last = worker.summaries()[-1][1]
    finally:
        code = worker.stop()
    label = " ".join(f"{k}={v}" for k, v in (settings or {}).items()) or "default settings"
    console.print(f"throughput worker ({label}): {worker.last_summary().split('stormwatch: ', 1)[-1]}", highlight=False)
    lo, hi = (next((t, n) for t, n in counts if n >= total * share) for share in STEADY)
    if hi[0] - lo[0] < 4 * SUMMARY_EVERY:
        raise RuntimeError(f"too few summary lines in the steady window ({lo} to {hi}); use more events")
    first = next(t for t, n in counts if n > 0)
    if code != 0:
        console.print(f"[yellow]the worker exited with {code}[/]:\n{worker.tail(10)}")
    return {
        "worker_events_per_s": (hi[1] - lo[1]) / (hi[0] - lo[0]),
        "worker_drain_events_per_s": total / (t_done - first),
        "worker_measured_events": float(hi[1] - lo[1]),
        "worker_measured_s": hi[0] - lo[0],
        "worker_start_to_assigned_s": t_assigned - worker.started,
        "worker_start_to_first_events_s": first - worker.started,
        "worker_start_to_all_processed_s": t_done - worker.started,
        "worker_start_to_all_committed_s": (committed_at - worker.started) if committed_at else float("nan"),
        "worker_alerts": float(last.get("alerts", "nan")) + float(last.get("team_alerts", 0)),
        "worker_late_events": float(last.get("late", "nan")),
        "worker_team_late_events": float(last.get("team_late", "nan")),
    }


# -- alert latency -------------------------------------------------------------------------------


STORM_EVERY = 0.2  # s between storm starts
STORM_RATE = 20.0  # failing attempts per second per storm
STORM_SECONDS = 12.0
NORMAL_KEYS = 1000


def _event(i: int, ts: float, key: str, team: str, storm: bool) -> bytes:
    stamp = datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")
    ev: dict[str, Any] = {
        "event_id": f"bench-{i}",
        "timestamp": stamp,
        "team": team,
        "api_key_id": key,
        "provider": "openai",
        "model": "gpt-4o-mini",
        "operation": "chat",
        "input_tokens": 800 + i % 400,
        "output_tokens": 0 if storm else 50 + i % 250,
        "status": "rate_limited" if storm else "ok",
    }
    if storm:
        ev |= {"http_status": 429, "retry_attempt": i % 40 + 1, "cost_usd": 0.0}
    return orjson.dumps(ev)


async def paced_stream(bootstrap: str, topic: str, rate: float, seconds: float) -> tuple[list[float], float]:
    """Produce ``rate`` events/s for ``seconds``, event time = produce time.

    Returns every produce time, and the CPU seconds this process spent meanwhile (it shares the
    machine with the worker and the broker).
    """
    cpu0 = time.process_time()
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks=1, linger_ms=0)
    await producer.start()
    sent: list[float] = []
    storm_sent: dict[int, int] = {}
    try:
        t0 = time.time()
        i = 0
        while (elapsed := time.time() - t0) < seconds:
            want = int(rate * elapsed) - len(sent)
            batch: list[tuple[str, str, bool]] = []
            for s in range(int(elapsed / STORM_EVERY) + 1):
                start = s * STORM_EVERY
                if elapsed - start > STORM_SECONDS:
                    continue
                due = int(STORM_RATE * (elapsed - start)) - storm_sent.get(s, 0)
                if due > 0:
                    storm_sent[s] = storm_sent.get(s, 0) + due
                    batch += [(f"bench-storm-{s}", f"storm-team-{s}", True)] * due  # a team each: an incident each
            for k in range(len(batch), want):
                j = (i + k) % NORMAL_KEYS
                batch.append((f"bench-key-{j}", f"team-{j % 8}", False))
            for key, team, storm in batch:
                ts = time.time()
                await producer.send(topic, value=_event(i, ts, key, team, storm), key=key.encode())
                sent.append(ts)
                i += 1
            await asyncio.sleep(0.002)
        await producer.flush()
    finally:
        await producer.stop()
    return sent, time.process_time() - cpu0


async def collect_alerts(bootstrap: str, topic: str, stop: asyncio.Event) -> list[tuple[float, bytes]]:
    """Every record of the alerts topic with the wall time it was read, until ``stop`` is set."""
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", fetch_max_wait_ms=20, metadata_max_age_ms=500
    )
    await consumer.start()
    got: list[tuple[float, bytes]] = []
    try:
        while not stop.is_set():
            batches = await consumer.getmany(timeout_ms=50)
            now = time.time()
            got += [(now, r.value) for records in batches.values() for r in records]
    finally:
        await consumer.stop()
    return got


async def alert_latency(
    bootstrap: str, rate: float, seconds: float, partitions: int, workdir: Path, console: Console
) -> dict[str, float]:
    topics = Topics.fresh("latency")
    await create_topics(bootstrap, [topics.usage, topics.alerts], partitions)
    worker = Worker.start(bootstrap, topics, workdir, partitions)
    try:
        await worker.wait_for("stormwatch: assigned", timeout=60)
        stop = asyncio.Event()
        collector = asyncio.create_task(collect_alerts(bootstrap, topics.alerts, stop))
        await asyncio.sleep(1.0)  # the alerts consumer has its assignment
        sent, cpu = await paced_stream(bootstrap, topics.usage, rate, seconds)
        ended = time.monotonic()
        # Wait until the worker has processed everything (bounded), so that the alerts of a worker
        # that fell behind are counted too, then a little longer for the last ones to arrive.
        while time.monotonic() < ended + 30 and not [n for t, n in worker.counts() if n >= len(sent)]:
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.0)
        stop.set()
        alerts = await collector
        counts = worker.counts()
    finally:
        worker.stop()
        console.print(f"latency worker: {worker.last_summary().split('stormwatch: ', 1)[-1]}", highlight=False)
        await delete_topics(bootstrap, topics.all())
    latencies = []
    seen: set[str] = set()
    for received, raw in alerts:
        alert = orjson.loads(raw)
        if alert["alert_id"] in seen:
            continue
        seen.add(alert["alert_id"])
        detected = datetime.fromisoformat(alert["detected_at"].replace("Z", "+00:00")).timestamp()
        k = bisect.bisect_left(sent, detected)
        if k < len(sent):  # else the idle clock brought it out after the stream stopped
            latencies.append(received - sent[k])
    latencies.sort()
    achieved = len(sent) / (sent[-1] - sent[0]) if len(sent) > 1 else 0.0
    # The worker's backlog when the stream stopped: from its first summary line after that.
    lag = next((len(sent) - n for t, n in counts if t >= ended), float("nan"))
    caught_up = next((t - ended for t, n in counts if n >= len(sent)), float("nan"))
    processed = counts[-1][1] if counts else 0
    if processed < len(sent):
        console.print(f"[yellow]the latency worker processed only {processed:,} of {len(sent):,} events[/]")
    if not latencies:
        raise RuntimeError(f"no alerts within the stream ({len(alerts)} records in all):\n{worker.tail()}")

    def q(p: float) -> float:
        return latencies[min(len(latencies) - 1, round(p * (len(latencies) - 1)))] * 1000

    return {
        "latency_rate_events_per_s": achieved,
        "latency_events": float(len(sent)),
        "latency_alerts": float(len(latencies)),
        "latency_p50_ms": q(0.50),
        "latency_p99_ms": q(0.99),
        "latency_max_ms": latencies[-1] * 1000,
        "latency_backlog_at_stream_end": float(lag),
        "latency_caught_up_after_s": caught_up,
        "latency_producer_cpu_share": cpu / seconds,
    }


# -- the benchmark ---------------------------------------------------------------------------------


def records_of(events: Path | None, console: Console) -> list[tuple[bytes, bytes]]:
    """(api_key_id, JSON line) of the events file, or of a simulated day (seed 11) after a day of warm-up."""
    if events is None:
        from detector.simulate import SimulationSpec, iter_events

        with console.status("simulating half a day of traffic after half a day of warm-up ..."):
            spec = SimulationSpec(seed=11, days=0.5, warmup_hours=12.0)
            return [(ev["api_key_id"].encode(), orjson.dumps(ev)) for ev in iter_events(spec)]
    opener = gzip.open if events.suffix == ".gz" else open
    with opener(events, "rb") as fh:
        lines = [line.rstrip(b"\n") for line in fh if line.strip()]
    return [(str(orjson.loads(line).get("api_key_id", "")).encode(), line) for line in lines]


async def _run(
    bootstrap: str,
    records: list[tuple[bytes, bytes]],
    repeat: int,
    partitions: int,
    rate: float,
    seconds: float,
    workdir: Path,
    console: Console,
    variants: Sequence[Mapping[str, str]],
) -> dict[str, float]:
    n = len(records)
    topics = Topics.fresh("throughput")
    await create_topics(bootstrap, [topics.usage], partitions)
    try:
        with console.status(f"producing {n:,} events to {topics.usage} ({partitions} partitions) ..."):
            t_produce = await produce(bootstrap, topics.usage, records)
        with console.status(f"raw aiokafka consume, best of {repeat} ..."):
            t_raw = min([await raw_consume(bootstrap, topics.usage, partitions, n) for _ in range(repeat)])
        with console.status("detector worker draining the topic ..."):
            figures = await worker_throughput(bootstrap, topics, n, partitions, workdir, console)
        for i, settings in enumerate(variants, start=1):
            other = Topics.fresh(f"throughput-{i}")
            other.names["usage_topic"] = topics.usage  # the same events, a fresh group and fresh other topics
            try:
                with console.status(f"detector worker with {settings} draining the topic ..."):
                    f = await worker_throughput(bootstrap, other, n, partitions, workdir, console, settings)
            finally:
                await delete_topics(bootstrap, [t for t in other.all() if t != topics.usage])
            figures[f"variant_{i}_events_per_s"] = f["worker_events_per_s"]
    finally:
        await delete_topics(bootstrap, topics.all())
    with console.status(f"alert latency: {rate:,.0f} events/s for {seconds:g} s through a live worker ..."):
        figures |= await alert_latency(bootstrap, rate, seconds, partitions, workdir, console)
    with console.status(f"the same events in memory, no Kafka: decode, and decode + detect, best of {repeat} ..."):
        t_decode, t_detect = in_memory([line for _, line in records], repeat)
    return {
        "events": float(n),
        "produce_events_per_s": n / t_produce,
        "raw_consume_events_per_s": n / t_raw,
        **figures,
        "worker_vs_raw": figures["worker_events_per_s"] * t_raw / n,
        "decode_events_per_s": n / t_decode,
        "detect_events_per_s": n / t_detect,
    }


def kafka(
    bootstrap: str | None,
    events: Path | None,
    repeat: int,
    partitions: int,
    rate: float,
    seconds: float,
    console: Console,
    variants: Sequence[Mapping[str, str]] = (),
) -> dict[str, float]:
    """Run the three measurements and print them; returns the figures."""
    c_ext = c_extension_in_use()
    if c_ext:
        console.print("aiokafka C extension: in use")
    else:
        console.print("[bold red]aiokafka C extension: NOT in use[/] (pure-Python records: several times slower)")
    records = records_of(events, console)
    workdir = Path(tempfile.mkdtemp(prefix="stormwatch-bench-worker-"))
    try:
        with broker(bootstrap, console) as address:
            f = asyncio.run(_run(address, records, repeat, partitions, rate, seconds, workdir, console, variants))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    f["aiokafka_c_extension"] = float(c_ext)
    n = int(f["events"])

    def mark(ok: bool) -> str:
        return "[green]yes[/]" if ok else "[red]no[/]"

    table = Table(title=f"one worker on a local broker, {n:,} events, {partitions} partitions", title_justify="left")
    for column in ("measurement", "figure", "vs raw", "target", "met"):
        table.add_column(column, justify="left" if column == "measurement" else "right")
    table.add_row("produce (keyed, acks=1)", f"{f['produce_events_per_s']:,.0f}/s", "", "", "")
    table.add_row("raw aiokafka consume", f"{f['raw_consume_events_per_s']:,.0f}/s", "1.00", "", "")
    table.add_row(
        "detector worker, steady (1-99%)",
        f"{f['worker_events_per_s']:,.0f}/s",
        f"{f['worker_vs_raw']:.3f}",
        f"{TARGET_EVENTS_PER_S:,.0f}/s, {TARGET_RAW_RATIO}",
        mark(f["worker_events_per_s"] >= TARGET_EVENTS_PER_S and f["worker_vs_raw"] >= TARGET_RAW_RATIO),
    )
    drain = f["worker_drain_events_per_s"]
    table.add_row(
        "detector worker, whole drain", f"{drain:,.0f}/s", f"{drain / f['raw_consume_events_per_s']:.3f}", "", ""
    )
    for i, settings in enumerate(variants, start=1):
        rate_i = f[f"variant_{i}_events_per_s"]
        label = " ".join(f"{k}={v}" for k, v in settings.items())
        ratio = rate_i / f["raw_consume_events_per_s"]
        table.add_row(f"detector worker, steady, {label}", f"{rate_i:,.0f}/s", f"{ratio:.3f}", "", "")
    raw = f["raw_consume_events_per_s"]
    for key, label in (("decode_events_per_s", "decode only"), ("detect_events_per_s", "decode + detect")):
        table.add_row(f"no Kafka: {label}", f"{f[key]:,.0f}/s", f"{f[key] / raw:.3f}", "", "")
    live = f"{f['latency_rate_events_per_s']:,.0f}/s"
    table.add_row(f"alert latency p50 at {live}", f"{f['latency_p50_ms']:,.0f} ms", "", "", "")
    table.add_row(
        f"alert latency p99 at {live}",
        f"{f['latency_p99_ms']:,.0f} ms",
        "",
        f"{TARGET_P99_MS:,.0f} ms",
        mark(f["latency_p99_ms"] <= TARGET_P99_MS),
    )
    console.print(table)
    console.print(
        f"worker: assigned {f['worker_start_to_assigned_s']:.1f} s after process start, first events at "
        f"{f['worker_start_to_first_events_s']:.1f} s, all {n:,} processed at "
        f"{f['worker_start_to_all_processed_s']:.1f} s, committed at {f['worker_start_to_all_committed_s']:.1f} s; "
        f"steady rate measured over {f['worker_measured_events']:,.0f} events in {f['worker_measured_s']:.1f} s",
        highlight=False,
    )
    console.print(
        f"latency stream: {f['latency_events']:,.0f} events, {f['latency_alerts']:.0f} alerts; "
        f"the worker's backlog when it stopped: "
        f"{f['latency_backlog_at_stream_end']:,.0f} events, caught up {f['latency_caught_up_after_s']:.1f} s later; "
        f"max latency {f['latency_max_ms']:,.0f} ms; producing took {f['latency_producer_cpu_share']:.0%} "
        f"of a core of this {os.cpu_count()}-core machine",
        highlight=False,
    )
    return f
