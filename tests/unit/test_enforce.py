"""The gateway side: BreakerTable ordering and answers, probes, expiry; the ASGI middleware; the follower's parsing."""

from __future__ import annotations

import asyncio
import json
import math
import time
from dataclasses import dataclass
from typing import Any

import pytest

from detector.breakers import change_key, make_change
from detector.enforce import BreakerFollower, BreakerMiddleware, BreakerTable, Message, Scope, bench_allowed
from detector.events import BreakerChange, BreakerState, Entity
from tests.conftest import T0

OPEN, HALF_OPEN, CLOSED = BreakerState.OPEN, BreakerState.HALF_OPEN, BreakerState.CLOSED
ENTITY_TYPES = ("team", "api_key", "agent", "session")


def change(
    key: str,
    state: BreakerState,
    at: float = T0,
    version: int | None = None,
    ttl: float | None = 600.0,
    reason: str = "runaway",
    incident_id: str | None = "inc-1",
    owner: str = "search",
) -> BreakerChange:
    kind, _, ident = key.partition(":")
    c = make_change(
        Entity.model_validate({"type": kind, "id": ident}),
        owner=ident if kind == "team" else owner,
        state=state,
        previous=None,
        at=at,
        reason=reason,
        actor="ana",
        expires_at=at + ttl if ttl is not None else None,
        incident_id=incident_id,
    )
    return c if version is None else c.model_copy(update={"version": version})


# -- the table ---------------------------------------------------------------------------------


def test_a_higher_version_wins_and_repeats_or_older_ones_are_ignored() -> None:
    table = BreakerTable()
    opened = change("session:s-1", OPEN, version=5)
    closed = change("session:s-1", CLOSED, version=6)
    assert table.apply(opened) and table.apply(closed)
    assert not table.apply(opened)  # arrives again, late: ignored
    assert not table.apply(change("session:s-1", OPEN, version=6))  # same version: the first one stands
    assert table.allowed(session="s-1", now=T0 + 1)
    assert (table.applied, table.ignored) == (2, 2)
    assert table.apply(change("session:s-1", OPEN, version=7))
    assert not table.allowed(session="s-1", now=T0 + 1)


@pytest.mark.parametrize("kind", ENTITY_TYPES)
def test_an_open_breaker_refuses_its_entity_only(kind: str) -> None:
    table = BreakerTable()
    table.apply(change(f"{kind}:x", OPEN))
    ids = {"team": "search", "api_key": "k", "agent": "a", "session": "s"}
    assert table.allowed(**ids, now=T0 + 1)
    assert not table.allowed(**{**ids, kind: "x"}, now=T0 + 1)
    assert not table.allowed(**{kind: "x"}, now=T0 + 1)
    assert table.allowed(now=T0 + 1)
    for other in set(ENTITY_TYPES) - {kind}:  # the same id under another type is another entity
        assert table.allowed(**{other: "x"}, now=T0 + 1)
    refusing = table.why(**{kind: "x"}, now=T0 + 1)
    assert refusing is not None and refusing.entity.type == kind
    assert len(table) == 1


@pytest.mark.parametrize("kind", ["agent", "session"])
def test_an_agent_or_session_breaker_refuses_its_own_team_only(kind: str) -> None:
    """Teams name their agents and sessions: "assistant" of search looping must not stop ads' "assistant"."""
    table = BreakerTable()
    table.apply(change(f"{kind}:assistant", OPEN, owner="search"))
    assert not table.allowed(**{kind: "assistant", "team": "search"}, now=T0 + 1)
    assert table.allowed(**{kind: "assistant", "team": "ads"}, now=T0 + 1)
    assert not table.allowed(**{kind: "assistant"}, now=T0 + 1)  # a request that names no team: refused
    # ads' own breaker on the same name is another breaker: its close leaves search's open.
    table.apply(change(f"{kind}:assistant", OPEN, owner="ads", version=int(T0) + 5))
    table.apply(change(f"{kind}:assistant", CLOSED, owner="ads", at=T0 + 2, version=int(T0) + 6))
    assert table.allowed(**{kind: "assistant", "team": "ads"}, now=T0 + 3)
    assert not table.allowed(**{kind: "assistant", "team": "search"}, now=T0 + 3)
    assert table.get(f"{kind}:search/assistant") is not None and table.get(f"{kind}:ads/assistant") is not None
    assert len(table) == 1 and {c.owner for c in table.find(Entity(type=kind, id="assistant"))} == {"search", "ads"}
    table.forget(f"{kind}:search/assistant")
    assert table.allowed(**{kind: "assistant"}, now=T0 + 3) and len(table) == 0


def test_a_tombstone_drops_exactly_what_its_key_held() -> None:
    table = BreakerTable()
    table.apply(change("agent:search/assistant", OPEN, owner="ads"))  # ads' agent "search/assistant"
    table.apply(change("agent:assistant", OPEN, owner="search"))
    table.forget("agent:search/assistant")  # the tombstone of search's "assistant", not of ads' agent
    table.forget("agent:nobody")  # a key it never held: nothing
    assert not table.allowed(agent="search/assistant", team="ads", now=T0 + 1)
    assert table.allowed(agent="assistant", team="search", now=T0 + 1)
    assert [c.owner for c in table.dropped] == ["search"]


# A record of the breakers topic from before breakers were per team: key "agent:<id>", one breaker
# for every team's agent of that name, whose owner was whoever tripped or changed it last.


def test_a_breaker_from_before_teams_refuses_every_team_until_its_owner_writes_under_the_new_key() -> None:
    table = BreakerTable()
    legacy = change("agent:assistant", OPEN, owner="platform", ttl=None)  # tripped for growth, owned by default
    assert table.apply(legacy, key="agent:assistant")
    assert not table.allowed(agent="assistant", team="growth", now=T0 + 60)
    assert not table.allowed(agent="assistant", team="platform", now=T0 + 60)
    assert not table.allowed(agent="assistant", now=T0 + 60)
    table.apply(change("agent:assistant", OPEN, owner="ads", at=T0 + 10))  # another team's own: not its successor
    assert not table.allowed(agent="assistant", team="growth", now=T0 + 60)
    closed = change("agent:assistant", CLOSED, owner="platform", at=T0 + 120)  # the alerter's board, carrying it on
    assert table.apply(closed)
    assert table.allowed(agent="assistant", team="growth", now=T0 + 121)
    assert not table.allowed(agent="assistant", team="ads", now=T0 + 121)
    assert table.get("agent:assistant") is None and list(table.dropped) == [legacy]
    assert not table.apply(legacy, key="agent:assistant")  # read again, after its successor: ignored


def test_under_a_key_from_before_teams_the_newest_change_replaces_the_last_whoever_owns_it() -> None:
    table = BreakerTable()
    history = [
        change("agent:assistant", OPEN, owner="search", ttl=None),
        change("agent:assistant", OPEN, owner="ads", at=T0 + 60, ttl=1800),
        change("agent:assistant", CLOSED, owner="ads", at=T0 + 120),
    ]
    for c in history:
        assert table.apply(c, key="agent:assistant")
    assert table.allowed(agent="assistant", team="search", now=T0 + 7 * 86400)  # the close closed the one breaker
    assert len(table) == 0 and table.get("agent:assistant") == history[-1]


def test_a_tombstone_of_a_key_from_before_teams_leaves_the_breakers_written_since() -> None:
    table = BreakerTable()
    table.apply(change("agent:assistant", OPEN, owner="search"), key="agent:assistant")
    table.apply(change("agent:assistant", OPEN, owner="ads", at=T0 + 3600))
    table.forget("agent:assistant")
    assert table.allowed(agent="assistant", team="search", now=T0 + 3601)
    assert not table.allowed(agent="assistant", team="ads", now=T0 + 3601) and len(table) == 1


def test_a_request_of_another_team_is_answered_without_deciding() -> None:
    table = BreakerTable()
    table.apply(change("agent:assistant", OPEN, owner="search"))
    calls: list[object] = []
    table._decide = lambda *args: calls.append(args)  # type: ignore[method-assign]
    assert table.allowed(agent="assistant", team="ads", now=T0 + 1) and calls == []


def test_open_refuses_until_expiry_then_lets_one_probe_through_per_interval() -> None:
    table = BreakerTable(probe_interval=30)
    table.apply(change("api_key:k", OPEN, ttl=600))
    assert not table.allowed(api_key="k", now=T0 + 599.9)
    answers = [table.allowed(api_key="k", now=T0 + 600 + dt) for dt in (0, 1, 29.9, 30, 31, 60.5)]
    assert answers == [True, False, False, True, False, True]


def test_the_half_open_change_keeps_the_probe_slot_an_expired_open_gave_out() -> None:
    table = BreakerTable(probe_interval=30)
    table.apply(change("api_key:k", OPEN, ttl=600))
    assert table.allowed(api_key="k", now=T0 + 601)  # the probe, before the worker's change arrived
    table.apply(change("api_key:k", HALF_OPEN, at=T0 + 600, version=int(T0) + 1))
    assert not table.allowed(api_key="k", now=T0 + 610)
    assert table.allowed(api_key="k", now=T0 + 632)


def test_half_open_lets_a_probe_through_at_once_and_closed_lets_everything() -> None:
    table = BreakerTable(probe_interval=30)
    table.apply(change("agent:a", HALF_OPEN, ttl=None))
    assert [table.allowed(agent="a", now=T0 + dt) for dt in (1, 2, 40)] == [True, False, True]
    table.apply(change("agent:a", CLOSED, at=T0 + 50))
    assert all(table.allowed(agent="a", now=T0 + 50 + i / 10) for i in range(10))
    assert len(table) == 0


@pytest.mark.parametrize(("probing", "refusing"), [("session", "api_key"), ("team", "agent"), ("api_key", "team")])
def test_a_probe_is_not_spent_when_another_breaker_refuses_the_request(probing: str, refusing: str) -> None:
    table = BreakerTable(probe_interval=30)
    table.apply(change(f"{probing}:x", HALF_OPEN, ttl=None, owner="x"))
    table.apply(change(f"{refusing}:y", OPEN, ttl=math.inf, owner="x"))
    ids = {probing: "x", refusing: "y"}
    why = table.why(**ids, now=T0 + 1)
    assert why is not None and why.entity.type == refusing
    assert not table.allowed(**ids, now=T0 + 1)
    table.apply(change(f"{refusing}:y", CLOSED, at=T0 + 2, owner="x"))
    assert table.allowed(**ids, now=T0 + 3)  # the probe is still there
    assert not table.allowed(**ids, now=T0 + 4)


def test_why_names_the_refusing_change_and_takes_no_probe() -> None:
    table = BreakerTable(probe_interval=30)
    c = change("team:search", HALF_OPEN, ttl=None, reason="budget burn")
    table.apply(c)
    assert table.why(team="search", now=T0 + 1) is None  # a probe is free: nothing refuses
    assert table.why(team="search", now=T0 + 1) is None  # ... and why() did not take it
    assert table.allowed(team="search", now=T0 + 1)
    assert table.why(team="search", now=T0 + 2) == c
    assert table.why(team="other", now=T0 + 2) is None


def test_retry_after() -> None:
    table = BreakerTable(probe_interval=30, retry_after_unknown=120)
    timed, forever = change("session:a", OPEN, ttl=600), change("session:b", OPEN, ttl=None)
    table.apply(timed)
    table.apply(forever)
    assert table.retry_after(timed, now=T0 + 100.5) == 500
    assert table.retry_after(forever, now=T0 + 100) == 120
    assert table.allowed(session="a", now=T0 + 600)  # the probe
    assert table.retry_after(timed, now=T0 + 610) == 20


def test_tombstones_unknown_entity_types_and_the_closed_bound() -> None:
    table = BreakerTable(max_closed=3)
    table.apply(change("session:s", OPEN))
    table.forget("session:search/s")
    assert table.allowed(session="s", now=T0 + 1) and table.get("session:s") is None
    user = change("session:u", OPEN).model_copy(update={"entity": Entity(type="user", id="u")})
    assert not table.apply(user)
    for i in range(10):
        table.apply(change(f"session:c{i}", CLOSED))
    table.apply(change("session:open", OPEN))
    assert len(table.changes()) == 4 and len(table) == 1


def test_bench_allowed_measures_something() -> None:
    assert 0 < bench_allowed(calls=2000, breakers=100) < 1e6


# -- the middleware ----------------------------------------------------------------------------


@dataclass
class Response:
    status: int
    headers: dict[bytes, bytes]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


async def call(app: Any, headers: dict[str, str], kind: str = "http", body: bytes = b"hi") -> list[Message]:
    scope: Scope = {
        "type": kind,
        "method": "POST",
        "path": "/v1/chat/completions",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
    }
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent


def response(sent: list[Message]) -> Response:
    start, body = sent
    assert start["type"] == "http.response.start" and body["type"] == "http.response.body"
    return Response(start["status"], dict(start["headers"]), body["body"])


async def echo_app(scope: Scope, receive: Any, send: Any) -> None:
    """The wrapped app: echoes the request body, or notes a lifespan call."""
    if scope["type"] == "lifespan":
        await send({"type": "lifespan.seen"})
        return
    message = await receive()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"echo:" + message["body"]})


def test_middleware_refuses_with_429_json_and_retry_after_and_passes_the_rest() -> None:
    table = BreakerTable()
    now = time.time()
    table.apply(change("session:s-bad", OPEN, at=now, ttl=600, reason="agent loop", incident_id="inc-9"))
    app = BreakerMiddleware(echo_app, table)

    refused = response(asyncio.run(call(app, {"X-Session-Id": "s-bad", "x-team": "search"})))
    assert refused.status == 429
    assert refused.headers[b"content-type"] == b"application/json"
    retry = int(refused.headers[b"retry-after"])
    assert 595 <= retry <= 600
    assert int(refused.headers[b"content-length"]) == len(refused.body)
    assert refused.json() == {
        "error": "circuit_open",
        "entity": "session:s-bad",
        "owner": "search",
        "state": "open",
        "reason": "agent loop",
        "incident_id": "inc-9",
        "retry_after": retry,
    }

    passed = response(asyncio.run(call(app, {"x-session-id": "s-good", "x-team": "search"}, body=b"payload")))
    assert (passed.status, passed.body) == (200, b"echo:payload")
    assert response(asyncio.run(call(app, {}))).status == 200
    assert asyncio.run(call(app, {}, kind="lifespan")) == [{"type": "lifespan.seen"}]


def test_middleware_reads_each_configured_header() -> None:
    table = BreakerTable()
    now = time.time()
    for kind in ENTITY_TYPES:
        table.apply(change(f"{kind}:bad", OPEN, at=now))
    app = BreakerMiddleware(
        echo_app, table, api_key_header="X-Key", agent_header="x-bot", session_header="x-run", team_header="x-org"
    )
    for header, kind in (("x-key", "api_key"), ("X-Bot", "agent"), ("x-run", "session"), ("x-org", "team")):
        refused = response(asyncio.run(call(app, {header: "bad"})))
        assert refused.status == 429 and refused.json()["entity"] == f"{kind}:bad"
        assert response(asyncio.run(call(app, {header: "good"}))).status == 200
    assert response(asyncio.run(call(app, {"x-session-id": "bad"}))).status == 200  # not a configured header
    with pytest.raises(ValueError, match="different names"):
        BreakerMiddleware(echo_app, table, api_key_header="x-team")


def test_middleware_reads_headers_as_utf8() -> None:
    table = BreakerTable()
    table.apply(change("agent:assistant", OPEN, at=time.time(), owner="équipe"))
    app = BreakerMiddleware(echo_app, table)
    refused = response(asyncio.run(call(app, {"x-agent-id": "assistant", "x-team": "équipe"})))
    assert refused.status == 429 and refused.json()["owner"] == "équipe"
    assert response(asyncio.run(call(app, {"x-agent-id": "assistant", "x-team": "ads"}))).status == 200


def test_middleware_closes_a_refused_websocket() -> None:
    table = BreakerTable()
    table.apply(change("agent:a", OPEN, at=time.time()))
    app = BreakerMiddleware(echo_app, table)
    assert asyncio.run(call(app, {"x-agent-id": "a"}, kind="websocket")) == [
        {"type": "websocket.close", "code": 1008, "reason": "circuit_open"}
    ]


# -- the follower's records --------------------------------------------------------------------


@dataclass
class Record:
    key: bytes | None
    value: bytes | None
    topic: str = "llm.breakers"
    partition: int = 0
    offset: int = 0


def test_follower_applies_changes_skips_bad_records_and_forgets_on_tombstones() -> None:
    table = BreakerTable()
    follower = BreakerFollower(table, "kafka://127.0.0.1:1, 127.0.0.1:2")
    assert follower.bootstrap_servers == ["127.0.0.1:1", "127.0.0.1:2"]
    c = change("session:s", OPEN)
    follower._apply(Record(b"session:search/s", c.model_dump_json().encode()))
    follower._apply(Record(b"session:search/x", b'{"not": "a change"}'))
    follower._apply(Record(b"session:search/y", b"\xff garbage"))
    assert table.get("session:search/s") == c and follower.rejected == 2
    follower._apply(Record(b"session:search/s", None))
    assert table.get("session:search/s") is None and follower.records == 4


def test_the_follower_applies_records_under_their_keys_and_tells_what_the_table_let_go() -> None:
    dropped: list[tuple[str, str]] = []
    table = BreakerTable()
    follower = BreakerFollower(table, "127.0.0.1:1", on_drop=lambda c: dropped.append((c.owner, c.state.value)))
    legacy = [change("agent:assistant", OPEN, owner="search", ttl=None), change("agent:x", OPEN)]
    for c in legacy:  # written by an alerter from before breakers were per team
        follower._apply(Record(f"agent:{c.entity.id}".encode(), c.model_dump_json().encode()))
    assert not table.allowed(agent="assistant", team="ads", now=T0 + 1)  # as then: every team's
    follower._apply(Record(b"agent:x", None))
    successor = change("agent:assistant", CLOSED, owner="search", at=T0 + 60)
    follower._apply(Record(change_key(successor).encode(), successor.model_dump_json().encode()))
    assert table.allowed(agent="assistant", now=T0 + 61) and len(table) == 0
    assert dropped == [("search", "open"), ("search", "open")]


def test_a_listener_that_fails_does_not_stop_the_follower() -> None:
    """The alerter's listener writes to its outbox; a locked file must not end the table's following."""
    seen: list[str] = []

    def listener(c: BreakerChange) -> None:
        seen.append(c.entity.id)
        if c.entity.id == "bad":
            raise OSError("database is locked")

    table = BreakerTable()
    follower = BreakerFollower(table, "127.0.0.1:1", on_change=listener)
    for key in ("session:bad", "session:next"):
        c = change(key, OPEN)
        follower._apply(Record(change_key(c).encode(), c.model_dump_json().encode()))
    assert seen == ["bad", "next"]
    assert table.get("session:search/bad") is not None and table.get("session:search/next") is not None


def test_what_a_table_alone_lets_go_stays_bounded() -> None:
    from detector.enforce import MAX_DROPPED

    table = BreakerTable()
    for i in range(MAX_DROPPED + 10):
        c = change(f"api_key:k{i}", OPEN)
        table.apply(c)
        table.forget(change_key(c))
    assert len(table.dropped) == MAX_DROPPED and table.dropped[-1].entity.id == f"k{MAX_DROPPED + 9}"


def test_the_probe_an_expired_breaker_from_before_teams_gave_out_carries_on_to_its_successor() -> None:
    table = BreakerTable(probe_interval=30)
    table.apply(change("agent:assistant", OPEN, ttl=600, owner="search"), key="agent:assistant")
    assert table.allowed(agent="assistant", team="search", now=T0 + 600)  # the probe, before the half-open came
    half = change("agent:assistant", HALF_OPEN, at=T0 + 600, version=int(T0) + 1, owner="search")
    assert table.apply(half)  # the alerter's board, under the per-team key
    assert not table.allowed(agent="assistant", team="search", now=T0 + 601)
    assert table.allowed(agent="assistant", team="search", now=T0 + 631) and len(table) == 1


def test_a_team_named_blank_is_one_team_not_every_team() -> None:
    table = BreakerTable()
    table.apply(change("agent:assistant", OPEN, owner=""))  # an --owner once let through blank
    assert table.allowed(agent="assistant", team="ads", now=T0 + 1)
    assert not table.allowed(agent="assistant", team="", now=T0 + 1)


def test_retry_after_of_an_equal_change_read_again() -> None:
    table = BreakerTable()
    opened = change("session:s", OPEN, ttl=600)
    table.apply(opened)
    copy = BreakerChange.model_validate_json(opened.model_dump_json())
    assert table.retry_after(copy, now=T0 + 1) == table.retry_after(opened, now=T0 + 1) == 599
