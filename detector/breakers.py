"""Circuit breakers: a pure state machine per entity, no I/O and no wall clock.

A breaker guards one team, API key, agent or session and goes through three states:

* ``closed`` → ``open`` when it is tripped (by policy when an incident fires, or by hand), for
  a TTL (``None`` expiry: until closed by hand);
* ``open`` → ``half_open`` when the TTL runs out: gateways let a probe request through;
* ``half_open`` → ``closed`` when the entity goes a whole probe period without a new trip, or
  → ``open`` again, with ``backoff`` times the last TTL (up to ``max_ttl``), when it is tripped;
* → ``closed`` by hand, from any state.

:class:`BreakerBoard` holds the breakers and returns the :class:`~detector.events.BreakerChange`
records each call produced. Times are epoch seconds of event time, as in the engine; a
change caused by time (an expiry, the end of a probe period) carries the moment it was due,
not the moment :meth:`BreakerBoard.advance` noticed it, so the same calls give the same changes.

Agents and sessions are named by the teams that run them ("assistant", session "1"), so their
breakers, like their state in the engine, are per team: the breaker of agent ``assistant`` of
team ``search`` is not the one of ``assistant`` of ``ads``. Each has its own key on the
breakers topic (:func:`entity_key`: ``agent:search/assistant``) and a gateway refuses a
request by it only when the request names that team (see :mod:`detector.enforce`). Teams and
API keys are one namespace: their keys are ``team:search`` and ``api_key:k-1``.

Versions and ids are deterministic: ``version = max(previous + 1, whole seconds of changed_at)``
(see :func:`next_version`) and ``change_id`` is a UUID derived from entity, version and state.
The time floor keeps versions rising after the board forgets a closed breaker (a breaker made
again later starts above anything the old one wrote), and keeps manual changes (written by
``detector breaker`` at wall-clock time) and policy changes roughly in time order.

>>> from detector.events import Entity
>>> board = BreakerBoard(ttl=600, probe_seconds=300)
>>> s42 = Entity(type="session", id="s-42")
>>> t0 = 1_793_952_000.0  # 2026-11-06 08:00 UTC
>>> [(c.state.value, c.version) for c in board.trip(s42, t0, owner="search", reason="agent loop")]
[('open', 1793952000)]
>>> [(c.previous_state.value, c.state.value, f"{c.changed_at:%H:%M}") for c in board.advance(t0 + 660)]
[('open', 'half_open', '08:10')]
>>> (c,) = board.trip(s42, t0 + 700, owner="search", reason="looping again")  # tripped while half-open
>>> c.state.value, (c.expires_at - c.changed_at).total_seconds()  # twice the TTL
('open', 1200.0)
>>> [c.state.value for c in board.advance(t0 + 700 + 1200 + 300)]  # the TTL, then a quiet probe period
['half_open', 'closed']
"""

from __future__ import annotations

import math
import re
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, get_args

from detector.events import BreakerChange, BreakerEntityType, BreakerState, Entity, utc_from_epoch

__all__ = [
    "BREAKER_ENTITY_TYPES",
    "NAMESPACE",
    "POLICY_ACTOR",
    "TEAM_SCOPED",
    "Breaker",
    "BreakerBoard",
    "change_key",
    "entity_key",
    "format_duration",
    "make_change",
    "next_version",
    "parse_duration",
    "parse_entity",
]

NAMESPACE = uuid.UUID("0d6f3a52-2c1e-4f7b-9e0a-6b8d4c3f1a27")
POLICY_ACTOR = "stormwatch"
BREAKER_ENTITY_TYPES: frozenset[str] = frozenset(get_args(BreakerEntityType))
TEAM_SCOPED: frozenset[str] = frozenset({"agent", "session"})  # breakers kept per owning team

OPEN, HALF_OPEN, CLOSED = BreakerState.OPEN, BreakerState.HALF_OPEN, BreakerState.CLOSED


def entity_key(entity: Entity, owner: str) -> str:
    """The breakers topic's key of ``entity`` owned by team ``owner``.

    ``<type>:<id>`` for a team or API key; ``<type>:<owner>/<id>`` for an agent or session,
    with ``%`` and ``/`` of the owner written ``%25`` and ``%2F`` so that no two differ only
    in where the owner ends.

    >>> from detector.events import Entity
    >>> entity_key(Entity(type="api_key", id="k-1"), "search"), entity_key(Entity(type="agent", id="a/b"), "ads/eu")
    ('api_key:k-1', 'agent:ads%2Feu/a/b')
    """
    if entity.type in TEAM_SCOPED:
        return f"{entity.type}:{owner.replace('%', '%25').replace('/', '%2F')}/{entity.id}"
    return f"{entity.type}:{entity.id}"


def change_key(change: BreakerChange) -> str:
    """The breakers topic's key of ``change``: that of its entity and owner."""
    return entity_key(change.entity, change.owner)


def parse_entity(text: str) -> Entity:
    """``api_key:k-123`` → Entity; the type must be one a breaker can guard (the id may hold colons).

    >>> parse_entity("session:run:7")
    Entity(type='session', id='run:7')
    >>> parse_entity("model:gpt-4o")
    Traceback (most recent call last):
    ...
    ValueError: 'model:gpt-4o': a breaker guards a team, api_key, agent or session (TYPE:ID)
    """
    kind, _, ident = text.partition(":")
    if kind not in BREAKER_ENTITY_TYPES or not ident:
        raise ValueError(f"{text!r}: a breaker guards a team, api_key, agent or session (TYPE:ID)")
    return Entity.model_validate({"type": kind, "id": ident})


_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
_UNIT = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str) -> float:
    """``90s``, ``30m``, ``1h30m``, ``2d`` → seconds; ``none`` (or ``inf``) → ``math.inf``: until closed by hand.

    >>> parse_duration("1h30m"), parse_duration("45"), parse_duration("none")
    (5400.0, 45.0, inf)
    """
    text = text.strip().lower()
    if text in ("none", "inf", "never"):
        return math.inf
    try:
        seconds = float(text)
    except ValueError:
        parts = _DURATION.findall(text)
        if not parts or "".join(n + u for n, u in parts) != text:
            raise ValueError(f"{text!r} is not a duration like 90s, 30m, 1h30m, 2d or none") from None
        seconds = sum(float(n) * _UNIT[u] for n, u in parts)
    if not seconds > 0:
        raise ValueError(f"{text!r}: a duration must be more than zero")
    return seconds


def format_duration(seconds: float) -> str:
    """Seconds in the same notation :func:`parse_duration` reads.

    >>> format_duration(5400), format_duration(45), format_duration(math.inf)
    ('1h30m', '45s', 'until closed')
    """
    if math.isinf(seconds):
        return "until closed"
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    out = ""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        n, s = divmod(s, size)
        if n:
            out += f"{n}{unit}"
    return out


def next_version(previous: int, at: float) -> int:
    """The version of the change after ``previous`` made at ``at`` (epoch s): rises, and never below the time."""
    return max(previous + 1, int(at))


def make_change(
    entity: Entity,
    *,
    owner: str,
    state: BreakerState,
    previous: BreakerChange | None,
    at: float,
    reason: str,
    actor: str,
    expires_at: float | None = None,
    incident_id: str | None = None,
) -> BreakerChange:
    """The change that follows ``previous`` (None: the entity's first), with its version and id derived."""
    previous_state = previous.state if previous is not None else CLOSED
    version = next_version(previous.version if previous is not None else 0, at)
    return _change(entity, owner, state, previous_state, version, at, reason, actor, expires_at, incident_id)


def _change(
    entity: Entity,
    owner: str,
    state: BreakerState,
    previous_state: BreakerState,
    version: int,
    at: float,
    reason: str,
    actor: str,
    expires_at: float | None,
    incident_id: str | None,
) -> BreakerChange:
    if expires_at is not None and (state is not OPEN or not math.isfinite(expires_at)):
        expires_at = None
    return BreakerChange(
        change_id=str(uuid.uuid5(NAMESPACE, f"{entity_key(entity, owner)}:{version}:{state.value}")),
        entity=entity,
        owner=owner,
        state=state,
        previous_state=previous_state,
        version=version,
        changed_at=utc_from_epoch(at),
        expires_at=utc_from_epoch(expires_at) if expires_at is not None else None,
        reason=reason,
        incident_id=incident_id,
        actor=actor,
    )


@dataclass(slots=True)
class Breaker:
    """One entity's breaker as the board knows it (times in epoch seconds)."""

    entity: Entity
    owner: str
    state: BreakerState = CLOSED
    version: int = 0
    since: float = 0.0  # when the current state began
    expires_at: float | None = None  # open: when it turns half-open (None: until closed by hand)
    probe_until: float | None = None  # half-open: when it closes unless tripped again
    ttl: float = 0.0  # TTL of the last opening (inf: until closed by hand); a re-trip from half-open backs off
    reason: str = ""
    incident_id: str | None = None
    actor: str = ""


class BreakerBoard:
    """Every breaker of one engine: trips, closes and time, in; :class:`BreakerChange` records, out.

    ``ttl`` is how long a policy trip keeps a closed breaker open; a trip while half-open
    reopens it for ``backoff`` times the last TTL, at most ``max_ttl``. ``probe_seconds`` is how
    long a half-open breaker waits for a new trip before it closes. Closed breakers are
    forgotten ``forget_after`` seconds after they closed, and at most ``max_closed`` are kept;
    open and half-open ones are always kept (gateways are refusing on them). An agent's or a
    session's breaker is one per owning team (:func:`entity_key`). Picklable.
    """

    def __init__(
        self,
        ttl: float = 900.0,
        max_ttl: float = 4 * 3600.0,
        backoff: float = 2.0,
        probe_seconds: float = 300.0,
        forget_after: float = 86400.0,
        max_closed: int = 10_000,
    ) -> None:
        if not (0 < ttl <= max_ttl) or backoff < 1 or probe_seconds <= 0 or forget_after < 0 or max_closed < 0:
            raise ValueError("need 0 < ttl <= max_ttl, backoff >= 1, probe_seconds > 0, forget_after/max_closed >= 0")
        self.ttl = ttl
        self.max_ttl = max_ttl
        self.backoff = backoff
        self.probe_seconds = probe_seconds
        self.forget_after = forget_after
        self.max_closed = max_closed
        self._breakers: dict[str, Breaker] = {}
        self._active: dict[str, None] = {}  # open and half-open keys, in the order they became so
        self._closed: OrderedDict[str, None] = OrderedDict()  # closed keys, longest closed first

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        # A board pickled before agents and sessions were kept per team has them under "<type>:<id>".
        key = {k: entity_key(b.entity, b.owner) for k, b in self._breakers.items()}
        self._breakers = {key[k]: b for k, b in self._breakers.items()}
        self._active = {key[k]: None for k in self._active}
        self._closed = OrderedDict((key[k], None) for k in self._closed)

    # -- queries ---------------------------------------------------------------------------------

    def get(self, entity: Entity, owner: str) -> Breaker | None:
        """The breaker of ``entity`` (an agent's or session's: of team ``owner``)."""
        return self._breakers.get(entity_key(entity, owner))

    def on(self, entity: Entity) -> list[Breaker]:
        """The breakers on ``entity``: one per team that has one for an agent or session, else at most one."""
        return [b for b in self._breakers.values() if b.entity == entity]

    def owners(self, entity: Entity) -> list[str]:
        """The teams that have a breaker on ``entity`` (one for a team or an API key)."""
        return [b.owner for b in self.on(entity)]

    def __len__(self) -> int:
        return len(self._breakers)

    def active(self) -> list[Breaker]:
        """Open and half-open breakers."""
        return [self._breakers[k] for k in self._active]

    # -- changes -----------------------------------------------------------------------------------

    def trip(
        self,
        entity: Entity,
        now: float,
        *,
        owner: str,
        reason: str,
        actor: str = POLICY_ACTOR,
        incident_id: str | None = None,
        ttl: float | None = None,
    ) -> list[BreakerChange]:
        """Open the breaker of ``entity`` at ``now``.

        ``ttl`` None: the policy TTL (``ttl`` from closed, backed off from half-open), and an
        open breaker stays as it is. A given ``ttl`` (``math.inf``: until closed by hand)
        reopens even an open breaker with that TTL. Time-driven changes due before ``now``
        come first in the list.
        """
        if entity.type not in BREAKER_ENTITY_TYPES:
            raise ValueError(f"a breaker guards a team, api_key, agent or session, not a {entity.type}")
        if ttl is not None and not ttl > 0:
            raise ValueError("ttl must be more than zero")
        key = entity_key(entity, owner)
        changes = self._settle(key, now)
        b = self._breakers.get(key)
        if b is None:
            b = self._breakers[key] = Breaker(entity, owner)
        if ttl is None:
            if b.state is OPEN:
                return changes  # already refusing; another trip does not stretch it
            ttl = self.ttl if b.state is CLOSED else min((b.ttl or self.ttl) * self.backoff, self.max_ttl)
        b.owner = owner
        b.ttl = ttl
        expires = None if math.isinf(ttl) else now + ttl
        changes.append(self._move(b, OPEN, now, reason, actor, incident_id, expires))
        return changes

    def close(self, entity: Entity, now: float, *, owner: str, reason: str, actor: str) -> list[BreakerChange]:
        """Close the breaker of ``entity`` (of team ``owner``) by hand; nothing when closed or unknown already."""
        key = entity_key(entity, owner)
        changes = self._settle(key, now)
        b = self._breakers.get(key)
        if b is not None and b.state is not CLOSED:
            changes.append(self._move(b, CLOSED, now, reason, actor, b.incident_id))
        return changes

    def advance(self, now: float) -> list[BreakerChange]:
        """Expiries (open → half-open) and quiet probe periods (half-open → closed) due by ``now``."""
        changes: list[BreakerChange] = []
        for key in list(self._active):
            changes.extend(self._settle(key, now))
        closed = self._closed
        while closed:
            key = next(iter(closed))
            if self._breakers[key].since + self.forget_after > now:
                break
            del closed[key], self._breakers[key]
        return changes

    def apply(self, change: BreakerChange) -> bool:
        """Adopt a change made elsewhere (``detector breaker`` on the topic) if it is newer than ours."""
        if change.entity.type not in BREAKER_ENTITY_TYPES:
            return False
        key = entity_key(change.entity, change.owner)
        b = self._breakers.get(key)
        if b is not None and change.version <= b.version:
            return False
        if b is None:
            b = self._breakers[key] = Breaker(change.entity, change.owner)
        at = change.changed_at.timestamp()
        expires = change.expires_at.timestamp() if change.expires_at is not None else None
        b.owner = change.owner
        if change.state is OPEN:
            b.ttl = expires - at if expires is not None else math.inf
        self._set(b, change.state, change.version, at, change.reason, change.actor, change.incident_id, expires)
        return True

    def forget(self, change: BreakerChange) -> bool:
        """Let go the breaker ``change`` was of, unless the board moved it on since; True if let go.

        For what the breakers topic no longer holds: a tombstone, or a breaker from before breakers
        were per team that another team's change replaced under its old key (see
        :class:`~detector.enforce.BreakerTable`).
        """
        key = entity_key(change.entity, change.owner)
        b = self._breakers.get(key)
        if b is None or b.version > change.version:
            return False
        del self._breakers[key]
        self._active.pop(key, None)
        self._closed.pop(key, None)
        return True

    # -- internals ---------------------------------------------------------------------------------

    def _settle(self, key: str, now: float) -> list[BreakerChange]:
        """The time-driven changes of one breaker that are due by ``now``, each at the moment it was due."""
        b = self._breakers.get(key)
        out: list[BreakerChange] = []
        if b is None:
            return out
        if b.state is OPEN and b.expires_at is not None and b.expires_at <= now:
            at = b.expires_at
            reason = (
                f"open for {format_duration(b.ttl)}; probe requests are let through, and it closes after "
                f"{format_duration(self.probe_seconds)} without a new trip (was: {b.reason})"
            )
            out.append(self._move(b, HALF_OPEN, at, reason, POLICY_ACTOR, b.incident_id))
        if b.state is HALF_OPEN and b.probe_until is not None and b.probe_until <= now:
            reason = f"no new trip in the {format_duration(self.probe_seconds)} probe period"
            out.append(self._move(b, CLOSED, b.probe_until, reason, POLICY_ACTOR, b.incident_id))
        return out

    def _move(
        self,
        b: Breaker,
        state: BreakerState,
        at: float,
        reason: str,
        actor: str,
        incident_id: str | None,
        expires_at: float | None = None,
    ) -> BreakerChange:
        previous = b.state
        version = next_version(b.version, at)
        self._set(b, state, version, at, reason, actor, incident_id, expires_at)
        return _change(b.entity, b.owner, state, previous, version, at, reason, actor, expires_at, incident_id)

    def _set(
        self,
        b: Breaker,
        state: BreakerState,
        version: int,
        at: float,
        reason: str,
        actor: str,
        incident_id: str | None,
        expires_at: float | None,
    ) -> None:
        key = entity_key(b.entity, b.owner)
        b.state, b.version, b.since = state, version, at
        b.reason, b.actor, b.incident_id = reason, actor, incident_id
        b.expires_at = expires_at if state is OPEN else None
        b.probe_until = at + self.probe_seconds if state is HALF_OPEN else None
        if state is CLOSED:
            self._active.pop(key, None)
            self._closed[key] = None
            self._closed.move_to_end(key)
            while len(self._closed) > self.max_closed:
                gone, _ = self._closed.popitem(last=False)
                del self._breakers[gone]
        else:
            self._closed.pop(key, None)
            self._active.setdefault(key, None)
