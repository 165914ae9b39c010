"""Findings on their way from the usage partitions' engines to the book of their team's engine.

A worker that repartitions by team judges keys, agents and sessions where the events are keyed
by API key, and teams where they are keyed by team. Incidents are one per root cause and team
(:mod:`detector.incidents`), so the book that folds findings into incidents lives with the
team: each usage partition hands the findings of each batch to the by-team topic, one record
per team, and the by-team partition books them with its own, in event-time order with the
events (:meth:`Engine.receive <detector.engine.Engine.receive>`). A key's spike and its team's
then make one incident, as in a replay, instead of two pages for one cause.

A record: key the team, header ``stormwatch-record: findings``, value the JSON list of
``[tick time, [finding, ...]]`` in tick order. Ticks of one engine only move forward, so the
by-team side drops what a restored usage partition hands over a second time by tick time.

>>> from detector.detectors.base import Finding
>>> from detector.events import AlertKind, DetectorRef, Entity, Evidence, Severity
>>> f = Finding(AlertKind.RETRY_STORM, Entity(type="api_key", id="k1"), "search", "search", 120.0, 90.0,
...             Severity.CRITICAL, 9.5, Evidence(metric="retries_per_minute", baseline=1.0, observed=9.5,
...             ratio=9.5, window_seconds=60.0), "k1 retries", 3.0, 2.5, "open its breaker",
...             DetectorRef(name="retry_storm", version="1.0"))
>>> sorted(by_team([(120.0, [f])]))
['search']
>>> decode(encode([(120.0, [f])])) == [(120.0, [f])]
True
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from pydantic import TypeAdapter

from detector.detectors.base import Finding

FINDINGS = b"findings"  # RECORD_HEADER of a record of handed findings

Ticks = list[tuple[float, list[Finding]]]
_TICKS: TypeAdapter[Ticks] = TypeAdapter(Ticks)


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


def encode(ticks: Ticks) -> bytes:
    return _TICKS.dump_json(ticks)


def decode(blob: bytes) -> Ticks:
    """The ticks of a record; raises ``ValueError`` (pydantic's ``ValidationError``) when it is not one."""
    return _TICKS.validate_json(blob)
