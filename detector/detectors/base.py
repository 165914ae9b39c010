"""What every detector is and what it returns.

A detector is small and pure, like a river estimator: constructor arguments are its
parameters, ``observe`` takes one event with its event time and cost, ``evaluate`` takes the
event-time ``now`` and returns findings. It holds no I/O and reads no clock. Scoring (how
unusual) lives in the detector; deciding what is one incident lives in the incident book.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Any, ClassVar, Protocol, Self, TypeVar

from detector.events import AlertKind, Contributor, DetectorRef, Entity, EntityType, Evidence, Severity, Usage
from detector.state import EntityStore

S = TypeVar("S")


@dataclass(frozen=True, slots=True)
class Finding:
    """One detector's verdict that an entity is anomalous right now.

    ``group`` says which findings share a root cause: the incident book folds findings of
    the same kind and group into one incident.
    """

    kind: AlertKind
    entity: Entity
    team: str
    group: str
    at: float
    started_at: float
    severity: Severity
    score: float
    evidence: Evidence
    summary: str
    cost_rate_usd_per_hour: float
    excess_usd_per_hour: float
    recommended_action: str
    detector: DetectorRef
    contributors: tuple[Contributor, ...] = field(default=())


class Detector(Protocol):
    name: ClassVar[str]
    version: ClassVar[str]
    interval: float

    def observe(self, ev: Usage, ts: float, cost: float) -> None: ...

    def evaluate(self, now: float) -> list[Finding]: ...

    def evict(self, now: float) -> int: ...

    def pin(self, entity: Entity, team: str, pinned: bool) -> None: ...

    def entity_count(self) -> int: ...

    def adopt(self, old: Self) -> None:
        """Take over what ``old`` (the same detector, restored from a snapshot) learned; keep own parameters."""
        ...


KEY_FIELDS: dict[EntityType, str] = {
    "team": "team",
    "api_key": "api_key_id",
    "user": "user",
    "agent": "agent_id",
    "session": "session_id",
    "model": "model",
}
"""Which event field names the entity of each type."""

# Users, agents and sessions are named by the teams that run them ("assistant" in two teams is two
# agents): their state is kept per team, under "<team>\x1f<id>". Keys, models and teams are global.
SCOPED: frozenset[EntityType] = frozenset({"user", "agent", "session"})
SEP = "\x1f"


def store_key(etype: EntityType, team: str, ident: str) -> str:
    """Where an entity's state is kept: its id, scoped by its team for the types teams name."""
    return f"{team}{SEP}{ident}" if etype in SCOPED else ident


def entity_id(etype: EntityType, key: str) -> str:
    """The entity id of a store key (what alerts and breakers name).

    >>> entity_id("user", store_key("user", "ads", "eu" + SEP + "bob")) == "eu" + SEP + "bob"
    True
    """
    return key.partition(SEP)[2] if etype in SCOPED else key  # a team name holds no SEP; an id may


class ScopedKey:
    """The store key of an event's user, agent or session: ``store_key`` as a picklable getter."""

    __slots__ = ("field",)

    def __init__(self, field: str) -> None:
        self.field = field

    def __call__(self, ev: Usage) -> str | None:
        ident: str | None = getattr(ev, self.field)
        return None if ident is None else f"{ev.team}{SEP}{ident}"

    def __reduce__(self) -> tuple[type[ScopedKey], tuple[str]]:
        return ScopedKey, (self.field,)


def keyed_stores(stores: dict[EntityType, EntityStore[S]]) -> list[tuple[EntityType, EntityStore[S], Any]]:
    """(type, store, getter of the event's store key for that type), for a tight observe loop."""
    return [
        (etype, store, ScopedKey(KEY_FIELDS[etype]) if etype in SCOPED else attrgetter(KEY_FIELDS[etype]))
        for etype, store in stores.items()
    ]


class EntityStores:
    """Eviction, pinning and counting for detectors that keep state in entity stores."""

    _stores: dict[EntityType, EntityStore[Any]]

    def evict(self, now: float) -> int:
        return sum(store.evict(now) for store in self._stores.values())

    def pin(self, entity: Entity, team: str, pinned: bool) -> None:
        store = self._stores.get(entity.type)
        if store is not None:
            key = store_key(entity.type, team, entity.id)
            (store.pinned.add if pinned else store.pinned.discard)(key)

    def entity_count(self) -> int:
        return sum(len(s) for s in self._stores.values())

    def _take_stores(self, old: EntityStores) -> None:
        """Each store takes the entities of ``old``'s store of its type; types no longer judged are dropped."""
        for etype, store in self._stores.items():
            was = old._stores.get(etype)
            if was is not None:
                store.take(was)
                if etype in SCOPED:  # a snapshot from before state was kept per team: learnt again
                    store.drop(lambda key: SEP not in key)


def top_contributors(
    rows: Iterable[tuple[Entity, float]], limit: int = 3, total: float | None = None
) -> tuple[Contributor, ...]:
    """Sum dollars per entity and keep the biggest ``limit`` with their share of ``total``."""
    spend: defaultdict[Entity, float] = defaultdict(float)
    for entity, usd in rows:
        spend[entity] += usd
    whole = total if total is not None else sum(spend.values())
    ranked = sorted(spend.items(), key=lambda kv: kv[1], reverse=True)[:limit]
    return tuple(
        Contributor(entity=e, cost_usd=round(usd, 4), share=round(min(usd / whole, 1.0), 4) if whole > 0 else 0.0)
        for e, usd in ranked
        if usd > 0
    )


def usd(x: float) -> str:
    """Dollars the way a person reads them at 3 a.m.: $0.042, $3.20, $1,240."""
    if x >= 100:
        return f"${x:,.0f}"
    if x >= 1:
        return f"${x:,.2f}"
    if 0 < x < 0.01:  # a cheap request: keep two significant digits, not "$0.000"
        return "$" + f"{x:.6f}".rstrip("0")
    return f"${x:.3f}"
