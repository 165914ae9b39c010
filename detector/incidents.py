"""The incident book: turns a stream of findings into few, stable incidents.

* One incident per root cause: findings of one kind and one group (the team for spend and
  retries, the team's agent for loops) fold into the open incident instead of opening more.
  A key's storm and its agent's storm are one incident; so are a key's spike and its team's.
* ``firing`` once, ``updated`` when it gets worse (severity up, or the rate or score doubled
  since the last record, at most every ``min_update_gap`` seconds), ``resolved`` after
  ``quiet`` seconds without a finding. A relapse within ``reopen`` seconds reopens the same
  incident instead of paging again: an ``updated`` record whose summary begins "Back after N min".
* Incidents open at the same time in the same team link to each other (``related_incidents``).

Ids are derived from content, not drawn at random, so replaying the same events, or a
worker restarted on them, gives the same incident and alert ids.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from detector.detectors.base import Finding
from detector.events import Alert, AlertKind, AlertStatus, Entity, Explanation, Severity, utc_from_epoch

MAX_ENTITIES = 100  # entities kept (and pinned) per open incident
MAX_RELATED = 20
NAMESPACE = uuid.UUID("5b3f1c0e-8f0a-4d5e-9a57-3f1c2e6d7a90")

QUIET_SECONDS = {
    AlertKind.RETRY_STORM: 120.0,
    AlertKind.AGENT_LOOP: 300.0,
    AlertKind.COST_SPIKE: 900.0,
    AlertKind.BUDGET_BURN: 3600.0,
}


@dataclass
class Incident:
    incident_id: str
    kind: AlertKind
    group: str
    team: str
    entity: Entity
    started_at: float
    last_seen: float
    finding: Finding
    entities: set[Entity] = field(default_factory=set)
    sequence: int = 0
    severity: Severity = Severity.WARNING
    reported_score: float = 0.0
    reported_rate: float = 0.0
    reported_at: float = 0.0
    excess_usd: float = 0.0
    related: list[str] = field(default_factory=list)
    resolved_at: float | None = None
    last_resolved: float = 0.0  # when it last resolved, for the record that reopens it


class IncidentBook:
    def __init__(
        self,
        quiet: dict[AlertKind, float] | None = None,
        reopen: float = 1800.0,
        min_update_gap: float = 300.0,
    ) -> None:
        self.quiet = {**QUIET_SECONDS, **(quiet or {})}
        self.reopen = reopen
        self.min_update_gap = min_update_gap
        self.open: dict[tuple[AlertKind, str], Incident] = {}
        self.recent: dict[tuple[AlertKind, str], Incident] = {}  # resolved, may still reopen

    def observe(self, findings: list[Finding]) -> list[Alert]:
        alerts = []
        for f in findings:
            key = (f.kind, f.group)
            inc = self.open.get(key)
            if inc is None and (inc := self.recent.pop(key, None)) is not None:
                self.open[key] = inc
                inc.last_resolved, inc.resolved_at = inc.resolved_at or f.at, None
                inc.last_seen = f.at
                gone = f.at - inc.last_resolved
                _add_bounded(inc.entities, f.entity)
                inc.severity = f.severity  # as it is now, not as it was when it resolved
                inc.finding = f
                alerts.append(self._record(inc, AlertStatus.UPDATED, f.at, f"Back after {gone / 60:.0f} min: "))
                continue
            if inc is None:
                alerts.append(self._open(key, f))
                continue
            inc.excess_usd += f.excess_usd_per_hour * max(f.at - inc.last_seen, 0.0) / 3600
            inc.last_seen = f.at
            _add_bounded(inc.entities, f.entity)
            worse_severity = f.severity.rank > inc.severity.rank
            if f.entity == inc.entity or worse_severity or f.score > inc.finding.score:
                inc.finding = f
            if worse_severity or (
                f.at - inc.reported_at >= self.min_update_gap
                and (f.score >= 2 * inc.reported_score or f.cost_rate_usd_per_hour >= 2 * max(inc.reported_rate, 0.01))
            ):
                inc.severity = Severity(max(inc.severity, f.severity, key=lambda s: s.rank))
                alerts.append(self._record(inc, AlertStatus.UPDATED, f.at))
        return alerts

    def tick(self, now: float) -> list[Alert]:
        """Resolve incidents quiet for long enough; forget resolved ones past the reopen window."""
        alerts = []
        for key, inc in list(self.open.items()):
            if now - inc.last_seen >= self.quiet[inc.kind]:
                del self.open[key]
                inc.resolved_at = now
                alerts.append(self._record(inc, AlertStatus.RESOLVED, now))
                self.recent[key] = inc
        for key, inc in list(self.recent.items()):
            if inc.resolved_at is not None and now - inc.resolved_at > self.reopen:
                del self.recent[key]
        return alerts

    def _open(self, key: tuple[AlertKind, str], f: Finding) -> Alert:
        seed = f"{f.kind}|{f.group}|{f.entity}|{int(f.at)}"
        inc = Incident(
            incident_id=str(uuid.uuid5(NAMESPACE, seed)),
            kind=f.kind,
            group=f.group,
            team=f.team,
            entity=f.entity,
            started_at=min(f.started_at, f.at),
            last_seen=f.at,
            finding=f,
            entities={f.entity},
            severity=f.severity,
            excess_usd=f.excess_usd_per_hour * max(f.at - f.started_at, 0.0) / 3600,
        )
        for other in self.open.values():
            if other.team == f.team:
                # A long-open incident (a budget burn) may meet many others: keep the latest few.
                other.related = [*other.related[-(MAX_RELATED - 1) :], inc.incident_id]
                inc.related.append(other.incident_id)
        inc.related = inc.related[-MAX_RELATED:]  # thousands of sessions looping at once: the latest few
        self.open[key] = inc
        return self._record(inc, AlertStatus.FIRING, f.at)

    def _record(self, inc: Incident, status: AlertStatus, now: float, note: str = "") -> Alert:
        f = inc.finding
        if status is not AlertStatus.FIRING:
            inc.sequence += 1
        inc.reported_score = f.score
        inc.reported_rate = f.cost_rate_usd_per_hour
        inc.reported_at = now
        summary = note + f.summary
        if status is AlertStatus.RESOLVED:
            summary = f"Resolved: no sign of it for {self.quiet[inc.kind] / 60:.0f} min. Was: {summary}"
        return Alert(
            alert_id=str(uuid.uuid5(NAMESPACE, f"{inc.incident_id}:{inc.sequence}")),
            incident_id=inc.incident_id,
            sequence=inc.sequence,
            kind=inc.kind,
            status=status,
            severity=inc.severity,
            entity=inc.entity,
            owner=inc.team,
            detected_at=utc_from_epoch(now),
            started_at=utc_from_epoch(inc.started_at),
            resolved_at=utc_from_epoch(inc.resolved_at) if inc.resolved_at is not None else None,
            evidence=f.evidence,
            explanation=Explanation(summary=summary, top_contributors=list(f.contributors)),
            cost_rate_usd_per_hour=f.cost_rate_usd_per_hour,
            excess_cost_usd=round(inc.excess_usd, 4),
            recommended_action=f.recommended_action,
            detector=f.detector,
            related_incidents=list(inc.related),
        )

    def open_entities(self) -> set[tuple[str, Entity]]:
        """(team, entity) of every open incident's entities: whose state to keep while it is open."""
        return {(inc.team, e) for inc in self.open.values() for e in inc.entities}


def _add_bounded(entities: set[Entity], entity: Entity) -> None:
    """An incident's entities (whose state is kept while it is open): a loop in every session of an
    agent for hours must not pin thousands of them; past the bound one makes room for the newest."""
    if entity not in entities and len(entities) >= MAX_ENTITIES:
        entities.pop()
    entities.add(entity)
