"""``detector breaker list|open|close``: circuit breakers by hand, on the breakers topic.

* ``open ENTITY --reason TEXT [--ttl 30m] [--by NAME]`` and ``close ENTITY --reason TEXT [--by NAME]``
  read the entity's newest change from the compacted breakers topic (``kafka.breakers_topic``),
  write the next :class:`~detector.events.BreakerChange` (key and version as in
  :mod:`detector.breakers`), then an audit record (who, when, why, the change) to the
  append-only ``<breakers_topic>.audit`` topic: the compacted topic alone forgets history.
  Missing topics are created (the breakers topic compacted, the audit topic kept
  ``AUDIT_RETENTION_DAYS``). Closing a breaker that is closed writes nothing.
* ``list [--all]``: a table of the breakers that are not closed (every one with ``--all``).

An agent's or a session's breaker is its team's (``--owner TEAM``): ``open agent:assistant
--owner search`` stops ``assistant`` of team ``search`` only. ``--owner`` may be left out when
exactly one team has a breaker on the entity (a team owns itself).

Settings as every command: ``--config`` / ``$STORMWATCH_CONFIG`` and ``STORMWATCH_KAFKA__*``.

>>> change = manual_change(None, parse_entity("api_key:k-123"), "open", at=1_793_952_000.0,
...                        reason="runaway batch job", actor="ana", ttl=1800.0, owner="search")
>>> change.state.value, change.version, f"{change.expires_at:%H:%M}", change.previous_state.value
('open', 1793952000, '08:30', 'closed')
>>> audit_record("open", change, at=1_793_952_000.0)["actor"]
'ana'
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import logging
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import orjson
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from detector.breakers import (
    TEAM_SCOPED,
    change_key,
    entity_key,
    format_duration,
    make_change,
    parse_duration,
    parse_entity,
)
from detector.events import BreakerChange, BreakerState, Entity, utc_from_epoch
from detector.settings import Settings, load_settings
from detector.worker.config import KafkaSettings

__all__ = [
    "AUDIT_RETENTION_DAYS",
    "add_arguments",
    "audit_record",
    "audit_topic",
    "close_breaker",
    "current_changes",
    "manual_change",
    "open_breaker",
    "resolve_owner",
    "run",
]

AUDIT_RETENTION_DAYS = 365.0
TIMEOUT_SECONDS = 30.0
Action = Literal["open", "close"]
OWNER_HELP = "team whose agent or session it is (default: the team of its only breaker)"


class OwnerNeeded(ValueError):
    """An agent or session named without ``--owner``, and not exactly one team has a breaker on it."""


def audit_topic(k: KafkaSettings) -> str:
    return f"{k.breakers_topic}.audit"


def add_arguments(parser: argparse.ArgumentParser, config_arg: Callable[[argparse.ArgumentParser], None]) -> None:
    """The ``breaker`` subcommands; ``config_arg`` adds the shared ``--config`` option to each."""
    sub = parser.add_subparsers(dest="breaker_action", required=True, metavar="ACTION")

    p = sub.add_parser("list", help="breakers that are not closed (every one with --all)")
    p.add_argument("--all", action="store_true", help="closed breakers too")
    config_arg(p)

    p = sub.add_parser("open", help="open a breaker: the gateways refuse the entity's requests")
    p.add_argument(
        "entity", type=_entity_arg, metavar="ENTITY", help="TYPE:ID, TYPE one of team, api_key, agent, session"
    )
    p.add_argument("--reason", required=True, help="why, in one sentence a person can act on")
    p.add_argument(
        "--ttl", type=_duration_arg, default=1800.0, help="how long before it turns half-open: 90s, 30m, 2h, none (30m)"
    )
    p.add_argument("--by", default=None, help="who opens it (default: $USER)")
    p.add_argument("--owner", default=None, help=OWNER_HELP)
    p.add_argument("--incident", default=None, help="the incident id behind it, if any")
    config_arg(p)

    p = sub.add_parser("close", help="close a breaker: the entity's requests flow again")
    p.add_argument("entity", type=_entity_arg, metavar="ENTITY", help="TYPE:ID")
    p.add_argument("--reason", required=True, help="why it can close")
    p.add_argument("--by", default=None, help="who closes it (default: $USER)")
    p.add_argument("--owner", default=None, help=OWNER_HELP)
    config_arg(p)


def _entity_arg(text: str) -> Entity:
    try:
        return parse_entity(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _duration_arg(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _actor(by: str | None) -> str:
    if by:
        return by
    try:
        return os.environ.get("USER") or getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def run(args: argparse.Namespace) -> int:
    """The ``breaker`` command: exit code 0 on success, 1 when Kafka fails."""
    from aiokafka.errors import KafkaError  # type: ignore[import-untyped]

    # aiokafka warns while a topic it just created elects its leaders, and retries: not for the user's eyes.
    logging.getLogger("aiokafka").setLevel(logging.ERROR)
    settings: Settings = load_settings(Path(args.config) if args.config else None)
    k = settings.kafka
    console = Console()
    if not console.is_terminal:
        console = Console(width=200)  # piped or captured: whole lines, for grep
    try:
        if args.breaker_action == "list":
            changes = asyncio.run(current_changes(k))
            if changes is None:
                console.print(escape(f"no topic {k.breakers_topic} yet: no breaker was ever opened"))
                return 0
            print_breakers(console, list(changes.values()), show_all=args.all, now=time.time())
            return 0
        if not args.reason.strip():
            console.print("[red]--reason must say why[/]")
            return 2
        actor = _actor(args.by)
        change: BreakerChange | None
        if args.breaker_action == "open":
            change = asyncio.run(
                open_breaker(k, args.entity, args.reason, actor, args.ttl, owner=args.owner, incident_id=args.incident)
            )
        else:
            change = asyncio.run(close_breaker(k, args.entity, args.reason, actor, owner=args.owner))
    except OwnerNeeded as error:
        console.print(f"[red]{escape(str(error))}[/]")
        return 2
    except (KafkaError, TimeoutError, OSError, RuntimeError) as error:
        console.print(f"[red]breaker {args.breaker_action} failed[/] " + escape(f"({k.bootstrap_servers}): {error!r}"))
        return 1
    if change is None:
        console.print(escape(f"{args.entity} is closed already: nothing written"))
        return 0
    until = f" until {change.expires_at:%Y-%m-%d %H:%M:%S} UTC" if change.expires_at else ""
    console.print(
        escape(f"{change.entity} {change.previous_state.value} -> ")
        + f"[bold]{change.state.value}[/]"
        + escape(f"{until} (version {change.version}, by {change.actor}); audit in {audit_topic(k)}"),
        highlight=False,
    )
    return 0


def resolve_owner(
    entity: Entity, owner: str | None, changes: dict[str, BreakerChange], *, opening: bool = False
) -> str:
    """The team a manual change is for: ``owner``, else the team's own, else that of the only breaker on it.

    For an agent or a session, the only breaker that is not closed; when none is, a close (a
    no-op) takes the only one there is, while an open needs the owner said: a closed breaker,
    kept for ordering, may be a week old and another team's.

    >>> resolve_owner(parse_entity("agent:assistant"), None, {})
    Traceback (most recent call last):
    ...
    detector.breaker_cli.OwnerNeeded: agent:assistant: whose? Each team has its own; say --owner TEAM
    """
    if owner is not None:
        if not owner.strip():
            raise OwnerNeeded(f"{entity}: --owner must name a team")
        return owner.strip()
    if entity.type == "team":
        return entity.id
    on_it = [c for c in changes.values() if c.entity == entity]
    every = sorted({c.owner for c in on_it})
    known = every
    if entity.type in TEAM_SCOPED:
        refusing = sorted({c.owner for c in on_it if c.state is not BreakerState.CLOSED})
        known = refusing if refusing or opening else every
    if len(known) == 1:
        return known[0]
    if entity.type in TEAM_SCOPED:
        if known:
            teams = f" (teams with a breaker on it: {', '.join(known)})"
        else:
            teams = f" (teams with a closed breaker on it: {', '.join(every)})" if every else ""
        raise OwnerNeeded(f"{entity}: whose? Each team has its own; say --owner TEAM{teams}")
    return "unknown"


def manual_change(
    current: BreakerChange | None,
    entity: Entity,
    action: Action,
    *,
    at: float,
    reason: str,
    actor: str,
    ttl: float = math.inf,
    owner: str | None = None,
    incident_id: str | None = None,
) -> BreakerChange:
    """The change a person makes on top of ``current`` (the entity's newest change, None if none)."""
    if owner is None:
        owner = current.owner if current is not None else (entity.id if entity.type == "team" else "unknown")
    elif current is not None and entity_key(entity, owner) != entity_key(current.entity, current.owner):
        raise ValueError(f"{current.entity} of {current.owner} is not {entity} of {owner}")
    if action == "open":
        expires = None if math.isinf(ttl) else at + ttl
        return make_change(
            entity,
            owner=owner,
            state=BreakerState.OPEN,
            previous=current,
            at=at,
            reason=reason,
            actor=actor,
            expires_at=expires,
            incident_id=incident_id,
        )
    return make_change(
        entity,
        owner=owner,
        state=BreakerState.CLOSED,
        previous=current,
        at=at,
        reason=reason,
        actor=actor,
        incident_id=current.incident_id if current is not None else None,
    )


def audit_record(action: Action, change: BreakerChange, at: float) -> dict[str, Any]:
    """One line of the audit topic: who did what to which breaker, when, why, and the change written."""
    return {
        "action": action,
        "entity": f"{change.entity.type}:{change.entity.id}",
        "owner": change.owner,
        "actor": change.actor,
        "reason": change.reason,
        "at": utc_from_epoch(at).isoformat(),
        "change": change.model_dump(mode="json"),
    }


# -- Kafka -------------------------------------------------------------------------------------


def _client_options(k: KafkaSettings) -> dict[str, Any]:
    from detector.worker.snapshots import client_options

    return client_options(k)


async def ensure_topics(k: KafkaSettings) -> set[str]:
    """Create the breakers topic (compacted) and its audit topic when they are missing; the names created."""
    from aiokafka.admin import NewTopic  # type: ignore[import-untyped]

    from detector.worker.snapshots import create_missing_topics

    wanted = [
        NewTopic(
            k.breakers_topic,
            num_partitions=k.partitions,
            replication_factor=k.replication_factor,
            topic_configs={"cleanup.policy": "compact"},
        ),
        NewTopic(
            audit_topic(k),
            num_partitions=1,  # one partition: one order for the whole history
            replication_factor=k.replication_factor,
            topic_configs={
                "cleanup.policy": "delete",
                "retention.ms": str(int(AUDIT_RETENTION_DAYS * 86400 * 1000)),
            },
        ),
    ]
    return await create_missing_topics(k, wanted, timeout=TIMEOUT_SECONDS)


async def current_changes(k: KafkaSettings, timeout: float = TIMEOUT_SECONDS) -> dict[str, BreakerChange] | None:
    """The newest change of every breaker on the breakers topic, by its key (None: no such topic)."""
    from aiokafka.admin import AIOKafkaAdminClient

    from detector.enforce import BreakerFollower, BreakerTable

    options = _client_options(k)
    admin = AIOKafkaAdminClient(**options)
    await admin.start()
    try:
        if k.breakers_topic not in await admin.list_topics():
            return None
    finally:
        await admin.close()
    table = BreakerTable(max_closed=sys.maxsize)
    follower = BreakerFollower(table, topic=k.breakers_topic, client_id="stormwatch-breaker-cli", **options)
    await follower.start()
    try:
        async with asyncio.timeout(timeout):
            await follower.ready
    finally:
        await follower.stop()
    return {change_key(c): c for c in table.changes()}


async def _write(k: KafkaSettings, action: Action, change: BreakerChange, at: float) -> None:
    """The change to the breakers topic, then its audit record; both acknowledged by all replicas."""
    from aiokafka import AIOKafkaProducer  # type: ignore[import-untyped]

    producer = AIOKafkaProducer(acks="all", enable_idempotence=True, **_client_options(k))
    await producer.start()
    try:
        key = change_key(change).encode()
        audit = orjson.dumps(audit_record(action, change, at))
        async with asyncio.timeout(TIMEOUT_SECONDS):
            await producer.send_and_wait(k.breakers_topic, key=key, value=change.model_dump_json().encode())
        try:
            async with asyncio.timeout(TIMEOUT_SECONDS):
                await producer.send_and_wait(audit_topic(k), key=key, value=audit)
        except Exception as error:
            raise RuntimeError(
                f"the change was written but its audit record was not ({error!r}); record it by hand: {audit.decode()}"
            ) from error
    finally:
        await producer.stop()


async def _current(
    k: KafkaSettings, entity: Entity, owner: str | None, opening: bool
) -> tuple[BreakerChange | None, str]:
    """The newest change of ``entity``'s breaker and its owner, creating the topics when they are missing."""
    changes = {} if k.breakers_topic in await ensure_topics(k) else (await current_changes(k) or {})
    owner = resolve_owner(entity, owner, changes, opening=opening)
    return changes.get(entity_key(entity, owner)), owner


async def open_breaker(
    k: KafkaSettings,
    entity: Entity,
    reason: str,
    actor: str,
    ttl: float = 1800.0,
    *,
    owner: str | None = None,
    incident_id: str | None = None,
    now: float | None = None,
) -> BreakerChange:
    """Open ``entity``'s breaker for ``ttl`` seconds (``math.inf``: until closed) and audit it.

    Raises :class:`OwnerNeeded` for an agent or session whose team ``owner`` does not say and
    the topic does not tell.
    """
    current, owner = await _current(k, entity, owner, opening=True)
    at = time.time() if now is None else now
    change = manual_change(
        current, entity, "open", at=at, reason=reason, actor=actor, ttl=ttl, owner=owner, incident_id=incident_id
    )
    await _write(k, "open", change, at)
    return change


async def close_breaker(
    k: KafkaSettings, entity: Entity, reason: str, actor: str, *, owner: str | None = None, now: float | None = None
) -> BreakerChange | None:
    """Close ``entity``'s breaker (of team ``owner``) and audit it; None (nothing written) when closed already."""
    current, owner = await _current(k, entity, owner, opening=False)
    if current is None or current.state is BreakerState.CLOSED:
        return None
    at = time.time() if now is None else now
    change = manual_change(current, entity, "close", at=at, reason=reason, actor=actor, owner=owner)
    await _write(k, "close", change, at)
    return change


# -- output ------------------------------------------------------------------------------------


def print_breakers(console: Console, changes: list[BreakerChange], show_all: bool, now: float) -> None:
    shown = sorted(
        (c for c in changes if show_all or c.state is not BreakerState.CLOSED),
        key=lambda c: c.changed_at,
        reverse=True,
    )
    if not shown:
        console.print("no breakers " + ("on the topic" if show_all else "open or half-open"))
        return
    table = Table(title=f"breakers ({len(shown)})", title_justify="left")
    for column in ("entity", "owner", "state", "since UTC", "until UTC", "by", "reason"):
        table.add_column(column, overflow="fold", no_wrap=column in ("state", "since UTC"))
    colour = {"open": "red", "half_open": "yellow", "closed": "green"}
    for c in shown:
        if c.state is BreakerState.OPEN and c.expires_at is None:
            until = "closed by hand"
        elif c.expires_at is not None:
            left = c.expires_at.timestamp() - now
            until = f"{c.expires_at:%m-%d %H:%M:%S}" + (f" ({format_duration(left)})" if left > 0 else " (expired)")
        else:
            until = ""
        why = c.reason + (f" [incident {c.incident_id}]" if c.incident_id else "")
        table.add_row(
            escape(f"{c.entity.type}:{c.entity.id}"),
            escape(c.owner),
            f"[{colour[c.state.value]}]{c.state.value}[/]",
            f"{c.changed_at:%m-%d %H:%M:%S}",
            until,
            escape(c.actor),
            escape(why),
        )
    console.print(table)
