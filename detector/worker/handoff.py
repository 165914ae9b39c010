"""Findings on their way from the usage partitions' engines to the book of their team's engine.

A worker that repartitions by team judges keys, agents and sessions where the events are keyed
by API key, and teams where they are keyed by team. Incidents are one per root cause and team
(:mod:`detector.incidents`), so the book that folds findings into incidents lives with the
team: each usage partition hands the findings of each batch to the by-team topic, one record
per team, and the by-team partition books them with its own, in event-time order with the
events (:meth:`Engine.receive <detector.engine.Engine.receive>`). A key's spike and its team's
then make one incident, as in a replay, instead of two pages for one cause.

A record: key the team, header ``stormwatch-record: findings``, value the JSON list of
``[tick time, first, [finding, ...]]`` in tick order, where ``first`` numbers the item's first
finding among its tick's: a tick with more findings than fit one record (a fleet of agents
looping at once) goes on in the next. Ticks of one engine only move forward, so the by-team side
drops what a restored usage partition hands over a second time by :func:`position`.

>>> from detector.detectors.base import Finding
>>> from detector.events import AlertKind, DetectorRef, Entity, Evidence, Severity
>>> f = Finding(AlertKind.RETRY_STORM, Entity(type="api_key", id="k1"), "search", "search", 120.0, 90.0,
...             Severity.CRITICAL, 9.5, Evidence(metric="retries_per_minute", baseline=1.0, observed=9.5,
...             ratio=9.5, window_seconds=60.0), "k1 retries", 3.0, 2.5, "open its breaker",
...             DetectorRef(name="retry_storm", version="1.0"))
>>> sorted(by_team([(120.0, [f])]))
['search']
>>> decode(next(records([(120.0, [f])]))) == [(120.0, 0, [f])]
True
>>> [[(at, first, len(fs)) for at, first, fs in decode(r)] for r in records([(120.0, [f] * 5)], max_bytes=1000)]
[[(120.0, 0, 2)], [(120.0, 2, 2)], [(120.0, 4, 1)]]
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from pydantic import TypeAdapter

from detector.detectors.base import Finding

FINDINGS = b"findings"  # RECORD_HEADER of a record of handed findings
RECORD_BYTES = 256 * 1024  # several fit one producer batch, far under the broker's message.max.bytes
MAX_PER_TICK = 1_000_000  # findings of one tick and team: more than any entity store holds

Ticks = list[tuple[float, list[Finding]]]
Items = list[tuple[float, int, list[Finding]]]
_FINDING: TypeAdapter[Finding] = TypeAdapter(Finding)
_ITEMS: TypeAdapter[Items] = TypeAdapter(Items)


@dataclass(frozen=True, slots=True)
class Handed:
    """What an aligner holds for one tick of a usage partition's findings about one team."""

    at: float
    findings: list[Finding]

    @property
    def order(self) -> float:
        """Where it goes among events: after those before ``at``, before those at ``at`` or later."""
        return math.nextafter(self.at, -math.inf)


def by_team(ticks: Iterable[tuple[float, list[Finding]]]) -> dict[str, Ticks]:
    """The ticks' findings split by team, each team's in tick order."""
    teams: dict[str, Ticks] = {}
    for at, findings in ticks:
        mine: dict[str, list[Finding]] = {}
        for f in findings:
            mine.setdefault(f.team, []).append(f)
        for team, found in mine.items():
            teams.setdefault(team, []).append((at, found))
    return teams


def records(ticks: Ticks, max_bytes: int = RECORD_BYTES) -> Iterator[bytes]:
    """One team's ticks as record values of at most about ``max_bytes`` each (a single bigger finding goes alone)."""
    items: list[bytes] = []
    size = 0
    for at, findings in ticks:
        first, chunk = 0, list[bytes]()
        for i, f in enumerate(findings):
            blob = _FINDING.dump_json(f)
            if size + len(blob) > max_bytes and (chunk or items):
                if chunk:
                    items.append(_item(at, first, chunk))
                yield b"[" + b",".join(items) + b"]"
                items, size, first, chunk = [], 0, i, []
            chunk.append(blob)
            size += len(blob) + 1
        if chunk:
            items.append(_item(at, first, chunk))
    if items:
        yield b"[" + b",".join(items) + b"]"


def _item(at: float, first: int, findings: list[bytes]) -> bytes:
    return b"[%s,%d,[%s]]" % (repr(at).encode(), first, b",".join(findings))


def decode(blob: bytes) -> Items:
    """The items of a record; raises pydantic's ``ValidationError`` when it is not one."""
    return _ITEMS.validate_json(blob)


def fresh(items: Items, seen: int) -> tuple[list[Handed], int, int]:
    """What of a record's items is new after ``seen`` (the :func:`position` of the last finding taken).

    Returns the new findings by tick, the new ``seen``, and how many findings were taken before.
    """
    new: list[Handed] = []
    dropped = 0
    for at, first, findings in items:
        kept = [f for i, f in enumerate(findings, first) if position(at, i) > seen]
        dropped += len(findings) - len(kept)
        if kept:
            new.append(Handed(at, kept))
            seen = position(at, first + len(findings) - 1)
    return new, seen, dropped


def position(at: float, index: int) -> int:
    """Where the ``index``-th finding of the tick at ``at`` comes among all a usage partition hands one team."""
    return round(at * 1000) * MAX_PER_TICK + min(index, MAX_PER_TICK - 1)
