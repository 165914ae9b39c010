"""The by-team aligner: event-time order across sources, bounded waits, bounded memory, durable."""

from __future__ import annotations

import math
import pickle
import random

from detector.wire import decode_usage
from detector.worker.align import Aligner, to_pause


def drain(a: Aligner[float], sources: dict[int, list[float]], wall: float = 0.0) -> list[float]:
    """Feed each source's sorted event times in random-sized chunks, interleaved at random."""
    rng = random.Random(7)
    at = dict.fromkeys(sources, 0)
    out: list[float] = []
    while any(at[s] < len(v) for s, v in sources.items()):
        s = rng.choice([s for s, v in sources.items() if at[s] < len(v)])
        chunk = sources[s][at[s] : at[s] + rng.randint(1, 50)]
        at[s] += len(chunk)
        for ts in chunk:
            a.add(ts, ts)
        a.heard(s, chunk[-1], wall, sources=len(sources))
        out += a.release(wall)
    return out + a.release(wall + a.idle_after + 1)


def test_sources_at_different_speeds_come_out_in_event_time_order() -> None:
    rng = random.Random(1)
    # One source an hour ahead of the others, one sparse: what a backlog drain looks like.
    sources = {
        0: sorted(rng.uniform(0, 7200) for _ in range(2000)),
        1: sorted(rng.uniform(3600, 7200) for _ in range(500)),
        2: sorted(rng.uniform(0, 7200) for _ in range(50)),
    }
    out = drain(Aligner(sources=0, idle_after=3.0), sources)
    assert out == sorted(out)
    assert sorted(out) == sorted(t for v in sources.values() for t in v), "nothing lost, nothing doubled"


def test_a_silent_source_holds_the_others_back_only_for_its_grace() -> None:
    a: Aligner[str] = Aligner(sources=2, idle_after=3.0)
    a.heard(1, 50.0, wall=10.0, sources=2)
    a.add(100.0, "fast")
    a.heard(0, 100.0, wall=10.0)
    assert a.release(wall=12.9) == [], "source 1 is behind and heard from 2.9 s ago"
    assert a.release(wall=13.1) == ["fast"]
    a.add(40.0, "late")  # source 1 wakes up: its old event goes on at once, late
    a.heard(1, 40.0, wall=13.2)
    assert a.release(wall=13.2) == ["late"]


def test_a_source_known_to_be_behind_is_never_taken_for_silent() -> None:
    """Its worker still has records of it to fetch: a slow batch is not a quiet partition."""
    a: Aligner[str] = Aligner(sources=2, idle_after=3.0)
    a.heard(1, 50.0, wall=10.0, sources=2)
    a.add(100.0, "fast")
    a.heard(0, 100.0, wall=10.0)
    a.alive(1, wall=12.5)
    a.alive(7, wall=12.5)  # a source never heard of stays unknown
    assert a.release(wall=15.0) == [], "still held for source 1, heard to be behind 2.5 s ago"
    assert a.low(wall=15.0) == 50.0, "alive moves no watermark: its packs may be on their way"
    assert a.release(wall=15.6) == ["fast"], "silent after all once nobody vouches for it"
    assert 7 not in a.seen


def test_a_source_never_heard_is_waited_for_from_the_first_one_heard() -> None:
    a: Aligner[str] = Aligner(sources=0, idle_after=3.0)
    a.add(100.0, "x")
    a.heard(0, 100.0, wall=50.0, sources=2)
    assert a.release(wall=52.0) == []
    assert a.release(wall=53.5) == ["x"]


def test_memory_is_bounded_by_forcing_the_oldest_out() -> None:
    a: Aligner[int] = Aligner(sources=2, idle_after=3.0, max_held=100)
    a.heard(1, -1.0, wall=0.0, sources=2)  # a slow source pins the low watermark
    for i in range(250):
        a.add(float(i), i)
        a.heard(0, float(i), wall=0.0)
    out = a.release(wall=0.0)
    assert out == list(range(150)) and len(a) == 100 and a.forced == 150


def test_held_events_survive_a_snapshot_in_another_process() -> None:
    raw = (
        b'{"event_id":"e1","timestamp":"2026-11-02T09:30:00Z","team":"t","api_key_id":"k","provider":"openai",'
        b'"model":"gpt-4o","operation":"chat","input_tokens":10,"output_tokens":5,"status":"ok"}'
    )
    ev = decode_usage(raw)
    a: Aligner[object] = Aligner(sources=2, idle_after=3.0)
    a.add(ev.timestamp.timestamp(), ev)
    a.heard(0, ev.timestamp.timestamp(), wall=1000.0, sources=2)
    a.heard(1, 0.0, wall=1000.0)
    back: Aligner[object] = pickle.loads(pickle.dumps(a))
    back.restarted(wall=5.0)  # a new process's monotonic clock
    assert back.release(wall=7.0) == [], "every source gets its grace again"
    assert back.release(wall=8.5) == [ev]


def _drain(
    streams: dict[int, list[float]], max_held: int, silent_until: dict[int, int] | None = None
) -> tuple[list[float], Aligner[float], int]:
    """Read ``streams`` in batches of 100 per step (0.05 s), pausing per ``to_pause``; stream ``s``
    delivers nothing before step ``silent_until[s]``. Returns what was released, the aligner and
    the most partitions paused at once."""
    silent_until = silent_until or {}
    at = dict.fromkeys(streams, 0)
    marks = dict.fromkeys(streams, -math.inf)
    a: Aligner[float] = Aligner(sources=0, idle_after=3.0, max_held=max_held)
    paused: set[int] = set()
    out: list[float] = []
    wall, most_paused = 0.0, 0
    for step in range(10_000):
        if all(at[s] == len(v) for s, v in streams.items()) and not len(a):
            break
        for s, v in streams.items():
            if s in paused or at[s] == len(v) or step < silent_until.get(s, 0):
                continue
            batch = v[at[s] : at[s] + 100]
            at[s] += len(batch)
            for ts in batch:
                a.add(ts, ts)
            marks[s] = batch[-1]
            a.heard(s, marks[s], wall, sources=len(streams))
        out += a.release(wall)
        paused = to_pause(len(a), a.low(wall), marks, paused, a.max_held)
        most_paused = max(most_paused, len(paused))
        wall += 0.05
    assert sorted(out) == sorted(t for v in streams.values() for t in v), "all of it, once (no stall)"
    return out, a, most_paused


def test_pausing_the_partitions_ahead_keeps_a_skewed_drain_in_order_within_bounds() -> None:
    """Three partitions over the same hour, 5,000 / 1,000 / 300 events: read in equal batches, the
    sparse ones race ahead in event time; paused per ``to_pause``, nothing is forced out late."""
    rng = random.Random(3)
    streams = {s: sorted(rng.uniform(0, 3600) for _ in range(n)) for s, n in enumerate((5000, 1000, 300))}
    out, a, most_paused = _drain(streams, max_held=800)
    assert out == sorted(out) and a.forced == 0
    assert most_paused == 2, "the two sparse partitions had to wait"


def test_partitions_wait_for_one_not_heard_yet_instead_of_forcing_events_out() -> None:
    """A worker's first fetch brings two partitions; the third comes 2 s later (inside the grace),
    while everything is held for it. The two pause rather than push the aligner past its bound."""
    rng = random.Random(5)
    streams = {s: sorted(rng.uniform(0, 3600) for _ in range(2000)) for s in range(3)}
    out, a, most_paused = _drain(streams, max_held=800, silent_until={2: 40})
    assert out == sorted(out) and a.forced == 0
    assert most_paused == 2
