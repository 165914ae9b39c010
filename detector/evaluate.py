"""Score alerts against the labels of injected incidents: recall, precision, latency, false alarms.

* An **incident** is one ``incident_id``; it counts from its first record.
* A label is **detected** when an incident of the same kind and team has a firing or updated
  record inside ``[start - 60 s, end + grace]``; the latency is that record's event time minus
  the label's start (never below zero).
* An incident is a **false incident** when it overlaps no labelled incident of any kind in its
  team; benign look-alikes do not count as incidents: those are exactly the cases that must
  stay quiet. One that overlaps a real incident of another kind (a partial storm that also
  trips a spend alert on its key) is a side effect, not a false alarm; precision counts it true.

>>> from datetime import UTC, datetime, timedelta
>>> from detector.events import Entity, IncidentLabel
>>> t0 = datetime(2026, 11, 3, 9, tzinfo=UTC)
>>> label = IncidentLabel(label_id="l1", kind="retry_storm", scenario="full_storm",
...                       entity=Entity(type="api_key", id="k"), team="t", start=t0,
...                       end=t0 + timedelta(minutes=10))
>>> alert = {"incident_id": "i1", "kind": "retry_storm", "status": "firing", "owner": "t",
...          "detected_at": "2026-11-03T09:00:25Z", "entity": {"type": "api_key", "id": "k"}}
>>> card = score([label], [alert], days=1.0)
>>> card.kinds["retry_storm"].recall, card.kinds["retry_storm"].median_latency_s, card.false_per_day
(1.0, 25.0, 0.0)
"""

from __future__ import annotations

import statistics
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from detector.events import AlertKind, IncidentLabel

EARLY_SLACK = 60.0
GRACE_SECONDS = {
    AlertKind.RETRY_STORM.value: 300.0,
    AlertKind.AGENT_LOOP.value: 600.0,
    AlertKind.COST_SPIKE.value: 900.0,
    AlertKind.BUDGET_BURN.value: 3600.0,
}


@dataclass
class KindScore:
    labels: int = 0
    detected: int = 0
    incidents: int = 0
    true_incidents: int = 0
    latencies: list[float] = field(default_factory=list)

    @property
    def recall(self) -> float:
        return self.detected / self.labels if self.labels else 1.0

    @property
    def precision(self) -> float:
        return self.true_incidents / self.incidents if self.incidents else 1.0

    @property
    def median_latency_s(self) -> float | None:
        return round(statistics.median(self.latencies), 1) if self.latencies else None

    @property
    def p90_latency_s(self) -> float | None:
        if not self.latencies:
            return None
        ordered = sorted(self.latencies)
        return round(ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))], 1)


@dataclass
class Scorecard:
    days: float
    kinds: dict[str, KindScore]
    scenarios: dict[str, KindScore]
    false_incidents: list[dict[str, Any]]
    missed: list[dict[str, Any]]
    # Owners' labels (IncidentFeedback records), newest per incident: label -> kind -> count
    feedback: dict[str, Counter[str]] = field(default_factory=dict)

    @property
    def owner_precision(self) -> float | None:
        """real / (real + false_alarm) among labelled incidents; planned work counts as neither."""
        real = sum(self.feedback.get("real", Counter()).values())
        false = sum(self.feedback.get("false_alarm", Counter()).values())
        return round(real / (real + false), 3) if real + false else None

    @property
    def false_per_day(self) -> float:
        return round(len(self.false_incidents) / self.days, 2) if self.days > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        def dump(scores: Mapping[str, KindScore]) -> dict[str, Any]:
            return {
                name: {
                    **{k: v for k, v in asdict(s).items() if k != "latencies"},
                    "recall": round(s.recall, 3),
                    "precision": round(s.precision, 3),
                    "median_latency_s": s.median_latency_s,
                    "p90_latency_s": s.p90_latency_s,
                }
                for name, s in scores.items()
            }

        return {
            "days": self.days,
            "false_incidents_per_day": self.false_per_day,
            "kinds": dump(self.kinds),
            "scenarios": dump(self.scenarios),
            "false_incidents": self.false_incidents,
            "missed": self.missed,
            "feedback": {label: dict(kinds) for label, kinds in self.feedback.items()},
            "owner_precision": self.owner_precision,
        }


def _ts(value: str | datetime) -> float:
    if isinstance(value, datetime):
        return value.timestamp()
    return datetime.fromisoformat(value).timestamp()


def score(labels: Iterable[IncidentLabel], alerts: Iterable[Mapping[str, Any]], days: float) -> Scorecard:
    """Alerts against ground-truth labels. Owners' feedback records among ``alerts`` (they share the
    alerts topic; they have a ``feedback_id``) are counted apart, the newest per incident."""
    incidents: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    verdicts: dict[str, Mapping[str, Any]] = {}
    for alert in alerts:
        if "feedback_id" in alert:
            verdicts[alert["incident_id"]] = alert
            continue
        incidents[alert["incident_id"]].append(alert)
    labels = list(labels)
    kinds = {k.value: KindScore() for k in AlertKind}
    scenarios: dict[str, KindScore] = defaultdict(KindScore)
    missed = []

    def window(label: IncidentLabel) -> tuple[float, float]:
        return _ts(label.start) - EARLY_SLACK, _ts(label.end) + GRACE_SECONDS.get(str(label.kind), 900.0)

    true_ids: set[str] = set()
    for label in labels:
        if label.kind == "benign":
            continue
        kind = str(label.kind)
        lo, hi = window(label)
        kinds[kind].labels += 1
        scenarios[label.scenario].labels += 1
        hits = [
            (_ts(a["detected_at"]), iid)
            for iid, records in incidents.items()
            for a in records
            if a["kind"] == kind
            and a["owner"] == label.team
            and a["status"] != "resolved"
            and lo <= _ts(a["detected_at"]) <= hi
        ]
        if not hits:
            missed.append(
                {
                    "label_id": label.label_id,
                    "scenario": label.scenario,
                    "team": label.team,
                    "entity": str(label.entity),
                    "start": label.start.isoformat(),
                }
            )
            continue
        first, _ = min(hits)
        latency = max(first - _ts(label.start), 0.0)
        for target in (kinds[kind], scenarios[label.scenario]):
            target.detected += 1
            target.latencies.append(latency)
        true_ids.update(iid for _, iid in hits)

    real = [label for label in labels if label.kind != "benign"]
    false_incidents = []
    for iid, records in incidents.items():
        opening = records[0]
        kind = opening["kind"]
        kinds[kind].incidents += 1
        if iid in true_ids:
            kinds[kind].true_incidents += 1
            continue
        at = _ts(opening["detected_at"])
        overlaps = any(label.team == opening["owner"] and window(label)[0] <= at <= window(label)[1] for label in real)
        if overlaps:
            kinds[kind].true_incidents += 1  # a side effect of a real incident, not a false alarm
        else:
            benign = [
                label.scenario
                for label in labels
                if label.kind == "benign"
                and label.team == opening["owner"]
                and window(label)[0] <= at <= window(label)[1]
            ]
            false_incidents.append(
                {
                    "incident_id": iid,
                    "kind": kind,
                    "owner": opening["owner"],
                    "entity": opening["entity"],
                    "detected_at": opening["detected_at"],
                    "benign_scenario": benign[0] if benign else None,
                    "summary": opening.get("explanation", {}).get("summary", ""),
                }
            )
    feedback: dict[str, Counter[str]] = defaultdict(Counter)
    for verdict in verdicts.values():
        feedback[verdict["label"]][verdict["kind"]] += 1
    return Scorecard(days, kinds, dict(scenarios), false_incidents, missed, dict(feedback))


def table_rows(card: Scorecard) -> list[tuple[str, ...]]:
    """Rows for a printed table: one per kind, then one per scenario."""
    rows: list[tuple[str, ...]] = []
    for name, s in [*card.kinds.items(), *sorted(card.scenarios.items())]:
        rows.append(
            (
                name,
                f"{s.detected}/{s.labels}",
                f"{s.recall:.2f}",
                f"{s.precision:.2f}" if name in card.kinds else "",
                "-" if s.median_latency_s is None else f"{s.median_latency_s:.0f}",
                "-" if s.p90_latency_s is None else f"{s.p90_latency_s:.0f}",
            )
        )
    return rows
