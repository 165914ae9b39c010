"""``detector breaker`` without Kafka: whose breaker a manual change is for, and the change it makes."""

from __future__ import annotations

import math

import pytest

from detector.breaker_cli import OwnerNeeded, manual_change, resolve_owner
from detector.breakers import change_key, make_change, parse_entity
from detector.events import BreakerChange, BreakerState
from tests.conftest import T0

AGENT = parse_entity("agent:assistant")


def opened(entity: str, owner: str) -> BreakerChange:
    return make_change(
        parse_entity(entity), owner=owner, state=BreakerState.OPEN, previous=None, at=T0, reason="loop", actor="ana"
    )


def on_topic(*changes: BreakerChange) -> dict[str, BreakerChange]:
    return {change_key(c): c for c in changes}


def test_an_agent_needs_its_team_unless_one_team_alone_has_a_breaker_on_it() -> None:
    with pytest.raises(OwnerNeeded, match="--owner TEAM"):
        resolve_owner(AGENT, None, {})
    assert resolve_owner(AGENT, None, on_topic(opened("agent:assistant", "search"))) == "search"
    both = on_topic(opened("agent:assistant", "search"), opened("agent:assistant", "ads"))
    with pytest.raises(OwnerNeeded, match="ads, search"):
        resolve_owner(AGENT, None, both)
    assert resolve_owner(AGENT, "ads", both) == "ads"


def test_a_team_owns_itself_and_an_unseen_api_key_has_an_unknown_owner() -> None:
    assert resolve_owner(parse_entity("team:search"), None, {}) == "search"
    assert resolve_owner(parse_entity("api_key:k-1"), None, {}) == "unknown"
    assert resolve_owner(parse_entity("api_key:k-1"), None, on_topic(opened("api_key:k-1", "search"))) == "search"


def test_a_change_on_top_of_another_teams_breaker_is_refused() -> None:
    current = opened("agent:assistant", "search")
    with pytest.raises(ValueError, match="is not"):
        manual_change(current, AGENT, "close", at=T0 + 1, reason="fixed", actor="bob", owner="ads")
    closed = manual_change(current, AGENT, "close", at=T0 + 1, reason="fixed", actor="bob", owner="search")
    assert (closed.state, closed.owner, closed.version) == (BreakerState.CLOSED, "search", current.version + 1)
    reopened = manual_change(None, AGENT, "open", at=T0 + 2, reason="x", actor="bob", owner="ads", ttl=math.inf)
    assert reopened.expires_at is None and change_key(reopened) == "agent:ads/assistant"


def test_a_closed_breaker_of_another_team_says_nothing_of_whose_agent_it_is() -> None:
    old = opened("agent:assistant", "ads")
    closed = manual_change(old, AGENT, "close", at=T0 + 60, reason="fixed", actor="bob", owner="ads")
    with pytest.raises(OwnerNeeded, match="teams with a closed breaker on it: ads"):
        resolve_owner(AGENT, None, on_topic(closed), opening=True)
    assert resolve_owner(AGENT, None, on_topic(closed)) == "ads"  # a close of it: a no-op, not an error
    both = on_topic(closed, opened("agent:assistant", "search"))
    assert resolve_owner(AGENT, None, both) == "search"  # the one that is refusing
    key = manual_change(
        opened("api_key:k-1", "search"),
        parse_entity("api_key:k-1"),
        "close",
        at=T0 + 1,
        reason="x",
        actor="bob",
        owner="search",
    )
    assert resolve_owner(parse_entity("api_key:k-1"), None, on_topic(key)) == "search"  # a key's owner stays known


@pytest.mark.parametrize("blank", ["", "  "])
def test_a_blank_owner_is_refused(blank: str) -> None:
    with pytest.raises(OwnerNeeded, match="must name a team"):
        resolve_owner(AGENT, blank, {})
