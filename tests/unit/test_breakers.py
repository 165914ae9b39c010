"""The breaker state machine: every transition, versions, ids, pickling, bounded memory."""

from __future__ import annotations

import math
import pickle
from typing import Any

import pytest

from detector.breakers import (
    POLICY_ACTOR,
    BreakerBoard,
    make_change,
    parse_duration,
    parse_entity,
)
from detector.events import BreakerChange, BreakerState, Entity
from tests.conftest import T0

OPEN, HALF_OPEN, CLOSED = BreakerState.OPEN, BreakerState.HALF_OPEN, BreakerState.CLOSED
S1 = Entity(type="session", id="s-1")
K1 = Entity(type="api_key", id="k-1")


def board(**kw: Any) -> BreakerBoard:
    return BreakerBoard(**{"ttl": 600.0, "max_ttl": 3000.0, "probe_seconds": 300.0, **kw})


def states(changes: list[BreakerChange]) -> list[tuple[str, str]]:
    return [(c.previous_state.value, c.state.value) for c in changes]


def seconds(c: BreakerChange) -> float:
    assert c.expires_at is not None
    return (c.expires_at - c.changed_at).total_seconds()


def test_trip_opens_a_closed_breaker_for_the_ttl() -> None:
    b = board()
    (c,) = b.trip(S1, T0, owner="search", reason="agent loop", incident_id="inc-1")
    assert states([c]) == [("closed", "open")]
    assert c.changed_at.timestamp() == T0 and seconds(c) == 600
    assert (c.entity, c.owner, c.reason, c.incident_id, c.actor) == (S1, "search", "agent loop", "inc-1", POLICY_ACTOR)
    assert c.version == int(T0)
    assert BreakerChange.model_validate_json(c.model_dump_json()) == c  # a valid contract record


def test_open_turns_half_open_at_expiry_and_closes_after_a_quiet_probe_period() -> None:
    b = board()
    b.trip(S1, T0, owner="search", reason="loop")
    assert b.advance(T0 + 599) == []
    (half,) = b.advance(T0 + 640)  # noticed late: still dated when it was due
    assert states([half]) == [("open", "half_open")]
    assert half.changed_at.timestamp() == T0 + 600 and half.expires_at is None and half.actor == POLICY_ACTOR
    assert b.advance(T0 + 899) == []
    (closed,) = b.advance(T0 + 950)
    assert states([closed]) == [("half_open", "closed")] and closed.changed_at.timestamp() == T0 + 900
    assert b.advance(T0 + 10_000) == []


def test_one_advance_can_carry_a_breaker_through_half_open_to_closed() -> None:
    b = board()
    b.trip(S1, T0, owner="search", reason="loop")
    changes = b.advance(T0 + 5000)
    assert states(changes) == [("open", "half_open"), ("half_open", "closed")]
    assert [c.changed_at.timestamp() for c in changes] == [T0 + 600, T0 + 900]


def test_a_trip_while_half_open_reopens_with_a_longer_ttl_up_to_the_cap() -> None:
    b = board()
    b.trip(S1, T0, owner="search", reason="loop")
    ttls = []
    for _ in range(4):
        (half,) = b.advance(_expiry(b))
        assert half.state is HALF_OPEN
        now = half.changed_at.timestamp() + 10  # inside the probe period
        (again,) = b.trip(S1, now, owner="search", reason="loop again")
        assert states([again]) == [("half_open", "open")]
        ttls.append(seconds(again))
    assert ttls == [1200, 2400, 3000, 3000]  # doubled, capped at max_ttl


def _expiry(b: BreakerBoard) -> float:
    breaker = b.get(S1, "search")
    assert breaker is not None and breaker.expires_at is not None
    return breaker.expires_at


def test_a_trip_after_the_expiry_settles_time_first() -> None:
    b = board()
    b.trip(S1, T0, owner="search", reason="loop")
    changes = b.trip(S1, T0 + 700, owner="search", reason="loop again")  # no advance() in between
    assert states(changes) == [("open", "half_open"), ("half_open", "open")]
    assert seconds(changes[1]) == 1200


def test_a_policy_trip_while_open_changes_nothing_but_a_given_ttl_reopens() -> None:
    b = board()
    (first,) = b.trip(S1, T0, owner="search", reason="loop")
    assert b.trip(S1, T0 + 60, owner="search", reason="still looping") == []
    (manual,) = b.trip(S1, T0 + 120, owner="search", reason="keep it shut", actor="ana", ttl=math.inf)
    assert states([manual]) == [("open", "open")] and manual.expires_at is None and manual.actor == "ana"
    assert manual.version > first.version
    assert b.advance(T0 + 10**7) == []  # open until closed by hand


def test_close_by_hand_from_open_and_half_open_and_not_when_closed() -> None:
    b = board()
    b.trip(S1, T0, owner="search", reason="loop")
    (c,) = b.close(S1, T0 + 30, owner="search", reason="fixed the agent", actor="ana")
    assert states([c]) == [("open", "closed")] and c.actor == "ana" and c.reason == "fixed the agent"
    assert b.close(S1, T0 + 40, owner="search", reason="again", actor="ana") == []
    assert b.close(K1, T0 + 40, owner="search", reason="never opened", actor="ana") == []

    b.trip(K1, T0, owner="search", reason="storm")
    changes = b.close(K1, T0 + 650, owner="search", reason="done", actor="bob")  # half-open by then
    assert states(changes) == [("open", "half_open"), ("half_open", "closed")]


def test_closing_resets_the_backoff() -> None:
    b = board()
    b.trip(S1, T0, owner="search", reason="loop")
    b.trip(S1, T0 + 700, owner="search", reason="again")  # 1200 s now
    b.close(S1, T0 + 800, owner="search", reason="fixed", actor="ana")
    (c,) = b.trip(S1, T0 + 900, owner="search", reason="new loop")
    assert seconds(c) == 600


def test_versions_rise_per_entity_even_within_one_second() -> None:
    b = board()
    changes = b.trip(S1, T0, owner="s", reason="a") + b.close(S1, T0, owner="s", reason="b", actor="x")
    changes += b.trip(S1, T0 + 0.5, owner="s", reason="c") + b.trip(K1, T0 + 0.5, owner="s", reason="d")
    versions = [c.version for c in changes if c.entity == S1]
    assert versions == [int(T0), int(T0) + 1, int(T0) + 2]
    assert next(c.version for c in changes if c.entity == K1) == int(T0)  # each entity counts its own


def _script(b: BreakerBoard) -> list[BreakerChange]:
    out = b.trip(S1, T0, owner="search", reason="loop", incident_id="inc-1")
    out += b.trip(K1, T0 + 5, owner="search", reason="storm")
    out += b.advance(T0 + 620)
    out += b.trip(S1, T0 + 650, owner="search", reason="loop again")
    out += b.close(K1, T0 + 700, owner="search", reason="fixed", actor="ana")
    out += b.advance(T0 + 5000)
    return out


def test_the_same_calls_give_the_same_changes_and_ids() -> None:
    first, second = _script(board()), _script(board())
    assert [c.model_dump() for c in first] == [c.model_dump() for c in second]
    ids = [c.change_id for c in first]
    assert len(set(ids)) == len(ids) == 8


def test_a_pickled_board_goes_on_exactly_like_the_original() -> None:
    b = board()
    b.trip(S1, T0, owner="search", reason="loop")
    b.trip(K1, T0 + 5, owner="search", reason="storm")
    b.advance(T0 + 620)
    copy = pickle.loads(pickle.dumps(b))

    def rest(x: BreakerBoard) -> list[BreakerChange]:
        return x.trip(S1, T0 + 650, owner="search", reason="again") + x.advance(T0 + 9000)

    assert [c.model_dump() for c in rest(copy)] == [c.model_dump() for c in rest(b)]


def test_closed_breakers_are_forgotten_and_a_new_one_still_gets_a_higher_version() -> None:
    b = board(forget_after=3600.0)
    old = b.trip(S1, T0, owner="search", reason="loop") + b.close(S1, T0 + 10, owner="search", reason="ok", actor="ana")
    assert len(b) == 1
    b.advance(T0 + 3000)
    assert len(b) == 1
    b.advance(T0 + 3611)
    assert len(b) == 0 and b.get(S1, "search") is None
    (new,) = b.trip(S1, T0 + 4000, owner="search", reason="loop")
    assert new.version > max(c.version for c in old)


def test_memory_is_bounded_by_max_closed_and_open_breakers_are_kept() -> None:
    b = board(max_closed=50)
    for i in range(1000):
        e = Entity(type="session", id=f"s-{i}")
        b.trip(e, T0 + i, owner="search", reason="loop", ttl=math.inf)
        if i >= 10:
            b.close(e, T0 + i, owner="search", reason="ok", actor="ana")
    assert len(b) == 60
    assert {x.entity.id for x in b.active()} == {f"s-{i}" for i in range(10)}
    b.advance(T0 + 10**7)  # long past forget_after: closed ones go, open ones stay
    assert len(b) == 10


def test_only_breaker_entity_types_and_positive_ttls() -> None:
    b = board()
    with pytest.raises(ValueError, match="not a model"):
        b.trip(Entity(type="model", id="gpt-4o"), T0, owner="x", reason="y")
    with pytest.raises(ValueError, match="ttl"):
        b.trip(S1, T0, owner="x", reason="y", ttl=0)


def test_apply_adopts_newer_changes_from_elsewhere_and_keeps_counting_above_them() -> None:
    b = board()
    b.trip(S1, T0, owner="search", reason="loop")
    manual = make_change(S1, owner="search", state=CLOSED, previous=None, at=T0 + 100, reason="by hand", actor="ana")
    stale = make_change(S1, owner="search", state=OPEN, previous=None, at=T0 - 100, reason="old", actor="ana")
    assert b.apply(stale) is False
    assert b.apply(manual) is True and b.apply(manual) is False
    breaker = b.get(S1, "search")
    assert breaker is not None and breaker.state is CLOSED and breaker.version == manual.version
    (c,) = b.trip(S1, T0 + 100, owner="search", reason="again")
    assert c.previous_state is CLOSED and c.version == manual.version + 1

    opened = make_change(
        K1, owner="search", state=OPEN, previous=None, at=T0, reason="by hand", actor="bob", expires_at=T0 + 60
    )
    assert b.apply(opened)
    assert states(b.advance(T0 + 61)) == [("open", "half_open")]


def test_parse_entity_and_duration() -> None:
    assert parse_entity("api_key:k-123") == Entity(type="api_key", id="k-123")
    assert parse_duration("30m") == 1800 and parse_duration("2d") == 172800 and parse_duration("1h30m") == 5400
    for bad in ("user:u1", "session:", "k-123"):
        with pytest.raises(ValueError):
            parse_entity(bad)
    for bad in ("0", "-5", "10x", "m", "30m10"):
        with pytest.raises(ValueError):
            parse_duration(bad)


def test_an_agent_has_a_breaker_per_team_and_a_team_or_api_key_one_in_all() -> None:
    b = board()
    agent = Entity(type="agent", id="assistant")
    (search,) = b.trip(agent, T0, owner="search", reason="loop")
    (ads,) = b.trip(agent, T0 + 1, owner="ads", reason="loop")
    assert search.change_id != ads.change_id and len(b) == 2
    assert sorted(b.owners(agent)) == ["ads", "search"]
    (closed,) = b.close(agent, T0 + 2, owner="ads", reason="fixed", actor="ana")
    assert closed.owner == "ads"
    assert b.get(agent, "search").state is OPEN and b.get(agent, "ads").state is CLOSED  # type: ignore[union-attr]
    b.trip(K1, T0, owner="search", reason="storm")
    assert b.get(K1, "anyone") is b.get(K1, "search") and b.owners(K1) == ["search"]


def test_a_board_pickled_before_agents_were_per_team_is_keyed_again() -> None:
    b = board()
    b.trip(S1, T0, owner="search", reason="loop")
    b.trip(K1, T0, owner="search", reason="storm")
    b.trip(Entity(type="session", id="s-2"), T0, owner="ads", reason="loop")
    b.close(Entity(type="session", id="s-2"), T0 + 1, owner="ads", reason="ok", actor="ana")
    legacy = {k: str(br.entity) for k, br in b._breakers.items()}  # the older version's keys: "<type>:<id>"
    for name in ("_breakers", "_active", "_closed"):
        keyed = b.__dict__[name]
        b.__dict__[name] = type(keyed)((legacy[k], v) for k, v in keyed.items())
    assert "session:s-1" in b._breakers
    restored: BreakerBoard = pickle.loads(pickle.dumps(b))
    assert restored.get(S1, "search") is not None and restored.get(K1, "x") is not None
    (closed,) = restored.close(S1, T0 + 5, owner="search", reason="fixed", actor="ana")
    assert closed.state is CLOSED
    assert {c.entity for c in restored.advance(T0 + 10_000)} == {K1}  # s-1, closed by hand, stays closed


def test_a_board_following_the_topic_drops_what_the_topic_no_longer_holds() -> None:
    """The alerter's wiring: history under a key from before teams, then a tombstone of a per-team key."""
    from detector.enforce import BreakerFollower, BreakerTable
    from tests.unit.test_enforce import Record

    board = BreakerBoard()
    follower = BreakerFollower(BreakerTable(), "127.0.0.1:1", on_change=board.apply, on_drop=board.forget)
    agent = Entity(type="agent", id="assistant")
    opened = make_change(agent, owner="search", state=OPEN, previous=None, at=T0, reason="loop", actor="ana")
    by_ads = make_change(
        agent, owner="ads", state=OPEN, previous=opened, at=T0 + 60, reason="x", actor="bob", expires_at=T0 + 1860
    )
    closed = make_change(agent, owner="ads", state=CLOSED, previous=by_ads, at=T0 + 120, reason="fixed", actor="bob")
    for c in (opened, by_ads, closed):  # one key, "agent:assistant", as an older alerter wrote them
        follower._apply(Record(b"agent:assistant", c.model_dump_json().encode()))
    assert board.active() == [] and board.owners(agent) == ["ads"]  # the close closed the one breaker
    key = make_change(
        Entity(type="api_key", id="k"), owner="search", state=OPEN, previous=None, at=T0, reason="storm", actor="ana"
    )
    follower._apply(Record(b"api_key:k", key.model_dump_json().encode()))
    follower._apply(Record(b"api_key:k", None))
    assert board.active() == []
