"""Benchmarks (``detector bench``): figures as ratios against a baseline taken in the same run.

* ``replay``: events/s of the full replay (decode, validate, detect, alert) against decoding
  and validating the same lines only, both from memory so disk speed is out of the picture.
  The machine is shared and noisy, so each measurement is repeated and the best kept.
* ``sessions``: peak and sampled RSS while replaying a stream of distinct agent sessions,
  to show that idle state is let go and memory stays flat.
"""

from __future__ import annotations

import gc
import gzip
import resource
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
from rich.console import Console
from rich.table import Table

from detector.engine import Engine
from detector.events import UsageEvent
from detector.replay import replay
from detector.wire import decode_usage


def _load_lines(events: Path | None, console: Console) -> list[bytes]:
    if events is None:
        from detector.simulate import SimulationSpec, write_simulation

        out = Path(tempfile.mkdtemp(prefix="stormwatch-bench-"))
        with console.status("simulating a day of traffic (after a day of warm-up) to replay ..."):
            events = write_simulation(SimulationSpec(seed=11, days=1.0, warmup_hours=24.0), out)["events"]
    opener = gzip.open if events.suffix == ".gz" else open
    with opener(events, "rb") as fh:
        return [line for line in fh if line.strip()]


def _best(repeat: int, run: object) -> float:
    assert callable(run)
    times = []
    for _ in range(repeat):
        gc.collect()
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return min(times)


def in_memory(lines: list[bytes], repeat: int) -> tuple[float, float]:
    """Seconds to decode ``lines``, and to replay them through the default engine (best of ``repeat``)."""
    validate = decode_usage

    def decode_only() -> None:
        for line in lines:
            validate(line)

    return _best(repeat, decode_only), _best(repeat, lambda: replay(lines, Engine.default()))


def throughput(events: Path | None, repeat: int, console: Console) -> dict[str, float]:
    lines = _load_lines(events, console)
    n = len(lines)
    contract = UsageEvent.model_validate_json

    def json_only() -> None:
        loads = orjson.loads
        for line in lines:
            loads(line)

    def pydantic_only() -> None:
        for line in lines:
            contract(line)

    with console.status(f"timing {n:,} events, best of {repeat} ..."):
        t_json = _best(repeat, json_only)
        t_pydantic = _best(repeat, pydantic_only)
        t_decode, t_replay = in_memory(lines, repeat)
    figures = {
        "events": float(n),
        "json_parse_events_per_s": n / t_json,
        "pydantic_events_per_s": n / t_pydantic,
        "decode_events_per_s": n / t_decode,
        "replay_events_per_s": n / t_replay,
        "replay_vs_decode": t_decode / t_replay,
        "engine_us_per_event": (t_replay - t_decode) / n * 1e6,
        "decode_us_per_event": t_decode / n * 1e6,
    }
    table = Table(title=f"replay throughput, {n:,} events, one core, best of {repeat}", title_justify="left")
    table.add_column("measurement")
    table.add_column("events/s", justify="right")
    table.add_column("vs decode-only", justify="right")
    table.add_row("orjson.loads only", f"{n / t_json:,.0f}", f"{t_decode / t_json:.2f}")
    table.add_row("validate with pydantic (UsageEvent)", f"{n / t_pydantic:,.0f}", f"{t_decode / t_pydantic:.2f}")
    table.add_row("decode + validate (decode_usage)", f"{n / t_decode:,.0f}", "1.00")
    table.add_row("full replay (decode + detect + alert)", f"{n / t_replay:,.0f}", f"{t_decode / t_replay:.2f}")
    console.print(table)
    console.print(
        f"per event: decode {figures['decode_us_per_event']:.2f} µs, engine {figures['engine_us_per_event']:.2f} µs"
    )
    return figures


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        pages = int(fh.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def _session_lines(sessions: int, steps: int = 4) -> Iterator[bytes]:
    """Distinct sessions, a few steps each, arriving at 1,000 sessions a minute over many keys."""
    t0 = 1_793_606_400.0  # 2026-11-02 00:00 UTC
    for s in range(sessions):
        start = t0 + s * 0.06
        for k in range(steps):
            yield orjson.dumps(
                {
                    "event_id": f"s{s}-{k}",
                    "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(start + k * 0.015)) + "Z",
                    "team": f"team-{s % 7}",
                    "api_key_id": f"key-{s % 97}",
                    "provider": "openai",
                    "model": "gpt-4o-mini",
                    "operation": "chat",
                    "input_tokens": 900 + (s * 7 + k) % 400,
                    "output_tokens": 40 + (s * 13 + k * 5) % 300,
                    "status": "ok",
                    "agent_id": f"agent-{s % 31}",
                    "session_id": f"session-{s}",
                    "user": f"user-{s % 5000}",
                    "request_fingerprint": f"{s:x}-{k}",
                }
            )


def sessions(count: int, console: Console) -> dict[str, float]:
    engine = Engine.default()
    samples: list[tuple[int, float, int]] = []
    base = _rss_mb()
    every = max(count // 10, 1)

    def lines() -> Iterator[bytes]:
        for i, line in enumerate(_session_lines(count)):
            if i % (every * 4) == 0:
                samples.append((i // 4, _rss_mb(), engine.entity_count()))
            yield line

    t0 = time.perf_counter()
    with console.status(f"replaying {count:,} distinct sessions ..."):
        result = replay(lines(), engine)
    elapsed = time.perf_counter() - t0
    samples.append((count, _rss_mb(), engine.entity_count()))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    table = Table(
        title=f"memory while replaying {count:,} distinct sessions ({result.events:,} events)", title_justify="left"
    )
    for column in ("sessions so far", "RSS MB", "entities held"):
        table.add_column(column, justify="right")
    for done, rss, held in samples:
        table.add_row(f"{done:,}", f"{rss:,.0f}", f"{held:,}")
    console.print(table)
    half = next((rss for done, rss, _ in samples if done >= count // 2), samples[-1][1])
    console.print(
        f"RSS before {base:,.0f} MB, at half-way {half:,.0f} MB, at the end {samples[-1][1]:,.0f} MB, "
        f"peak {peak:,.0f} MB; {result.events / elapsed:,.0f} events/s"
    )
    return {"peak_rss_mb": peak, "half_rss_mb": half, "end_rss_mb": samples[-1][1], "base_rss_mb": base}
