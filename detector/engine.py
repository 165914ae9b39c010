"""The detection engine: one pure core that both shells drive.

``detector replay`` feeds it events from a file, ``detector worker`` from Kafka; both call
:meth:`Engine.process` per event and get back the alerts it raised. The engine owns event
time: it advances a tick clock from the events themselves, asks each detector for findings
every ``interval`` seconds of event time, folds them into incidents, and lets idle state go.
No I/O and no wall clock, so the same events always give the same alerts.

>>> from detector.events import UsageEvent
>>> engine = Engine.default()
>>> alerts = engine.process(UsageEvent.model_validate({
...     "event_id": "e1", "timestamp": "2026-11-02T09:30:00Z", "team": "search", "api_key_id": "k1",
...     "provider": "openai", "model": "gpt-4o", "operation": "chat", "input_tokens": 1000,
...     "output_tokens": 100, "status": "ok"}))
>>> alerts, engine.stats.events, round(engine.stats.spend_by_team["search"], 4)
([], 1, 0.0035)
"""

from __future__ import annotations

import inspect
import math
import pickle
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from detector.detectors.agent_loop import AgentLoop
from detector.detectors.base import Detector, Finding
from detector.detectors.budget_burn import BudgetBurn
from detector.detectors.cost_spike import CostSpike
from detector.detectors.retry_storm import RetryStorm
from detector.events import Alert, AlertKind, Entity, EntityType, Usage
from detector.incidents import IncidentBook
from detector.pricing import PriceCatalog
from detector.settings import Settings

SNAPSHOT_VERSION = 1
MAX_TEAMS = 10_000  # teams whose spend the stats keep apart (names come from events); the rest as OTHER_TEAMS
OTHER_TEAMS = "(other)"
EARLIEST = 946_684_800.0  # 2000-01-01T00:00:00Z: no LLM bill is older
MAX_CLOCK_SKEW = 300.0  # how far ahead of the shell's clock an event may be dated (see Engine.horizon)


class OutOfTime(ValueError):
    """An event dated where no event can be: before 2000, or ahead of the shell's clock."""


Scope = Literal["all", "key", "team"]

# The order in which one tick's findings meet the incident book: the first finding of a (kind,
# group) opens the incident and names it, so the most specific entity comes first (a key's
# spike names the incident its team's spike folds into). A fixed order also makes the book's
# result the same whether the findings came from one engine or from a key and a team engine.
_KIND_RANK = {kind: i for i, kind in enumerate(AlertKind)}
_TYPE_RANK: dict[EntityType, int] = {"session": 0, "agent": 1, "user": 2, "api_key": 3, "model": 4, "team": 5}


def _booking_order(f: Finding) -> tuple[int, int, str, float]:
    return _KIND_RANK[f.kind], _TYPE_RANK[f.entity.type], f.entity.id, f.at


@dataclass
class EngineStats:
    events: int = 0
    late_events: int = 0  # older than the watermark by more than the allowed lateness
    unpriced_events: int = 0  # no cost_usd and a model the catalog does not know
    spend_by_team: defaultdict[str, float] = field(default_factory=lambda: defaultdict(float))
    alerts: Counter[tuple[str, str]] = field(default_factory=Counter)  # (kind, status) -> count
    first_ts: float = math.inf
    watermark: float = -math.inf


class Engine:
    """Runs detectors over events in event time and turns their findings into alerts."""

    def __init__(
        self,
        detectors: list[Detector],
        catalog: PriceCatalog,
        book: IncidentBook | None = None,
        tick_seconds: float = 5.0,
        evict_every: float = 300.0,
        allowed_lateness: float = 60.0,
    ) -> None:
        self.detectors = detectors
        self.catalog = catalog
        self.book = book or IncidentBook()
        self.tick_seconds = tick_seconds
        self.evict_every = evict_every
        self.allowed_lateness = allowed_lateness
        self.stats = EngineStats()
        self._next_tick = math.inf
        self._due = [math.inf] * len(detectors)
        self._next_evict = math.inf
        self._pinned: set[tuple[str, Entity]] = set()  # (team, entity) of open incidents
        self.last_cost = 0.0  # of the last event processed, for shells that show spend
        # The latest event time an event may carry (+inf: any). Event time follows the newest event,
        # so one event dated next year (a producer's clock, a time zone taken for UTC) would move
        # every judgement there and leave the stream behind it late. The engine has no clock: the
        # shells set this from theirs (now + MAX_CLOCK_SKEW), and an event past it is refused.
        self.horizon = math.inf
        # Hand-off (see :meth:`receive`): this engine's findings, (tick time, findings), for another
        # engine's book; and the findings other engines handed to this one, not yet booked.
        self.hands_off = False
        self._advanced = -math.inf  # the furthest event time advance() was asked for
        self.handed: list[tuple[float, list[Finding]]] = []
        self._received: list[Finding] = []

    @classmethod
    def from_settings(cls, settings: Settings, scope: Scope = "all") -> Engine:
        """The engine the settings describe; ``scope`` splits it for a worker that repartitions by team.

        ``key``: every judgement but the team-level ones (events keyed by API key suffice),
        whose findings it hands off (:meth:`receive`) instead of booking them; ``team``: only
        the team-level ones (``budget_burn`` and the ``team`` entities of the others), for
        events repartitioned by team, and the book of every incident of its teams. ``key`` and
        ``team`` together judge and alert what ``all`` does.
        """
        catalog = PriceCatalog.default().with_overrides(settings.pricing)
        detectors: list[Detector] = []
        for kind in (CostSpike, RetryStorm):
            params = settings.detector_params(kind.name)
            types: tuple[EntityType, ...] = params.pop("entity_types", kind.DEFAULT_ENTITY_TYPES)
            if scope == "key":
                types = tuple(t for t in types if t != "team")
            elif scope == "team":
                types = tuple(t for t in types if t == "team")
            if types:
                detectors.append(kind(entity_types=types, **params))
        if scope != "team":
            detectors.append(AgentLoop(**settings.detector_params(AgentLoop.name)))
        if scope != "key":
            budgets = settings.budgets()
            spent = {t: s.spent_to_date_usd for t, s in settings.teams.items()}
            detectors.append(
                BudgetBurn(budgets=budgets, spent_to_date=spent, **settings.detector_params(BudgetBurn.name))
            )
        engine = cls(detectors, catalog, tick_seconds=settings.tick_seconds)
        engine.hands_off = scope == "key"
        return engine

    @classmethod
    def default(cls) -> Engine:
        return cls.from_settings(Settings())

    def process(self, ev: Usage) -> list[Alert]:
        """Observe one event; returns the alerts that became due up to its event time."""
        ts = ev.timestamp.timestamp()
        if not EARLIEST <= ts <= self.horizon:
            raise OutOfTime(self._out_of_time(ts))
        stats = self.stats
        if ts >= self._next_tick:
            alerts = self.advance(ts)
        else:
            alerts = []
            if self._next_tick == math.inf:
                self._start(ts)
        if ts > stats.watermark:
            stats.watermark = ts
        elif ts < stats.watermark - self.allowed_lateness:
            stats.late_events += 1
        cost = ev.cost_usd
        if cost is None:
            cost = self.catalog.cost(ev.model, ev.input_tokens, ev.output_tokens, ev.cached_input_tokens or 0)
            if cost == 0.0 and self.catalog.lookup(ev.model) is None:
                stats.unpriced_events += 1
        stats.events += 1
        by_team = stats.spend_by_team
        by_team[ev.team if ev.team in by_team or len(by_team) < MAX_TEAMS else OTHER_TEAMS] += cost
        self.last_cost = cost
        for det in self.detectors:
            det.observe(ev, ts, cost)
        return alerts

    def _out_of_time(self, ts: float) -> str:
        if ts < EARLIEST:
            return "timestamp: before 2000-01-01T00:00:00Z"
        ahead = ts - (self.horizon - MAX_CLOCK_SKEW)
        when = f"{ahead / 86400:.0f} days" if ahead >= 2 * 86400 else f"{ahead / 60:.0f} min"
        return (
            f"timestamp: {when} ahead of the clock, more than the {MAX_CLOCK_SKEW:.0f} s of skew allowed "
            "(the producer's clock, or a local time sent as UTC?)"
        )

    def receive(self, at: float, findings: Sequence[Finding]) -> None:
        """Take findings another engine made at its tick ``at``, to book with this engine's own of that tick.

        A worker that repartitions by team judges keys, agents and sessions in the engines of
        the usage partitions and teams in the engines of the by-team partitions. The former
        hand their findings (:attr:`handed`) to the engine of the finding's team, so one book
        sees all of a team's findings, as the one engine of a replay does: a key's spike and its
        team's fold into one incident, and incidents of a team link to each other.

        Findings are received in event-time order with the events: after those before ``at``,
        before those at or after it. They are booked at this engine's tick ``at``, which runs on
        the next event or :meth:`advance` past it, so the findings of every engine that passed
        ``at`` are booked together, in the fixed order one engine's are.
        """
        self._received.extend(findings)
        if self._next_tick == math.inf:  # the first thing this engine hears of: its tick at ``at`` is due
            self._start(at)
            self._next_tick = min(self._next_tick, at)

    @property
    def next_tick(self) -> float:
        """The event time of the next tick (+inf before the first event)."""
        return self._next_tick

    @property
    def event_time(self) -> float:
        """How far event time has got: the newest event, or further where the shell advanced it (idle clock)."""
        return max(self.stats.watermark, self._advanced)

    def advance(self, now: float) -> list[Alert]:
        """Run every tick boundary up to event time ``now``."""
        if now > self._advanced:
            self._advanced = now
        alerts: list[Alert] = []
        tick = self.tick_seconds
        if now - self._next_tick > 3600:
            # A long silence: judge once at its end instead of ticking through it.
            self._next_tick = math.floor(now / tick) * tick
        while self._next_tick <= now:
            alerts.extend(self._tick(self._next_tick))
            self._next_tick += tick
        return alerts

    def finish(self) -> list[Alert]:
        """Judge once more at the last event time (the end of a replay). Open incidents stay open."""
        if self._next_tick == math.inf:
            return []
        return self._tick(self.stats.watermark)

    def _start(self, now: float) -> None:
        tick = self.tick_seconds
        self.stats.first_ts = now
        self._next_tick = math.floor(now / tick) * tick + tick
        self._due = [math.floor(now / d.interval) * d.interval + d.interval for d in self.detectors]
        self._next_evict = now + self.evict_every

    def _tick(self, now: float) -> list[Alert]:
        findings: list[Finding] = []
        for i, det in enumerate(self.detectors):
            if now >= self._due[i]:
                findings.extend(det.evaluate(now))
                interval = det.interval
                self._due[i] = math.floor(now / interval) * interval + interval
        if self._received:
            due = [f for f in self._received if f.at <= now]
            self._received = [f for f in self._received if f.at > now]
            findings.extend(due)
        if len(findings) > 1:
            findings.sort(key=_booking_order)
        if self.hands_off and findings:
            self.handed.append((now, findings))
        alerts = self.book.observe(findings) if findings else []
        alerts.extend(self.book.tick(now))
        if alerts:
            self._sync_pins()
            if self.hands_off:
                # The team's engine books these; this book only says whose state to keep (pins).
                alerts = []
            for a in alerts:
                self.stats.alerts[(a.kind.value, a.status.value)] += 1
        if now >= self._next_evict:
            for det in self.detectors:
                det.evict(now)
            self._next_evict = now + self.evict_every
        return alerts

    def _sync_pins(self) -> None:
        """Keep the state of entities with an open incident, however idle, until it resolves."""
        wanted = self.book.open_entities()
        for team, entity in wanted - self._pinned:
            for det in self.detectors:
                det.pin(entity, team, True)
        for team, entity in self._pinned - wanted:
            for det in self.detectors:
                det.pin(entity, team, False)
        self._pinned = wanted

    def adopt(self, old: Engine) -> Engine:
        """Carry on from ``old`` (restored from a snapshot) with this engine's parameters; returns self.

        What was learned (baselines, open incidents, counters, event time) comes from ``old``;
        thresholds, budgets, prices and which detectors run come from the settings this engine
        was built with, so a raised budget or a new threshold takes effect on restart instead of
        living on in the snapshot. A detector new to the settings starts learning; one dropped
        from them is gone, and its open incidents resolve once quiet.
        """
        self.book, self.stats, self.last_cost = old.book, old.stats, old.last_cost
        self.handed, self._received = getattr(old, "handed", []), getattr(old, "_received", [])  # older snapshots
        self._next_tick, self._next_evict = old._next_tick, old._next_evict
        self._advanced = getattr(old, "_advanced", -math.inf)
        was = {det.name: (det, due) for det, due in zip(old.detectors, old._due, strict=True)}
        started = self._next_tick != math.inf
        for i, det in enumerate(self.detectors):
            prior, due = was.get(det.name, (None, math.inf))
            if prior is not None:
                det.adopt(prior)
            if started and (prior is None or prior.interval != det.interval):
                due = math.floor(self.stats.watermark / det.interval) * det.interval + det.interval
            self._due[i] = due
        self._pinned = set()
        self._sync_pins()  # the stores kept their pins; a store new to the settings gets them here
        return self

    def differences(self, old: Engine) -> list[str]:
        """What this engine's parameters change from ``old``'s, one ``detector.param: before -> after`` each.

        For the log of a worker that restores a snapshot: it says which new settings took effect.
        """
        changes = []
        if old.tick_seconds != self.tick_seconds:
            changes.append(f"tick_seconds: {old.tick_seconds} -> {self.tick_seconds}")
        was = {det.name: det for det in old.detectors}
        now = {det.name: det for det in self.detectors}
        changes += [f"{name}: no longer run" for name in sorted(was.keys() - now.keys())]
        changes += [f"{name}: new" for name in sorted(now.keys() - was.keys())]
        for name in sorted(now.keys() & was.keys()):
            for param in list(inspect.signature(type(now[name]).__init__).parameters)[1:]:
                before, after = getattr(was[name], param, None), getattr(now[name], param, None)
                if isinstance(before, dict) and isinstance(after, dict):  # e.g. budgets: only the keys that changed
                    for key in sorted(before.keys() | after.keys()):
                        if before.get(key) != after.get(key):
                            changes.append(f"{name}.{param}[{key}]: {before.get(key)} -> {after.get(key)}")
                elif before != after:
                    changes.append(f"{name}.{param}: {before} -> {after}")
        return changes

    def entity_count(self) -> int:
        return sum(det.entity_count() for det in self.detectors)

    def snapshot(self) -> bytes:
        """Everything learned and every open incident, as bytes a restarted worker restores."""
        return pickle.dumps((SNAPSHOT_VERSION, self), protocol=pickle.HIGHEST_PROTOCOL)

    @staticmethod
    def restore(blob: bytes) -> Engine:
        """The engine a snapshot holds, parameters included: see :meth:`adopt` to run it with new ones."""
        version, engine = pickle.loads(blob)
        if version != SNAPSHOT_VERSION or not isinstance(engine, Engine):
            raise ValueError(f"snapshot version {version} is not {SNAPSHOT_VERSION}")
        return engine
