"""A worker's two engines, keys and teams, alert exactly as the one engine of a replay.

The key engines (scope ``key``, one per usage partition) hand their findings over instead of
booking them, and the team engine (scope ``team``) books them with its own, in event-time order
with the events, as the worker's by-team stage does. On a simulated day where keys' cost spikes drag their teams'
spend up too, that gives the replay's alerts, ids, related incidents and all; without the
hand-off, each team spike would page again as an incident of its own.
"""

from __future__ import annotations

import gzip
import math
import zlib
from pathlib import Path

import pytest

from detector.detectors.base import Finding
from detector.engine import Engine
from detector.events import Alert, Usage
from detector.settings import Settings, load_settings
from detector.simulate import SimulationSpec, write_simulation
from detector.wire import decode_usage
from detector.worker import handoff
from detector.worker.align import Aligner
from detector.worker.handoff import Handed


@pytest.fixture(scope="module")
def day(tmp_path_factory: pytest.TempPathFactory) -> tuple[Settings, list[Usage]]:
    """A quarter-scale fleet: a day of warm-up, then a day with incidents (~260,000 events)."""
    paths = write_simulation(SimulationSpec(seed=7, days=1.0, scale=0.25), Path(tmp_path_factory.mktemp("sim")))
    with gzip.open(paths["events"], "rb") as lines:
        return load_settings(paths["config"]), [decode_usage(line) for line in lines]


def staged(
    settings: Settings, events: list[Usage], partitions: int = 4
) -> tuple[list[Alert], list[Engine], list[Handed]]:
    """The worker's two stages over one stream, as its by-team partition runs them, without Kafka.

    Events go to one key engine per usage partition (by API key); what they hand over and the
    events wait in an aligner until every partition has passed them, as on the by-team topic,
    and the team engine takes them in that order, moving on to what every partition has passed.
    Returns the team engine's alerts, the key engines and every tick they handed over.
    """
    keys = [Engine.from_settings(settings, "key") for _ in range(partitions)]
    team = Engine.from_settings(settings, "team")
    aligner: Aligner[Usage | Handed] = Aligner(sources=partitions, idle_after=math.inf)
    alerts: list[Alert] = []
    handed: list[Handed] = []
    for ev in events:
        source = zlib.crc32(ev.api_key_id.encode()) % partitions
        key = keys[source]
        assert not key.process(ev), "a key engine that hands off books nothing itself"
        for at, findings in key.handed:
            handed.append(Handed(at, findings))
            aligner.add(handed[-1].order, handed[-1])
        key.handed = []
        aligner.add(ev.timestamp.timestamp(), ev)
        aligner.heard(source, key.event_time, wall=0.0)
        for item in aligner.release(wall=0.0):
            if isinstance(item, Handed):
                team.receive(item.at, item.findings)
            else:
                alerts += team.process(item)
        if (low := aligner.low(wall=0.0)) >= team.next_tick:
            alerts += team.advance(low)
    return alerts, keys, handed


def test_key_and_team_engines_alert_as_one_engine(day: tuple[Settings, list[Usage]]) -> None:
    settings, events = day
    whole = Engine.from_settings(settings)
    expected = [a for ev in events for a in whole.process(ev)]
    alerts, keys, handed = staged(settings, events)
    assert alerts == expected
    assert {a.kind.value for a in expected} >= {"cost_spike", "retry_storm", "agent_loop", "budget_burn"}
    assert all(key.stats.alerts == {} for key in keys), "alerts are counted where they are booked"
    # Partitions that passed a tick each hand its findings over: booked together, not a tick apart.
    assert len({h.at for h in handed}) < len(handed)
    assert any(a.related_incidents for a in alerts)

    # What makes it matter: the team engine's own spikes, booked alone, page for causes the keys' incidents hold.
    alone = Engine.from_settings(settings, "team")
    by_itself = {a.incident_id for ev in events for a in alone.process(ev) if a.kind.value == "cost_spike"}
    folded = by_itself - {a.incident_id for a in expected}
    assert folded, "the simulated day has team spikes that belong to a key's incident"

    # Every handed tick survives the by-team topic's JSON as it was, in records small enough for any broker.
    ticks = [(h.at, h.findings) for h in handed]
    blobs = list(handoff.records(ticks, max_bytes=20_000))
    assert len(blobs) > 1 and all(len(b) < 25_000 for b in blobs)
    items = [item for blob in blobs for item in handoff.decode(blob)]
    again: list[tuple[float, list[Finding]]] = []
    for at, first, findings in items:  # a tick split over records goes on where it stopped
        if first:
            assert again[-1][0] == at and first == len(again[-1][1])
            again[-1][1].extend(findings)
        else:
            again.append((at, findings))
    assert again == ticks


def test_handed_findings_wait_in_the_aligner_before_the_events_of_their_tick() -> None:
    aligner: Aligner[str | Handed] = Aligner(sources=1, idle_after=60.0)
    tick = Handed(120.0, [])
    aligner.add(120.0, "event at the tick")
    aligner.add(119.5, "event before it")
    aligner.add(tick.order, tick)
    aligner.heard(0, 120.0, wall=0.0)
    assert aligner.release(wall=0.1) == ["event before it", tick, "event at the tick"]


def test_findings_handed_over_again_are_taken_once(day: tuple[Settings, list[Usage]]) -> None:
    """A restored usage partition hands the findings since its snapshot over again: the by-team side keeps the first."""
    settings, events = day
    _, _, handed = staged(settings, events, partitions=1)
    ticks = [(h.at, h.findings) for h in handed]
    first = [handoff.decode(b) for b in handoff.records(ticks, max_bytes=3_000)]
    assert any(item[1] for items in first for item in items), "some tick is split over records"
    taken, seen = [], -1
    for items in first[: len(first) // 2]:
        new, seen, dropped = handoff.fresh(items, seen)
        taken += new
        assert dropped == 0
    # The restored partition starts over from an older snapshot, with records cut elsewhere.
    again = [handoff.decode(b) for b in handoff.records(ticks[len(ticks) // 4 :], max_bytes=5_000)]
    duplicates = 0
    for items in again:
        new, seen, dropped = handoff.fresh(items, seen)
        taken += new
        duplicates += dropped
    assert duplicates > 0
    assert [f for h in taken for f in h.findings] == [f for _, fs in ticks for f in fs]
