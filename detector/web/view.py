"""The dashboard's read model: what the page, the JSON API and the metrics show, kept in memory.

:class:`LiveView` is fed by a shell (the Kafka worker, or the embedded replay) with every
valid event and its cost, every alert record, every breaker change and every rejected
message. It keeps, all bounded:

* spend per team per minute of event time over the last ``spend_window_seconds`` (the chart);
* per minute, spend per API key, user, agent and model over the last ``top_window_seconds``
  (top spenders);
* the latest record of every incident (active ones, and the most recent resolved ones);
* the newest state of every circuit breaker (a higher ``version`` wins);
* a small summary per entity (team, key, user, agent, session, model) for ``/api/entities``.

It does no I/O and reads no clock: "now" is the newest event time it has seen. Its methods are
safe to call from several threads (one lock), so a replay in a thread can feed a page served
from an event loop. Listeners registered with :meth:`LiveView.subscribe` are called (from the
feeding thread) when something changed: at once for incidents and breakers, and for events only
on the first one after the last :meth:`LiveView.snapshot`, so a busy stream costs one call per
read, not one per event.

>>> from detector.events import UsageEvent
>>> view = LiveView()
>>> view.observe_event(UsageEvent.model_validate({
...     "event_id": "e1", "timestamp": "2026-11-02T09:30:10Z", "team": "search", "api_key_id": "k1",
...     "provider": "openai", "model": "gpt-4o", "operation": "chat", "input_tokens": 1000,
...     "output_tokens": 100, "status": "ok"}), cost_usd=0.25)
>>> view.top_spenders()["api_key"]
[{'id': 'k1', 'owner': 'search', 'spend_usd': 0.25, 'share': 1.0}]
>>> view.entity("team", "search")["spend_usd"], view.spend_series(3600, 60)["series"][0]["team"]
(0.25, 'search')
"""

from __future__ import annotations

import heapq
import math
import threading
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, Literal, get_args

from detector.breakers import change_key, entity_key
from detector.detectors.base import SCOPED, SEP, store_key
from detector.events import (
    Alert,
    AlertStatus,
    BreakerChange,
    BreakerEntityType,
    BreakerState,
    Entity,
    EntityType,
    IncidentFeedback,
    Status,
    Usage,
    UsageEvent,
)

ENTITY_TYPES: Final[tuple[str, ...]] = get_args(EntityType)
BREAKER_ENTITY_TYPES: Final[tuple[str, ...]] = get_args(BreakerEntityType)
TOP_TYPES: Final[tuple[str, ...]] = ("api_key", "user", "agent", "model")
OTHER: Final = "(other)"

Listener = Callable[[str], None]
IncidentFilter = Literal["active", "resolved", "all"]

_MINUTE = 60


def iso(ts: datetime | None) -> str | None:
    """RFC 3339 in UTC with a Z, as the contracts write it."""
    return None if ts is None else ts.isoformat().replace("+00:00", "Z")


def reason_class(reason: str) -> str:
    """A bounded label for a reject reason: ``not_json``, ``empty``, ``engine_error``,
    ``missing_<field>`` or ``invalid_<field>`` for a field of the usage event, else ``other``.

    >>> reason_class("not valid JSON: expected value at line 1 column 14")
    'not_json'
    >>> reason_class("input_tokens: Input should be greater than or equal to 0; team: Field required")
    'invalid_input_tokens'
    >>> reason_class("team: Field required"), reason_class("labels.x: bad"), reason_class("whatever: no")
    ('missing_team', 'invalid_labels', 'other')
    """
    if reason.startswith("not valid JSON"):
        return "not_json"
    if reason.startswith("empty message"):
        return "empty"
    if reason.startswith("engine error"):
        return "engine_error"
    first = reason.split(";", 1)[0]
    where, _, message = first.partition(": ")
    field = where.split(".", 1)[0].strip()
    if field == "event":
        return "invalid_event"
    if field in UsageEvent.model_fields:
        return f"missing_{field}" if message.strip() == "Field required" else f"invalid_{field}"
    return "other"


class _EntityStats:
    """Running totals of one entity since the view first saw it."""

    __slots__ = ("breakdown", "errors", "events", "first", "last", "owner", "retries", "spend")

    def __init__(self, owner: str, ts: float) -> None:
        self.owner = owner
        self.events = 0
        self.errors = 0
        self.retries = 0
        self.spend = 0.0
        self.first = ts
        self.last = ts
        self.breakdown: dict[str, float] = {}  # spend by model (by team for a model)


class _Bucket:
    """One minute of event time: spend per team, and per key, user, agent and model."""

    __slots__ = ("by_type", "errors", "events", "teams")

    def __init__(self) -> None:
        self.teams: dict[str, float] = {}
        self.by_type: tuple[dict[str, float], ...] | None = ({}, {}, {}, {})  # TOP_TYPES order
        self.events = 0
        self.errors = 0


class _Incident:
    __slots__ = ("feedback", "first_detected", "history", "json", "latest", "peak_rate")

    def __init__(self, alert: Alert) -> None:
        self.latest = alert
        self.first_detected = alert.detected_at
        self.peak_rate = alert.cost_rate_usd_per_hour
        self.history: deque[dict[str, Any]] = deque(maxlen=20)
        self.feedback: IncidentFeedback | None = None
        self.json: dict[str, Any] | None = None  # cached rendering of the latest record


@dataclass(frozen=True, slots=True)
class ViewLimits:
    """How much the view keeps. Every store is bounded by one of these."""

    spend_window_seconds: float = 24 * 3600.0  # the chart's memory
    top_window_seconds: float = 3600.0  # top spenders over this much recent event time
    max_chart_teams: int = 8  # teams drawn; the rest are summed as "(other)"
    max_entities_per_type: int = 20_000  # per-entity summaries; the least recently seen go first
    max_teams_per_minute: int = 1_000  # team names (from events) kept per minute of spend; the rest as "(other)"
    max_breakdown: int = 6  # models per entity (teams per model) in a summary
    max_incidents: int = 1_000  # active and resolved together; resolved ones go first
    max_recent_resolved: int = 200
    max_breakers: int = 5_000  # closed ones go first
    max_recent_rejects: int = 20


class LiveView:
    """A bounded, thread-safe, in-memory read model of spend, incidents and breakers."""

    def __init__(self, limits: ViewLimits | None = None) -> None:
        self.limits = limits or ViewLimits()
        self._lock = threading.Lock()
        self._listeners: list[Listener] = []
        self._pending = False  # an event arrived after the last snapshot and listeners were told
        self.version = 0  # counts changes of incidents, breakers and feedback

        self.events = 0
        self.errors = 0
        self.spend_usd = 0.0
        self.first_ts = math.inf
        self.watermark = -math.inf  # newest event time seen

        self._buckets: dict[int, _Bucket] = {}
        self._window_minutes = max(1, int(self.limits.spend_window_seconds // _MINUTE))
        self._top_minutes = max(1, math.ceil(self.limits.top_window_seconds / _MINUTE))
        self._kept_from = -(1 << 62)  # minutes before this have no bucket
        self._detail_from = -(1 << 62)  # buckets before this have no per-entity detail
        self._cur_minute = -1
        self._cur: _Bucket | None = None
        self._entities: dict[str, dict[str, _EntityStats]] = {t: {} for t in ENTITY_TYPES}
        self._teams_seen: set[str] = set()

        self._incidents: dict[str, _Incident] = {}
        self._breakers: dict[str, BreakerChange] = {}

        self.rejected = 0
        self._reject_classes: Counter[str] = Counter()
        self._recent_rejects: deque[str] = deque(maxlen=self.limits.max_recent_rejects)

    # -- feeding ------------------------------------------------------------------------------

    def observe_event(self, ev: Usage, cost_usd: float) -> None:
        """One valid event and what it cost (the shell computes it as the engine does)."""
        ts = ev.timestamp.timestamp()
        failed = ev.status is not Status.OK
        minute = int(ts // _MINUTE)
        notify = False
        team = ev.team
        # Teams name their users, agents and sessions: each team's "assistant" is its own.
        user = None if ev.user is None else f"{team}{SEP}{ev.user}"
        agent = None if ev.agent_id is None else f"{team}{SEP}{ev.agent_id}"
        with self._lock:
            self.events += 1
            self.spend_usd += cost_usd
            if ts > self.watermark:
                self.watermark = ts
            if ts < self.first_ts:
                self.first_ts = ts
            if failed:
                self.errors += 1
            bucket = self._cur if minute == self._cur_minute else self._bucket(minute)
            if bucket is not None:
                bucket.events += 1
                if failed:
                    bucket.errors += 1
                teams = bucket.teams
                slot = team if team in teams or len(teams) < self.limits.max_teams_per_minute else OTHER
                teams[slot] = teams.get(slot, 0.0) + cost_usd
                by_type = bucket.by_type
                if by_type is not None:
                    d = by_type[0]
                    d[ev.api_key_id] = d.get(ev.api_key_id, 0.0) + cost_usd
                    if user is not None:
                        d = by_type[1]
                        d[user] = d.get(user, 0.0) + cost_usd
                    if agent is not None:
                        d = by_type[2]
                        d[agent] = d.get(agent, 0.0) + cost_usd
                    d = by_type[3]
                    d[ev.model] = d.get(ev.model, 0.0) + cost_usd
            entities = self._entities
            retry = ev.retry_attempt > 0
            self._count(entities["team"], team, team, ts, cost_usd, failed, retry, ev.model)
            self._count(entities["api_key"], ev.api_key_id, team, ts, cost_usd, failed, retry, ev.model)
            if user is not None:
                self._count(entities["user"], user, team, ts, cost_usd, failed, retry, ev.model)
            if agent is not None:
                self._count(entities["agent"], agent, team, ts, cost_usd, failed, retry, ev.model)
            if ev.session_id is not None:
                session = f"{team}{SEP}{ev.session_id}"
                self._count(entities["session"], session, team, ts, cost_usd, failed, retry, ev.model)
            self._count(entities["model"], ev.model, team, ts, cost_usd, failed, retry, team)
            if not self._pending:
                self._pending = notify = True
        if notify:
            self._notify("spend")

    def observe_alert(self, alert: Alert) -> None:
        """One alert record; the highest ``sequence`` of an incident is its state."""
        with self._lock:
            inc = self._incidents.get(alert.incident_id)
            if inc is None:
                inc = _Incident(alert)
                self._incidents[alert.incident_id] = inc
                self._evict_incidents()
            elif alert.sequence < inc.latest.sequence:
                return
            else:
                inc.latest = alert
                inc.peak_rate = max(inc.peak_rate, alert.cost_rate_usd_per_hour)
                inc.json = None
                if alert.status is AlertStatus.RESOLVED:
                    # Resolved incidents queue behind the others for eviction, newest last.
                    self._incidents[alert.incident_id] = self._incidents.pop(alert.incident_id)
            inc.history.append(
                {
                    "sequence": alert.sequence,
                    "status": alert.status.value,
                    "severity": alert.severity.value,
                    "detected_at": iso(alert.detected_at),
                    "cost_rate_usd_per_hour": alert.cost_rate_usd_per_hour,
                    "excess_cost_usd": alert.excess_cost_usd,
                }
            )
            self.version += 1
        self._notify("incidents")

    def observe_breaker(self, change: BreakerChange) -> None:
        """One breaker change; an older or equal ``version`` than the one shown is ignored."""
        key = change_key(change)
        with self._lock:
            current = self._breakers.get(key)
            if current is not None and change.version <= current.version:
                return
            self._breakers[key] = change
            if len(self._breakers) > self.limits.max_breakers:
                self._evict_breakers()
            self.version += 1
        self._notify("breakers")

    def drop_breaker(self, change: BreakerChange) -> None:
        """A breaker the breakers topic no longer holds (a tombstone; one from before teams, replaced)."""
        key = change_key(change)
        with self._lock:
            current = self._breakers.get(key)
            if current is None or current.version > change.version:
                return
            del self._breakers[key]
            self.version += 1
        self._notify("breakers")

    def observe_reject(self, reason: str) -> None:
        """A message that was not a valid event, with the shell's one-line reason."""
        notify = False
        with self._lock:
            self.rejected += 1
            self._reject_classes[reason_class(reason)] += 1
            self._recent_rejects.append(reason[:300])
            if not self._pending:
                self._pending = notify = True
        if notify:
            self._notify("rejects")

    def observe_feedback(self, feedback: IncidentFeedback) -> None:
        """An owner's verdict on an incident, shown beside it."""
        with self._lock:
            inc = self._incidents.get(feedback.incident_id)
            if inc is None:
                return
            inc.feedback = feedback
            inc.json = None
            self.version += 1
        self._notify("incidents")

    # -- change notification ------------------------------------------------------------------

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Call ``listener(topic)`` on changes (from the thread that fed the view); returns an unsubscribe."""
        with self._lock:
            self._listeners = [*self._listeners, listener]

        def unsubscribe() -> None:
            with self._lock:
                self._listeners = [fn for fn in self._listeners if fn is not listener]

        return unsubscribe

    def _notify(self, topic: str) -> None:
        for listener in self._listeners:  # a copy-on-write list: safe without the lock
            listener(topic)

    # -- reading ------------------------------------------------------------------------------

    def snapshot(self, spend_range_seconds: float = 6 * 3600.0, top_n: int = 10) -> dict[str, Any]:
        """Everything the page shows, JSON-ready. Re-arms the event notification."""
        with self._lock:
            self._pending = False
            return {
                "version": self.version,
                "now": _epoch_iso(self.watermark),
                "totals": self._totals(),
                "spend": self._spend_series(spend_range_seconds, _step_for(spend_range_seconds)),
                "incidents": {
                    "active": self._incident_list("active", 100),
                    "recent": self._incident_list("resolved", 50),
                },
                "breakers": self._breaker_list(),
                "top": self._top_spenders(top_n),
                "rejects": self._rejects(),
            }

    def totals(self) -> dict[str, Any]:
        with self._lock:
            return self._totals()

    def spend_series(self, range_seconds: float = 6 * 3600.0, step_seconds: int | None = None) -> dict[str, Any]:
        """Spend per team in ``step_seconds`` steps over the last ``range_seconds`` of event time."""
        with self._lock:
            return self._spend_series(range_seconds, step_seconds or _step_for(range_seconds))

    def incidents(self, which: IncidentFilter = "all", limit: int = 200) -> list[dict[str, Any]]:
        """Active incidents (most severe, then costliest first) and/or resolved ones (newest first)."""
        with self._lock:
            if which == "all":
                return self._incident_list("active", limit) + self._incident_list("resolved", limit)
            return self._incident_list(which, limit)

    def incident(self, incident_id: str) -> dict[str, Any] | None:
        """One incident with its record history and its breaker, if it has one."""
        with self._lock:
            inc = self._incidents.get(incident_id)
            if inc is None:
                return None
            out = dict(self._incident_json(inc))
            out["history"] = list(inc.history)
            out["evidence"] = inc.latest.evidence.model_dump(mode="json")
            out["recommended_action"] = inc.latest.recommended_action
            out["detector"] = inc.latest.detector.model_dump(mode="json")
            return out

    def incident_alert(self, incident_id: str) -> Alert | None:
        """The latest record of an incident (the server labels feedback with its kind and entity)."""
        with self._lock:
            inc = self._incidents.get(incident_id)
            return None if inc is None else inc.latest

    def breakers(self) -> list[dict[str, Any]]:
        with self._lock:
            return self._breaker_list()

    def breaker(self, entity: Entity, owner: str) -> BreakerChange | None:
        """The newest change of the breaker on ``entity`` (an agent's or a session's: of team ``owner``)."""
        with self._lock:
            return self._breakers.get(entity_key(entity, owner))

    def breaker_counts(self) -> dict[tuple[str, str], int]:
        """(entity type, state) -> how many breakers are in it."""
        with self._lock:
            counts: Counter[tuple[str, str]] = Counter((b.entity.type, b.state.value) for b in self._breakers.values())
            return dict(counts)

    def oldest_open_breaker(self) -> float | None:
        """Epoch seconds at which the longest-open breaker opened, or None when none is open."""
        with self._lock:
            opened = [b.changed_at.timestamp() for b in self._breakers.values() if b.state is BreakerState.OPEN]
            return min(opened) if opened else None

    def active_incident_counts(self) -> dict[tuple[str, str], int]:
        """(kind, severity) -> open incidents."""
        with self._lock:
            counts: Counter[tuple[str, str]] = Counter(
                (i.latest.kind.value, i.latest.severity.value)
                for i in self._incidents.values()
                if i.latest.status is not AlertStatus.RESOLVED
            )
            return dict(counts)

    def top_spenders(self, n: int = 10) -> dict[str, list[dict[str, Any]]]:
        """Per API key, user, agent and model: the ``n`` biggest spenders over the top window."""
        with self._lock:
            return self._top_spenders(n)

    def owner(self, entity: Entity) -> str | None:
        """The team that owns an entity, as its newest event said (a team owns itself).

        A user, agent or session id that several teams use has no one owner: None.
        """
        if entity.type == "team":
            return entity.id
        with self._lock:
            if entity.type in SCOPED:
                teams = self._teams_of(entity.type, entity.id)
                return teams[0] if len(teams) == 1 else None
            stats = self._entities[entity.type].get(entity.id)
            return None if stats is None else stats.owner

    def entity(self, type_: str, id_: str, team: str | None = None) -> dict[str, Any] | None:
        """Summary of one entity: spend, events, errors, its models, its incidents and its breaker.

        A user, agent or session is one team's (``team``; None: of the team that spent most on
        that id); ``teams`` lists every team the view saw use the id.
        """
        if type_ not in ENTITY_TYPES:
            return None
        with self._lock:
            teams: list[str] = []
            key: str | None = id_
            if type_ in SCOPED:
                teams = self._teams_of(type_, id_)
                if team is None and teams:
                    store = self._entities[type_]
                    team = max(teams, key=lambda t: store[store_key(type_, t, id_)].spend)
                key = None if team is None else store_key(type_, team, id_)
            stats = None if key is None else self._entities[type_].get(key)
            entity = f"{type_}:{id_}"
            incidents = [
                self._incident_json(inc)
                for inc in self._incidents.values()
                if _involves(inc.latest, type_, id_) and (team is None or inc.latest.owner == team)
            ]
            # An agent or a session has a breaker per team that named it (see detector.breakers).
            breakers = [
                b
                for b in self._breakers.values()
                if b.entity.type == type_ and b.entity.id == id_ and (team is None or b.owner == team)
            ]
            breaker = breakers[0] if breakers else None
            if stats is None and not incidents and breaker is None:
                return None
            out: dict[str, Any] = {"entity": entity, "type": type_, "id": id_}
            if type_ in SCOPED:
                out["teams"] = teams
            if stats is not None:
                total = stats.spend or 1.0
                breakdown = sorted(stats.breakdown.items(), key=lambda kv: -kv[1])
                out |= {
                    "owner": stats.owner,
                    "events": stats.events,
                    "errors": stats.errors,
                    "retries": stats.retries,
                    "spend_usd": round(stats.spend, 6),
                    "first_seen": _epoch_iso(stats.first),
                    "last_seen": _epoch_iso(stats.last),
                    "breakdown_by": "team" if type_ == "model" else "model",
                    "breakdown": [
                        {"name": k, "spend_usd": round(v, 6), "share": round(v / total, 4)} for k, v in breakdown
                    ],
                }
            else:
                out["owner"] = incidents[0]["owner"] if incidents else (breaker.owner if breaker else None)
            if type_ in TOP_TYPES:
                index = TOP_TYPES.index(type_)
                spend = 0.0
                if key is not None:
                    spend = sum(b.by_type[index].get(key, 0.0) for b in self._top_buckets() if b.by_type is not None)
                out["spend_last_window_usd"] = round(spend, 6)
                out["window_seconds"] = self.limits.top_window_seconds
            elif type_ == "team":
                out["spend_series"] = self._spend_series(self.limits.top_window_seconds, _MINUTE, only=id_)
            out["incidents"] = incidents
            out["breaker"] = _breaker_json(breaker) if breaker is not None else None
            return out

    def _teams_of(self, type_: str, id_: str) -> list[str]:
        """The teams the view saw use this user, agent or session id (a scan: for a page, not per event)."""
        return sorted(team for team, _, ident in (k.partition(SEP) for k in self._entities[type_]) if ident == id_)

    # -- internals (the lock is held) ---------------------------------------------------------

    def _count(
        self,
        store: dict[str, _EntityStats],
        key: str,
        owner: str,
        ts: float,
        cost: float,
        failed: bool,
        retry: bool,
        part: str,
    ) -> None:
        stats = store.get(key)
        if stats is None:
            if len(store) >= self.limits.max_entities_per_type:
                self._evict_entities(store)
            stats = store[key] = _EntityStats(owner, ts)
        stats.owner = owner
        stats.events += 1
        stats.spend += cost
        if failed:
            stats.errors += 1
        if retry:
            stats.retries += 1
        if ts > stats.last:
            stats.last = ts
        elif ts < stats.first:
            stats.first = ts
        breakdown = stats.breakdown
        if part in breakdown:
            breakdown[part] += cost
        elif len(breakdown) < self.limits.max_breakdown:
            breakdown[part] = cost
        else:
            breakdown[OTHER] = breakdown.get(OTHER, 0.0) + cost

    def _evict_entities(self, store: dict[str, _EntityStats]) -> None:
        """Drop the least recently seen quarter (amortised: one sort per quarter of the bound)."""
        drop = max(1, len(store) // 4)
        for key in heapq.nsmallest(drop, store, key=lambda k: store[k].last):
            del store[key]

    def _bucket(self, minute: int) -> _Bucket | None:
        """The bucket of ``minute``, made if the chart still remembers it; older ones are let go."""
        bucket = self._buckets.get(minute)
        if bucket is not None:
            return bucket
        if minute < self._kept_from:
            return None  # older than the chart remembers
        bucket = self._buckets[minute] = _Bucket()
        if minute < self._detail_from:
            bucket.by_type = None  # a late event older than the top window: team spend only
        if minute > self._cur_minute:
            self._cur_minute, self._cur = minute, bucket
            self._expire(minute)
        return bucket

    def _expire(self, newest: int) -> None:
        """Forget minutes older than the chart's window, and per-entity detail older than the top window."""
        kept_from = newest - self._window_minutes + 1
        if self._kept_from < kept_from:
            for m in self._minutes_between(self._kept_from, kept_from):
                del self._buckets[m]
            self._kept_from = kept_from
        detail_from = newest - self._top_minutes + 1
        if self._detail_from < detail_from:
            for m in self._minutes_between(self._detail_from, detail_from):
                self._buckets[m].by_type = None
            self._detail_from = detail_from

    def _minutes_between(self, lo: int, hi: int) -> list[int]:
        """Minutes in [lo, hi) that have a bucket; walks the range or the buckets, whichever is shorter."""
        if hi - lo > len(self._buckets):
            return [m for m in self._buckets if lo <= m < hi]
        return [m for m in range(lo, hi) if m in self._buckets]

    def _top_buckets(self) -> Iterable[_Bucket]:
        if self._cur_minute < 0:
            return []
        newest = self._cur_minute
        return [b for m in range(newest - self._top_minutes + 1, newest + 1) if (b := self._buckets.get(m)) is not None]

    def _top_spenders(self, n: int) -> dict[str, list[dict[str, Any]]]:
        sums: list[dict[str, float]] = [{} for _ in TOP_TYPES]
        for bucket in self._top_buckets():
            if bucket.by_type is None:
                continue
            for acc, d in zip(sums, bucket.by_type, strict=True):
                for k, v in d.items():
                    acc[k] = acc.get(k, 0.0) + v
        out: dict[str, list[dict[str, Any]]] = {}
        for type_, acc in zip(TOP_TYPES, sums, strict=True):
            total = sum(acc.values()) or 1.0
            store = self._entities[type_]
            rows = []
            for k, v in heapq.nlargest(n, acc.items(), key=lambda kv: kv[1]):
                owner: str | None
                if type_ in SCOPED:  # kept as "<team>\x1f<id>"
                    owner, _, k = k.partition(SEP)
                else:
                    stats = store.get(k)
                    owner = (stats.owner if stats is not None else None) if type_ != "model" else None
                rows.append({"id": k, "owner": owner, "spend_usd": round(v, 6), "share": round(v / total, 4)})
            out[type_] = rows
        return out

    def _spend_series(self, range_seconds: float, step: int, only: str | None = None) -> dict[str, Any]:
        # A step longer than the range is one point: no more minutes to walk than the range has.
        step = max(_MINUTE, int(min(step, max(range_seconds, _MINUTE)) // _MINUTE) * _MINUTE)
        points = max(1, math.ceil(range_seconds / step))
        if self._cur_minute < 0:
            return {"start": None, "step_seconds": step, "points": 0, "series": [], "total": []}
        per = step // _MINUTE
        end = (self._cur_minute // per + 1) * per  # first minute after the last step
        start = end - points * per
        columns: list[dict[str, float]] = []
        for p in range(points):
            col: dict[str, float] = {}
            for m in range(start + p * per, start + (p + 1) * per):
                b = self._buckets.get(m)
                if b is None:
                    continue
                for team, usd in b.teams.items():
                    if only is None or team == only:
                        col[team] = col.get(team, 0.0) + usd
            columns.append(col)
        by_team: dict[str, float] = {}
        for col in columns:
            for team, usd in col.items():
                by_team[team] = by_team.get(team, 0.0) + usd
        named = ((t, usd) for t, usd in by_team.items() if t != OTHER)  # OTHER: teams past max_teams_per_minute
        keep = [t for t, _ in heapq.nlargest(self.limits.max_chart_teams, named, key=lambda kv: kv[1])]
        rest = [t for t in by_team if t not in set(keep)]
        series = [
            {"team": t, "total_usd": round(by_team[t], 6), "values": [round(c.get(t, 0.0), 6) for c in columns]}
            for t in keep
        ]
        if rest:
            series.append(
                {
                    "team": OTHER,
                    "total_usd": round(sum(by_team[t] for t in rest), 6),
                    "values": [round(sum(c.get(t, 0.0) for t in rest), 6) for c in columns],
                }
            )
        return {
            "start": _epoch_iso(start * _MINUTE),
            "start_epoch": start * _MINUTE,
            "step_seconds": step,
            "points": points,
            "series": series,
            "total": [round(sum(c.values()), 6) for c in columns],
        }

    def _totals(self) -> dict[str, Any]:
        active = [i for i in self._incidents.values() if i.latest.status is not AlertStatus.RESOLVED]
        hour = [b for b in self._top_buckets()]
        return {
            "events": self.events,
            "errors": self.errors,
            "rejected": self.rejected,
            "spend_usd": round(self.spend_usd, 6),
            "spend_last_window_usd": round(sum(sum(b.teams.values()) for b in hour), 6),
            "window_seconds": self.limits.top_window_seconds,
            "first_event_at": _epoch_iso(self.first_ts),
            "watermark": _epoch_iso(self.watermark),
            "teams": len(self._entities["team"]),
            "active_incidents": len(active),
            "critical_incidents": sum(1 for i in active if i.latest.severity.value == "critical"),
            "active_cost_rate_usd_per_hour": round(sum(i.latest.cost_rate_usd_per_hour for i in active), 6),
            "active_excess_cost_usd": round(sum(i.latest.excess_cost_usd for i in active), 6),
            "open_breakers": sum(1 for b in self._breakers.values() if b.state is not BreakerState.CLOSED),
        }

    def _incident_json(self, inc: _Incident) -> dict[str, Any]:
        if inc.json is None:
            a = inc.latest
            fb = inc.feedback
            inc.json = {
                "incident_id": a.incident_id,
                "kind": a.kind.value,
                "status": a.status.value,
                "severity": a.severity.value,
                "entity": str(a.entity),
                "entity_type": a.entity.type,
                "entity_id": a.entity.id,
                "owner": a.owner,
                "first_detected_at": iso(inc.first_detected),
                "detected_at": iso(a.detected_at),
                "started_at": iso(a.started_at),
                "resolved_at": iso(a.resolved_at),
                "records": a.sequence + 1,
                "cost_rate_usd_per_hour": a.cost_rate_usd_per_hour,
                "peak_cost_rate_usd_per_hour": inc.peak_rate,
                "excess_cost_usd": a.excess_cost_usd,
                "summary": a.explanation.summary,
                "recommended_action": a.recommended_action,
                "metric": a.evidence.metric,
                "ratio": a.evidence.ratio,
                "top_contributors": [
                    {"entity": str(c.entity), "cost_usd": c.cost_usd, "share": c.share}
                    for c in a.explanation.top_contributors
                ],
                "related_incidents": list(a.related_incidents),
                "feedback": None
                if fb is None
                else {"label": fb.label.value, "actor": fb.actor, "note": fb.note, "labelled_at": iso(fb.labelled_at)},
            }
        return inc.json

    def _incident_list(self, which: Literal["active", "resolved"], limit: int) -> list[dict[str, Any]]:
        if which == "active":
            active = [i for i in self._incidents.values() if i.latest.status is not AlertStatus.RESOLVED]
            active.sort(key=lambda i: (-i.latest.severity.rank, -i.latest.cost_rate_usd_per_hour))
            return [self._incident_json(i) for i in active[:limit]]
        resolved = []
        for inc in reversed(self._incidents.values()):  # resolved ones were moved to the end as they resolved
            if inc.latest.status is AlertStatus.RESOLVED:
                resolved.append(self._incident_json(inc))
                if len(resolved) >= limit:
                    break
        return resolved

    def _evict_incidents(self) -> None:
        limits = self.limits
        resolved = [k for k, i in self._incidents.items() if i.latest.status is AlertStatus.RESOLVED]
        for key in resolved[: max(0, len(resolved) - limits.max_recent_resolved)]:
            del self._incidents[key]
        while len(self._incidents) > limits.max_incidents:
            del self._incidents[next(iter(self._incidents))]

    def _evict_breakers(self) -> None:
        closed = sorted((b.changed_at, k) for k, b in self._breakers.items() if b.state is BreakerState.CLOSED)
        for _, key in closed[: len(self._breakers) - self.limits.max_breakers]:
            del self._breakers[key]
        while len(self._breakers) > self.limits.max_breakers:
            del self._breakers[min(self._breakers, key=lambda k: self._breakers[k].changed_at)]

    def _breaker_list(self) -> list[dict[str, Any]]:
        order = {BreakerState.OPEN: 0, BreakerState.HALF_OPEN: 1, BreakerState.CLOSED: 2}
        rows = sorted(self._breakers.values(), key=lambda b: (order[b.state], -b.changed_at.timestamp(), str(b.entity)))
        return [_breaker_json(b) for b in rows[:200]]

    def _rejects(self) -> dict[str, Any]:
        return {
            "total": self.rejected,
            "by_reason": dict(self._reject_classes.most_common(20)),
            "recent": list(self._recent_rejects),
        }


def _involves(alert: Alert, type_: str, id_: str) -> bool:
    if alert.entity.type == type_ and alert.entity.id == id_:
        return True
    return any(c.entity.type == type_ and c.entity.id == id_ for c in alert.explanation.top_contributors)


def _breaker_json(b: BreakerChange) -> dict[str, Any]:
    return {
        "key": change_key(b),
        "entity": str(b.entity),
        "entity_type": b.entity.type,
        "entity_id": b.entity.id,
        "owner": b.owner,
        "state": b.state.value,
        "previous_state": b.previous_state.value,
        "version": b.version,
        "changed_at": iso(b.changed_at),
        "expires_at": iso(b.expires_at),
        "reason": b.reason,
        "incident_id": b.incident_id,
        "actor": b.actor,
    }


def _step_for(range_seconds: float) -> int:
    """Chart resolution: one-minute steps up to an hour, five up to six hours, then about 100 points.

    >>> _step_for(3600), _step_for(6 * 3600), _step_for(24 * 3600)
    (60, 300, 900)
    """
    if range_seconds <= 3600:
        return _MINUTE
    if range_seconds <= 6 * 3600:
        return 5 * _MINUTE
    return max(_MINUTE, math.ceil(range_seconds / 96 / _MINUTE) * _MINUTE)


def _epoch_iso(seconds: float) -> str | None:
    if not math.isfinite(seconds):
        return None
    return iso(datetime.fromtimestamp(seconds, UTC))
