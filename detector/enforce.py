"""What a gateway embeds to enforce circuit breakers: a table, a topic follower, an ASGI middleware.

* :class:`BreakerTable` holds the newest :class:`~detector.events.BreakerChange` of every entity
  and answers :meth:`BreakerTable.allowed` with a few dict lookups (no allocation when nothing
  is refused). ``open`` refuses until ``expires_at``; ``half_open``, and ``open`` past its
  ``expires_at`` before the worker's half-open change arrived, let one probe request through
  per ``probe_interval`` (per table, so per gateway process) and refuse the rest.
* :class:`BreakerFollower` keeps a table up to date from the compacted breakers topic: plain
  aiokafka, no consumer group, every partition from the beginning; ``await follower.ready``
  waits until it caught up with the end offsets seen at start.
* :class:`BreakerMiddleware` is pure ASGI: it reads the entity headers, answers a refused
  request with HTTP 429, a JSON body and ``Retry-After``, and passes everything else on.

>>> from detector.breakers import make_change
>>> from detector.events import BreakerState, Entity
>>> table = BreakerTable(probe_interval=30)
>>> t0 = 1_793_952_000.0
>>> change = make_change(Entity(type="session", id="s-1"), owner="search", state=BreakerState.OPEN,
...                      previous=None, at=t0, reason="agent loop", actor="ana", expires_at=t0 + 600)
>>> table.apply(change), table.apply(change)  # a repeat is ignored
(True, False)
>>> table.allowed(session="s-1", now=t0 + 1), table.allowed(session="s-2", api_key="k", now=t0 + 1)
(False, True)
>>> table.allowed(session="s-1", team="search", now=t0 + 1), table.allowed(session="s-1", team="ads", now=t0 + 1)
(False, True)
>>> table.why(session="s-1", now=t0 + 1).reason, table.retry_after(change, now=t0 + 1)
('agent loop', 599)
>>> [table.allowed(session="s-1", now=t0 + 600 + dt) for dt in (0, 1, 30)]  # expired: one probe per 30 s
[True, False, True]
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import ssl
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

import orjson
from pydantic import ValidationError

from detector.breakers import BREAKER_ENTITY_TYPES, TEAM_SCOPED, change_key
from detector.events import BreakerChange, BreakerState, Entity

__all__ = [
    "BreakerFollower",
    "BreakerMiddleware",
    "BreakerTable",
    "bench_allowed",
]

log = logging.getLogger("stormwatch.enforce")

OPEN, HALF_OPEN, CLOSED = BreakerState.OPEN, BreakerState.HALF_OPEN, BreakerState.CLOSED

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


# The owner slot of an agent's or session's breaker read under a key from before breakers were per
# team (``agent:<id>``, one breaker for every team's agent of that name): it refuses every team.
ANY_TEAM = None  # no team's name: a team named "" (an --owner once let through blank) is not every team
MAX_DROPPED = 1000


@dataclass(slots=True)
class _Entry:
    """A refusing breaker: its change, the topic key it came under, and times in epoch seconds."""

    change: BreakerChange
    key: str
    open_until: float  # open: refuses everything before this (inf: until closed); half-open: -inf
    next_probe: float  # from this time on, one probe request passes


def _entries(
    t: _Entry | None,
    k: _Entry | None,
    a: dict[str | None, _Entry] | None,
    s: dict[str | None, _Entry] | None,
    team: str | None,
) -> tuple[_Entry | None, ...]:
    """A request's refusing entries: its team's and key's, and its agent's and session's of its team.

    A request that names no team gets every team's breaker on its agent and session ids; one
    that does gets its team's and those from before breakers were per team (:data:`ANY_TEAM`).
    """
    entries: tuple[_Entry | None, ...] = (t, k)
    for owners in (a, s):
        if owners is not None:
            entries += (owners.get(team), owners.get(ANY_TEAM)) if team is not None else tuple(owners.values())
    return entries


def _others(owners: dict[str | None, _Entry] | None, team: str) -> bool:
    """Whether none of these breakers on an agent or session id is ``team``'s (or of every team)."""
    return owners is None or (team not in owners and ANY_TEAM not in owners)


class BreakerTable:
    """The newest change of every entity's breaker, and the gateway's yes or no.

    ``apply`` keeps a change only if its version is higher than the entity's last one, so
    repeated and out-of-order records are ignored. Closed entities cost nothing on the
    request path; at most ``max_closed`` of their last changes are kept (oldest dropped),
    for ordering and for ``detector breaker list --all``. Not thread-safe: use it from one
    event loop (or one thread).

    An agent's or a session's breaker belongs to its owner team (teams name their agents and
    sessions, and two may pick the same name): it refuses a request that names that team. A
    request that names no team is refused by the breakers of every team on its agent or
    session id, as the table cannot tell whose it is: gateways should pass the team.

    Changes are kept by their topic key, as compaction keeps them. A change read under a key
    from before breakers were per team (``agent:<id>``, not ``agent:<owner>/<id>``) is that
    id's one breaker, as it was then: it refuses every team, the newest change under that key
    replaces the one before whatever its owner, and it is let go once its owner writes a newer
    change under the new key (the alerter's board carries it on there) or its key's tombstone
    comes. What the table let go for either reason is in :attr:`dropped` until taken.
    """

    def __init__(self, probe_interval: float = 30.0, retry_after_unknown: int = 60, max_closed: int = 100_000) -> None:
        if probe_interval <= 0 or retry_after_unknown < 1:
            raise ValueError("probe_interval must be > 0 and retry_after_unknown >= 1")
        self.probe_interval = probe_interval
        self.retry_after_unknown = retry_after_unknown  # Retry-After of a breaker open until closed by hand
        self.max_closed = max_closed
        self.applied = 0
        self.ignored = 0
        # Let go by a tombstone or a successor (see above): the newest few, so a table no follower drains stays small.
        self.dropped: deque[BreakerChange] = deque(maxlen=MAX_DROPPED)
        self._latest: dict[str, BreakerChange] = {}  # topic key -> newest change under it
        self._closed: OrderedDict[str, None] = OrderedDict()
        # The refusing breakers: team and api_key by id; agent and session by id, then owner team.
        self._team: dict[str, _Entry] = {}
        self._api_key: dict[str, _Entry] = {}
        self._agent: dict[str, dict[str | None, _Entry]] = {}
        self._session: dict[str, dict[str | None, _Entry]] = {}
        self._global = {"team": self._team, "api_key": self._api_key}
        self._scoped = {"agent": self._agent, "session": self._session}

    # -- updates ---------------------------------------------------------------------------------

    def apply(self, change: BreakerChange, key: str | None = None) -> bool:
        """Take ``change``, read under topic key ``key`` (default: its own), if newer than what that key had.

        True if taken.
        """
        kind = change.entity.type
        own = change_key(change)
        key = own if key is None or kind not in TEAM_SCOPED else key  # only agents and sessions changed keys
        old = self._latest.get(key)
        if kind not in BREAKER_ENTITY_TYPES or (old is not None and change.version <= old.version):
            self.ignored += 1
            return False
        legacy = key != own
        if legacy and (succ := self._latest.get(own)) is not None and succ.version >= change.version:
            self.ignored += 1  # its owner's newer change under the new key came first (another partition)
            return False
        self.applied += 1
        previous = None  # the entry this change takes over from: its probe times carry on
        if old is not None:
            previous = self._unrefuse(old, key)
            if change_key(old) != own:  # under a key from before teams, another team's breaker took its place
                self.dropped.append(old)
        self._latest[key] = change
        if not legacy and kind in TEAM_SCOPED:
            previous = self._supersede(change) or previous
        if change.state is CLOSED:
            self._closed[key] = None
            self._closed.move_to_end(key)
            while len(self._closed) > self.max_closed:
                del self._latest[self._closed.popitem(last=False)[0]]
            return True
        self._closed.pop(key, None)
        at = change.changed_at.timestamp()
        refusing, slot = self._slot(change, key, create=True)
        assert refusing is not None
        if change.state is OPEN:
            until = change.expires_at.timestamp() if change.expires_at is not None else math.inf
            entry = _Entry(change, key, open_until=until, next_probe=until)
        else:
            entry = _Entry(change, key, open_until=-math.inf, next_probe=at)
        if previous is not None and previous.open_until <= at:
            # An expired open entry may have let a probe through already: the half-open change keeps its slot.
            entry.next_probe = max(entry.next_probe, previous.next_probe)
        refusing[slot] = entry
        return True

    def forget(self, key: str) -> None:
        """Drop what topic key ``key`` held (its tombstone); a key the table does not hold changes nothing."""
        self._closed.pop(key, None)
        change = self._latest.pop(key, None)
        if change is not None:
            self._unrefuse(change, key)
            self.dropped.append(change)

    def _supersede(self, change: BreakerChange) -> _Entry | None:
        """A per-team change lets go the breaker its owner had on that id from before (see the class)."""
        owners = self._scoped[change.entity.type].get(change.entity.id)
        entry = owners.get(ANY_TEAM) if owners is not None else None
        if entry is None or entry.change.owner != change.owner or entry.change.version >= change.version:
            return None
        self.forget(entry.key)
        return entry

    def _slot(
        self, change: BreakerChange, key: str, create: bool = False
    ) -> tuple[dict[Any, _Entry] | None, str | None]:
        """The dict that holds the refusing entry of ``change`` read under ``key``, and its key there."""
        kind, ident = change.entity.type, change.entity.id
        by_id = self._scoped.get(kind)
        if by_id is None:
            return self._global.get(kind), ident
        owners = by_id.get(ident)
        if owners is None and create:
            owners = by_id[ident] = {}
        return owners, change.owner if key == change_key(change) else ANY_TEAM

    def _entry(self, change: BreakerChange) -> _Entry | None:
        """The refusing entry that holds ``change`` (under whichever key it was read)."""
        kind, ident = change.entity.type, change.entity.id
        by_id = self._scoped.get(kind)
        if by_id is None:
            refusing = self._global.get(kind)
            entry = refusing.get(ident) if refusing is not None else None
            return entry if entry is not None and entry.change.change_id == change.change_id else None
        return next((e for e in (by_id.get(ident) or {}).values() if e.change.change_id == change.change_id), None)

    def _unrefuse(self, change: BreakerChange, key: str) -> _Entry | None:
        """Stop refusing on what ``key`` held; the entry that refused, if any."""
        refusing, slot = self._slot(change, key)
        if refusing is None:
            return None
        entry = refusing.get(slot)
        if entry is not None and entry.key == key:
            del refusing[slot]
        else:
            entry = None
        if not refusing and change.entity.type in TEAM_SCOPED:
            del self._scoped[change.entity.type][change.entity.id]
        return entry

    # -- the request path --------------------------------------------------------------------------

    def allowed(
        self,
        api_key: str | None = None,
        agent: str | None = None,
        session: str | None = None,
        team: str | None = None,
        now: float | None = None,
    ) -> bool:
        """Whether a request of these entities may go on (a half-open probe counts as taken)."""
        # The lookups are written out here and in check(): a call less on every request a gateway serves.
        k = self._api_key.get(api_key) if api_key is not None else None
        a = self._agent.get(agent) if agent is not None else None
        s = self._session.get(session) if session is not None else None
        t = self._team.get(team) if team is not None else None
        if k is None and t is None:
            if a is None and s is None:
                return True
            if team is not None and _others(a, team) and _others(s, team):  # only other teams' breakers
                return True
        return self._decide(_entries(t, k, a, s, team), now, take_probe=True) is None

    def check(
        self,
        api_key: str | None = None,
        agent: str | None = None,
        session: str | None = None,
        team: str | None = None,
        now: float | None = None,
    ) -> BreakerChange | None:
        """Like :meth:`allowed`, in one call: None to let the request through, else the refusing change."""
        k = self._api_key.get(api_key) if api_key is not None else None
        a = self._agent.get(agent) if agent is not None else None
        s = self._session.get(session) if session is not None else None
        t = self._team.get(team) if team is not None else None
        if k is None and t is None:
            if a is None and s is None:
                return None
            if team is not None and _others(a, team) and _others(s, team):  # only other teams' breakers
                return None
        return self._decide(_entries(t, k, a, s, team), now, take_probe=True)

    def why(
        self,
        api_key: str | None = None,
        agent: str | None = None,
        session: str | None = None,
        team: str | None = None,
        now: float | None = None,
    ) -> BreakerChange | None:
        """The change that refuses these entities now (for the error body), without taking a probe."""
        k = self._api_key.get(api_key) if api_key is not None else None
        a = self._agent.get(agent) if agent is not None else None
        s = self._session.get(session) if session is not None else None
        t = self._team.get(team) if team is not None else None
        return self._decide(_entries(t, k, a, s, team), now, take_probe=False)

    def _decide(self, entries: tuple[_Entry | None, ...], now: float | None, take_probe: bool) -> BreakerChange | None:
        if now is None:
            now = time.time()
        probes: list[_Entry] = []
        for e in entries:
            if e is None:
                continue
            if now < e.open_until or now < e.next_probe:
                return e.change
            probes.append(e)
        if take_probe:
            for e in probes:  # only when the request goes through on every breaker
                e.next_probe = now + self.probe_interval
        return None

    def retry_after(self, change: BreakerChange, now: float | None = None) -> int:
        """Whole seconds until ``change``'s breaker may let a request through (``Retry-After``)."""
        if now is None:
            now = time.time()
        entry = self._entry(change)
        if entry is None:
            return 1
        at = entry.open_until if now < entry.open_until else entry.next_probe
        if math.isinf(at):
            return self.retry_after_unknown
        return max(1, math.ceil(at - now))

    # -- listing -----------------------------------------------------------------------------------

    def changes(self) -> list[BreakerChange]:
        """The newest change of every entity the table knows (closed ones too)."""
        return list(self._latest.values())

    def get(self, key: str) -> BreakerChange | None:
        """The newest change of ``key`` (:func:`~detector.breakers.entity_key`: ``api_key:k-1``, ``agent:search/a``)."""
        return self._latest.get(key)

    def find(self, entity: Entity) -> list[BreakerChange]:
        """The newest change of every breaker on ``entity``: one per owner team for an agent or a session."""
        return [c for c in self._latest.values() if c.entity == entity]

    def __len__(self) -> int:
        """Refusing (open or half-open) breakers."""
        scoped = sum(len(owners) for by_id in self._scoped.values() for owners in by_id.values())
        return len(self._team) + len(self._api_key) + scoped


def bench_allowed(calls: int = 1_000_000, breakers: int = 10_000, refused: bool = False) -> float:
    """Nanoseconds per :meth:`BreakerTable.allowed` call, with ``breakers`` open session breakers.

    The request carries all four ids; with ``refused`` its session is one of the open ones,
    else (the common case) none of its entities has a breaker. Loop overhead included.
    """
    from detector.breakers import make_change

    table = BreakerTable()
    t0 = time.time()
    for i in range(breakers):
        table.apply(
            make_change(
                Entity(type="session", id=f"s-{i}"),
                owner="search",
                state=OPEN,
                previous=None,
                at=t0,
                reason="bench",
                actor="bench",
                expires_at=t0 + 3600,
            )
        )
    session = "s-0" if refused else "s-none"
    allowed = table.allowed
    best = math.inf
    for _ in range(3):
        start = time.perf_counter_ns()
        for _ in range(calls):
            allowed(api_key="k-1", agent="agent-1", session=session, team="search")
        best = min(best, (time.perf_counter_ns() - start) / calls)
    return best


# -- the follower ------------------------------------------------------------------------------


class BreakerFollower:
    """Keeps a :class:`BreakerTable` up to date from the compacted breakers topic.

    No consumer group: every partition of ``topic`` is assigned and read from the beginning
    (the topic may not exist yet: it is looked for every ``poll_seconds``, without creating
    it). ``await follower.ready`` resolves once every partition was read up to the end offsets
    seen when the partitions were assigned, and raises if the follower failed for good first.
    A record that is not a valid :class:`BreakerChange` is logged and skipped; a tombstone
    (null value) forgets what its key held. Records are applied under their own keys (see
    :class:`BreakerTable` for keys from before breakers were per team). Transient broker errors
    are retried; the table keeps its last state meanwhile. Partitions added to the topic after
    start are not picked up.

    Security settings are aiokafka's own arguments (``security_protocol``, ``ssl_context``,
    ``sasl_mechanism``, ``sasl_plain_username``, ``sasl_plain_password``).
    """

    def __init__(
        self,
        table: BreakerTable,
        bootstrap_servers: str | list[str],
        topic: str = "llm.breakers",
        *,
        security_protocol: str = "PLAINTEXT",
        ssl_context: ssl.SSLContext | None = None,
        sasl_mechanism: str | None = None,
        sasl_plain_username: str | None = None,
        sasl_plain_password: str | None = None,
        client_id: str = "stormwatch-breakers",
        poll_seconds: float = 0.5,
        on_change: Callable[[BreakerChange], None] | None = None,
        on_drop: Callable[[BreakerChange], None] | None = None,
    ) -> None:
        if isinstance(bootstrap_servers, str):
            bootstrap_servers = bootstrap_servers.split(",")
        self.table = table
        self.topic = topic
        self.bootstrap_servers = [s.strip().removeprefix("kafka://") for s in bootstrap_servers if s.strip()]
        self.poll_seconds = poll_seconds
        self.on_change = on_change  # also told of every valid change read (e.g. a dashboard's view)
        self.on_drop = on_drop  # and of every change the table let go (see BreakerTable)
        self.records = 0  # records read
        self.rejected = 0  # records that were not a valid BreakerChange
        self._client_options: dict[str, Any] = {
            "client_id": client_id,
            "security_protocol": security_protocol,
            "ssl_context": ssl_context,
        }
        if sasl_mechanism is not None:
            self._client_options |= {
                "sasl_mechanism": sasl_mechanism,
                "sasl_plain_username": sasl_plain_username,
                "sasl_plain_password": sasl_plain_password,
            }
        self._consumer: Any = None
        self._task: asyncio.Task[None] | None = None
        self._ready: asyncio.Future[None] | None = None
        self._changed: asyncio.Condition | None = None

    @property
    def ready(self) -> asyncio.Future[None]:
        """Resolves when the table holds everything the topic held at start."""
        if self._ready is None:
            self._ready = asyncio.get_running_loop().create_future()
        return self._ready

    async def start(self) -> None:
        """Connect (raises if no broker answers) and start following in a task."""
        from aiokafka import AIOKafkaConsumer  # type: ignore[import-untyped]

        _ = self.ready
        self._changed = asyncio.Condition()
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap_servers,
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            **self._client_options,
        )
        await self._consumer.start()
        self._task = asyncio.create_task(self._run(), name=f"breaker-follower:{self.topic}")
        self._task.add_done_callback(self._died)

    def _died(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and (error := task.exception()) is not None:
            log.error("breaker follower on %s stopped: %r; the table keeps its last state", self.topic, error)
            if not self.ready.done():
                self.ready.set_exception(error)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):  # an error was logged and set on ready
                await self._task
            self._task = None
        if self._consumer is not None:
            await self._consumer.stop()
            self._consumer = None
        if self._ready is not None and not self._ready.done():
            self._ready.cancel()

    async def __aenter__(self) -> BreakerFollower:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def wait_until(self, predicate: Callable[[BreakerTable], bool], timeout: float) -> None:
        """Wait (up to ``timeout`` s, else TimeoutError) until ``predicate(table)`` holds after an update."""
        assert self._changed is not None, "BreakerFollower not started"
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(lambda: predicate(self.table))

    async def _run(self) -> None:
        from aiokafka import TopicPartition
        from aiokafka.errors import KafkaError  # type: ignore[import-untyped]

        consumer, changed, ready = self._consumer, self._changed, self.ready
        assert changed is not None
        try:
            while not (found := (await consumer._client.fetch_all_metadata()).partitions_for_topic(self.topic)):
                await asyncio.sleep(self.poll_seconds)  # no topic yet: asking for it by name could create it
            tps = [TopicPartition(self.topic, p) for p in sorted(found)]
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            ends = await consumer.end_offsets(tps)
            log.info("following %s: %d partitions, %d records to catch up", self.topic, len(tps), sum(ends.values()))
        except Exception as error:
            if not ready.done():
                ready.set_exception(error)
            log.exception("breaker follower could not start on %s", self.topic)
            raise
        backoff = self.poll_seconds
        while True:
            if not ready.done() and all([await consumer.position(tp) >= end for tp, end in ends.items()]):
                ready.set_result(None)
                log.info("breaker table caught up: %d refusing", len(self.table))
            try:
                batch = await consumer.getmany(*tps, timeout_ms=int(self.poll_seconds * 1000))
            except KafkaError as error:
                if not getattr(error, "retriable", False) and not ready.done():
                    ready.set_exception(error)
                    raise
                log.warning("breaker follower: %s; retrying in %.1f s", error, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 30.0)
                continue
            backoff = self.poll_seconds
            if not batch:
                continue
            for records in batch.values():
                for r in records:
                    self._apply(r)
            async with changed:
                changed.notify_all()

    def _apply(self, record: Any) -> None:
        self.records += 1
        key = record.key.decode(errors="replace") if record.key is not None else None
        if record.value is None:
            if key is not None:
                self.table.forget(key)
                self._dropped()
            return
        try:
            change = BreakerChange.model_validate_json(record.value)
        except ValidationError as error:
            self.rejected += 1
            log.warning(
                "skipped %s[%d]@%d: not a breaker change: %s",
                record.topic,
                record.partition,
                record.offset,
                str(error).splitlines()[0],
            )
            return
        self.table.apply(change, key)
        if self.on_change is not None:
            try:
                self.on_change(change)
            except Exception:  # the listener's bug or its full disk must not stop the table following
                log.exception("breaker follower: on_change failed on %s v%d", change.entity, change.version)
        self._dropped()

    def _dropped(self) -> None:
        """Tell ``on_drop`` what the table let go (a tombstone; a breaker from before teams, superseded)."""
        if not self.table.dropped:
            return
        dropped = list(self.table.dropped)
        self.table.dropped.clear()
        on_drop = self.on_drop
        if on_drop is None:
            return
        for change in dropped:
            try:
                on_drop(change)
            except Exception:
                log.exception("breaker follower: on_drop failed on %s v%d", change.entity, change.version)


# -- the middleware ----------------------------------------------------------------------------


class BreakerMiddleware:
    """Pure ASGI middleware: refuses requests whose entities have a breaker open, with HTTP 429.

    The entities come from request headers (names are case-insensitive). A refused HTTP
    request gets ``{"error": "circuit_open", "entity", "owner", "state", "reason", "incident_id",
    "retry_after"}`` and a ``Retry-After`` header; a refused websocket is closed with code 1008
    before it is accepted. Everything else (lifespan too) goes to ``app`` untouched.
    """

    def __init__(
        self,
        app: ASGIApp,
        table: BreakerTable,
        *,
        api_key_header: str = "x-api-key-id",
        agent_header: str = "x-agent-id",
        session_header: str = "x-session-id",
        team_header: str = "x-team",
    ) -> None:
        self.app = app
        self.table = table
        names = (api_key_header, agent_header, session_header, team_header)
        self._slots = {name.lower().encode("latin-1"): i for i, name in enumerate(names)}
        if len(self._slots) != 4:
            raise ValueError("the four entity headers must have different names")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind != "http" and kind != "websocket":
            await self.app(scope, receive, send)
            return
        ids: list[str | None] = [None, None, None, None]
        slots = self._slots
        for name, value in scope.get("headers") or ():
            i = slots.get(name)
            if i is not None and value:
                try:
                    ids[i] = value.decode()  # team names and ids are UTF-8 ("équipe")
                except UnicodeDecodeError:
                    ids[i] = value.decode("latin-1")
        now = time.time()
        refusal = self.table.check(api_key=ids[0], agent=ids[1], session=ids[2], team=ids[3], now=now)
        if refusal is None:
            await self.app(scope, receive, send)
            return
        if kind == "websocket":
            await send({"type": "websocket.close", "code": 1008, "reason": "circuit_open"})
            return
        retry_after = self.table.retry_after(refusal, now)
        body = orjson.dumps(
            {
                "error": "circuit_open",
                "entity": f"{refusal.entity.type}:{refusal.entity.id}",
                "owner": refusal.owner,
                "state": refusal.state.value,
                "reason": refusal.reason,
                "incident_id": refusal.incident_id,
                "retry_after": retry_after,
            }
        )
        await send(
            {
                "type": "http.response.start",
                "status": 429,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"retry-after", str(retry_after).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
