"""The dashboard's read model: what it keeps, how it bounds it, and when it tells listeners."""

from __future__ import annotations

import asyncio
import threading
from datetime import timedelta
from typing import Any

import pytest

from detector.engine import Engine
from detector.events import (
    Alert,
    BreakerChange,
    BreakerState,
    Entity,
    FeedbackLabel,
    IncidentFeedback,
    utc_from_epoch,
)
from detector.replay import replay
from detector.web.control import BreakerRequest, LocalBreakerControl
from detector.web.feed import Feed, event_cost, replay_into
from detector.web.view import OTHER, LiveView, ViewLimits, reason_class
from tests.conftest import T0, make_event


def make_alert(
    incident_id: str = "inc-1",
    sequence: int = 0,
    status: str = "firing",
    severity: str = "warning",
    kind: str = "retry_storm",
    entity: str = "api_key:key-1",
    at: float = T0,
    rate: float = 12.5,
    excess: float = 3.0,
    **extra: Any,
) -> Alert:
    type_, _, id_ = entity.partition(":")
    return Alert.model_validate(
        {
            "alert_id": f"{incident_id}-{sequence}",
            "incident_id": incident_id,
            "sequence": sequence,
            "kind": kind,
            "status": status,
            "severity": severity,
            "entity": {"type": type_, "id": id_},
            "owner": "search",
            "detected_at": utc_from_epoch(at),
            "started_at": utc_from_epoch(at - 60),
            "resolved_at": utc_from_epoch(at) if status == "resolved" else None,
            "evidence": {
                "metric": "attempts_per_minute",
                "baseline": 2,
                "observed": 30,
                "ratio": 15,
                "window_seconds": 60,
            },
            "explanation": {"summary": f"{entity} is retrying failing calls"},
            "cost_rate_usd_per_hour": rate,
            "excess_cost_usd": excess,
            "recommended_action": "open the breaker",
            "detector": {"name": kind, "version": "1"},
            **extra,
        }
    )


def make_change(
    entity: str, state: str, version: int, at: float = T0, previous: str = "closed", owner: str = "search"
) -> BreakerChange:
    type_, _, id_ = entity.partition(":")
    return BreakerChange.model_validate(
        {
            "change_id": f"{entity}-{owner}-{version}",
            "entity": {"type": type_, "id": id_},
            "owner": owner,
            "state": state,
            "previous_state": previous,
            "version": version,
            "changed_at": utc_from_epoch(at),
            "reason": "test",
            "actor": "tester",
        }
    )


# -- spend ------------------------------------------------------------------------------------


def test_spend_is_summed_per_team_per_step_in_event_time() -> None:
    view = LiveView()
    view.observe_event(make_event(T0 + 10, team="search"), 1.0)
    view.observe_event(make_event(T0 + 50, team="search"), 2.0)
    view.observe_event(make_event(T0 + 70, team="ads"), 4.0)
    view.observe_event(make_event(T0 + 130, team="search"), 8.0)
    series = view.spend_series(range_seconds=180, step_seconds=60)
    assert series["step_seconds"] == 60 and series["points"] == 3
    assert series["start_epoch"] == T0  # three whole minutes ending with the newest one
    by_team = {s["team"]: s["values"] for s in series["series"]}
    assert by_team == {"search": [3.0, 0.0, 8.0], "ads": [0.0, 4.0, 0.0]}
    assert series["total"] == [3.0, 4.0, 8.0]
    assert [s["team"] for s in series["series"]] == ["search", "ads"]  # biggest first


def test_chart_keeps_the_biggest_teams_and_sums_the_rest() -> None:
    view = LiveView(ViewLimits(max_chart_teams=2))
    for i, team in enumerate(["a", "b", "c", "d"]):
        view.observe_event(make_event(T0 + i, team=team), float(10 - i))
    series = view.spend_series(600, 300)["series"]
    assert [(s["team"], s["total_usd"]) for s in series] == [("a", 10.0), ("b", 9.0), (OTHER, 15.0)]


def test_team_names_from_events_are_bounded_per_minute_and_their_spend_kept() -> None:
    """Team names come from events: a flood of new ones must not grow the chart's memory (or its cost)."""
    view = LiveView(ViewLimits(max_chart_teams=2, max_teams_per_minute=50))
    view.observe_event(make_event(T0, team="search"), 100.0)
    for i in range(5_000):
        view.observe_event(make_event(T0 + i / 1000, team=f"flood-{i}"), 0.01)
    assert max(len(b.teams) for b in view._buckets.values()) <= 51, "50 names and (other)"
    series = view.spend_series(600, 300)["series"]
    assert series[0]["team"] == "search" and [s["team"] for s in series].count(OTHER) == 1
    assert sum(s["total_usd"] for s in series) == pytest.approx(150.0)


def test_spend_older_than_the_window_is_forgotten_and_memory_stays_bounded() -> None:
    view = LiveView(ViewLimits(spend_window_seconds=3600, top_window_seconds=600))
    for minute in range(6 * 60):  # six hours, one event a minute
        view.observe_event(make_event(T0 + minute * 60, team="search", user=f"u{minute}"), 1.0)
    assert len(view._buckets) <= 60
    detailed = [b for b in view._buckets.values() if b.by_type is not None]
    assert len(detailed) <= 10  # per-entity detail only for the top window
    series = view.spend_series(6 * 3600, 3600)
    assert sum(series["total"]) == pytest.approx(60.0)  # only the last hour is remembered
    # A late event older than the window changes totals but not the chart.
    view.observe_event(make_event(T0, team="search"), 5.0)
    assert sum(view.spend_series(6 * 3600, 3600)["total"]) == pytest.approx(60.0)
    assert view.totals()["spend_usd"] == pytest.approx(365.0)


def test_a_jump_in_event_time_forgets_what_is_out_of_the_window() -> None:
    view = LiveView(ViewLimits(spend_window_seconds=3600, top_window_seconds=600))
    view.observe_event(make_event(T0, team="search"), 1.0)
    view.observe_event(make_event(T0 + 10 * 86400, team="search"), 2.0)
    assert list(view._buckets) == [int((T0 + 10 * 86400) // 60)]
    assert view.top_spenders()["api_key"] == [{"id": "key-1", "owner": "search", "spend_usd": 2.0, "share": 1.0}]


def test_top_spenders_cover_the_recent_window_per_key_user_agent_and_model() -> None:
    view = LiveView(ViewLimits(top_window_seconds=600))
    view.observe_event(make_event(T0, api_key_id="old", user="u-old"), 100.0)  # falls out of the window
    t = T0 + 3600
    view.observe_event(make_event(t, api_key_id="k1", user="ann", agent_id="bot", model="gpt-4o"), 3.0)
    view.observe_event(make_event(t + 60, api_key_id="k2", user="bob", model="gpt-4o-mini"), 1.0)
    view.observe_event(make_event(t + 120, api_key_id="k1", user="bob", model="gpt-4o"), 1.0)
    top = view.top_spenders(n=5)
    assert [(r["id"], r["spend_usd"], r["share"]) for r in top["api_key"]] == [("k1", 4.0, 0.8), ("k2", 1.0, 0.2)]
    assert [(r["id"], r["spend_usd"]) for r in top["user"]] == [("ann", 3.0), ("bob", 2.0)]
    assert [(r["id"], r["owner"]) for r in top["agent"]] == [("bot", "search")]
    assert [(r["id"], r["owner"]) for r in top["model"]] == [("gpt-4o", None), ("gpt-4o-mini", None)]
    assert view.top_spenders(n=1)["api_key"][0]["id"] == "k1"


# -- entities ---------------------------------------------------------------------------------


def test_entity_summary_has_spend_errors_models_incidents_and_breaker() -> None:
    view = LiveView()
    view.observe_event(make_event(T0, session_id="s1", model="gpt-4o"), 2.0)
    view.observe_event(make_event(T0 + 5, session_id="s1", model="o3", status="error", retry_attempt=1), 1.0)
    view.observe_alert(make_alert(entity="session:s1"))
    view.observe_breaker(make_change("session:s1", "open", 1))
    s = view.entity("session", "s1")
    assert s is not None
    assert (s["owner"], s["events"], s["errors"], s["retries"], s["spend_usd"]) == ("search", 2, 1, 1, 3.0)
    assert s["breakdown_by"] == "model"
    assert [(b["name"], b["spend_usd"]) for b in s["breakdown"]] == [("gpt-4o", 2.0), ("o3", 1.0)]
    assert [i["incident_id"] for i in s["incidents"]] == ["inc-1"]
    assert s["breaker"]["state"] == "open"
    model = view.entity("model", "gpt-4o")
    assert model is not None and model["breakdown_by"] == "team" and model["spend_last_window_usd"] == 2.0
    team = view.entity("team", "search")
    assert team is not None and sum(team["spend_series"]["total"]) == 3.0
    assert view.entity("session", "nope") is None
    assert view.entity("planet", "earth") is None


def test_users_agents_and_sessions_are_each_teams_own() -> None:
    view = LiveView()
    for i in range(10):  # two teams name their agent "assistant" and a session "1"; search spends more
        view.observe_event(make_event(T0 + i, team="search", agent_id="assistant", session_id="1", user="ann"), 2.0)
        view.observe_event(make_event(T0 + i, team="ads", agent_id="assistant", session_id="1", model="o3"), 0.5)
    view.observe_alert(make_alert("inc-ads", kind="agent_loop", entity="agent:assistant", owner="ads"))
    view.observe_breaker(make_change("agent:assistant", "open", 1, owner="ads"))
    ads = view.entity("agent", "assistant", "ads")
    assert ads is not None
    assert (ads["owner"], ads["events"], ads["spend_usd"], ads["teams"]) == ("ads", 10, 5.0, ["ads", "search"])
    assert [b["name"] for b in ads["breakdown"]] == ["o3"]
    assert [i["incident_id"] for i in ads["incidents"]] == ["inc-ads"] and ads["breaker"]["owner"] == "ads"
    assert ads["spend_last_window_usd"] == 5.0
    search = view.entity("agent", "assistant")  # no team: the one that spent most on it
    assert search is not None and (search["owner"], search["spend_usd"]) == ("search", 20.0)
    assert search["incidents"] == [] and search["breaker"] is None  # ads' loop and breaker are not search's
    assert view.entity("session", "1", "search")["events"] == 10  # type: ignore[index]
    assert view.entity("agent", "assistant", "billing") is None
    assert view.owner(Entity(type="agent", id="assistant")) is None  # whose? two teams have one
    assert view.owner(Entity(type="user", id="ann")) == "search"
    top = view.top_spenders(n=5)["agent"]
    assert [(r["id"], r["owner"], r["spend_usd"]) for r in top] == [
        ("assistant", "search", 20.0),
        ("assistant", "ads", 5.0),
    ]


def test_a_breaker_the_topic_no_longer_holds_leaves_the_view_unless_it_moved_on() -> None:
    view = LiveView()
    view.observe_breaker(make_change("agent:a", "open", 1, owner="search"))
    view.observe_breaker(make_change("agent:a", "open", 3, owner="ads"))
    view.drop_breaker(make_change("agent:a", "open", 1, owner="search"))
    view.drop_breaker(make_change("agent:a", "open", 2, owner="ads"))  # ads' has moved on since: kept
    assert [(b["owner"], b["state"]) for b in view.breakers()] == [("ads", "open")]


def test_an_entity_known_only_by_its_breaker_has_the_breakers_owner() -> None:
    view = LiveView()
    view.observe_breaker(make_change("agent:a9", "open", 1, owner="ads"))
    s = view.entity("agent", "a9")
    assert s is not None and (s["owner"], s["teams"], s["breaker"]["state"]) == ("ads", [], "open")
    assert s["spend_last_window_usd"] == 0.0


def test_entity_summaries_are_bounded_least_recently_seen_first() -> None:
    view = LiveView(ViewLimits(max_entities_per_type=100, max_breakdown=2))
    for i in range(1000):
        view.observe_event(make_event(T0 + i, session_id=f"s{i}", model=f"m{i % 5}"), 0.01)
    sessions = view._entities["session"]
    assert len(sessions) <= 100
    assert "search\x1fs999" in sessions and "search\x1fs0" not in sessions  # kept per team
    key = view.entity("api_key", "key-1")
    assert key is not None and [b["name"] for b in key["breakdown"]] == [OTHER, "m0", "m1"]  # by spend


# -- incidents --------------------------------------------------------------------------------


def test_latest_record_per_incident_wins_and_older_ones_are_ignored() -> None:
    view = LiveView()
    view.observe_alert(make_alert(sequence=0, rate=10.0))
    view.observe_alert(make_alert(sequence=2, status="updated", rate=30.0, at=T0 + 120))
    view.observe_alert(make_alert(sequence=1, status="updated", rate=20.0, at=T0 + 60))  # late: ignored
    (inc,) = view.incidents("active")
    assert (inc["records"], inc["status"], inc["cost_rate_usd_per_hour"]) == (3, "updated", 30.0)
    assert inc["first_detected_at"] == "2026-11-06T08:00:00Z"
    assert inc["detected_at"] == "2026-11-06T08:02:00Z"
    assert inc["summary"] == "api_key:key-1 is retrying failing calls"
    detail = view.incident("inc-1")
    assert detail is not None and [h["sequence"] for h in detail["history"]] == [0, 2]
    view.observe_alert(make_alert(sequence=3, status="resolved", at=T0 + 600))
    assert view.incidents("active") == []
    assert [i["incident_id"] for i in view.incidents("resolved")] == ["inc-1"]
    assert view.incident("unknown") is None


def test_active_incidents_are_most_severe_then_costliest_first() -> None:
    view = LiveView()
    view.observe_alert(make_alert("a", severity="warning", rate=100.0))
    view.observe_alert(make_alert("b", severity="critical", rate=1.0))
    view.observe_alert(make_alert("c", severity="critical", rate=50.0))
    view.observe_alert(make_alert("d", severity="info", rate=500.0))
    assert [i["incident_id"] for i in view.incidents("active")] == ["c", "b", "a", "d"]
    totals = view.totals()
    assert totals["active_incidents"] == 4 and totals["critical_incidents"] == 2
    assert totals["active_cost_rate_usd_per_hour"] == 651.0


def test_incidents_are_bounded_resolved_first() -> None:
    view = LiveView(ViewLimits(max_incidents=50, max_recent_resolved=10))
    for i in range(200):
        view.observe_alert(make_alert(f"r{i}", at=T0 + i))
        view.observe_alert(make_alert(f"r{i}", sequence=1, status="resolved", at=T0 + i + 1))
    resolved = view.incidents("resolved", limit=1000)
    assert len(resolved) <= 11 and resolved[0]["incident_id"] == "r199"  # newest first
    for i in range(100):
        view.observe_alert(make_alert(f"a{i}", at=T0 + 1000 + i))
    assert len(view._incidents) <= 50
    assert view.incident("a99") is not None


def test_feedback_is_shown_on_its_incident() -> None:
    view = LiveView()
    view.observe_alert(make_alert())
    view.observe_feedback(
        IncidentFeedback(
            feedback_id="f1",
            incident_id="inc-1",
            kind="retry_storm",
            entity=Entity(type="api_key", id="key-1"),
            label=FeedbackLabel.FALSE_ALARM,
            actor="ann",
            labelled_at=utc_from_epoch(T0),
            note="load test",
        )
    )
    (inc,) = view.incidents()
    assert inc["feedback"] == {
        "label": "false_alarm",
        "actor": "ann",
        "note": "load test",
        "labelled_at": "2026-11-06T08:00:00Z",
    }


# -- breakers ---------------------------------------------------------------------------------


def test_newest_breaker_version_wins() -> None:
    view = LiveView()
    view.observe_breaker(make_change("api_key:k1", "open", 5))
    view.observe_breaker(make_change("api_key:k1", "closed", 4, previous="open"))  # older: ignored
    view.observe_breaker(make_change("api_key:k1", "open", 5))  # same version again: ignored
    assert view.breaker(Entity(type="api_key", id="k1"), "search").state is BreakerState.OPEN  # type: ignore[union-attr]
    view.observe_breaker(make_change("api_key:k1", "closed", 6, previous="open"))
    view.observe_breaker(make_change("team:ads", "half_open", 2, previous="open"))
    view.observe_breaker(make_change("agent:bot", "open", 1, at=T0 - 600))
    assert [(b["entity"], b["state"]) for b in view.breakers()] == [
        ("agent:bot", "open"),
        ("team:ads", "half_open"),
        ("api_key:k1", "closed"),
    ]
    assert view.breaker_counts() == {("api_key", "closed"): 1, ("team", "half_open"): 1, ("agent", "open"): 1}
    assert view.oldest_open_breaker() == T0 - 600
    assert view.totals()["open_breakers"] == 2


def test_breakers_are_bounded_closed_first() -> None:
    view = LiveView(ViewLimits(max_breakers=20))
    view.observe_breaker(make_change("api_key:keep-open", "open", 1, at=T0 - 10_000))
    for i in range(100):
        view.observe_breaker(make_change(f"session:s{i}", "closed", 1, at=T0 + i, previous="open"))
    assert len(view._breakers) <= 20
    assert view.breaker(Entity(type="api_key", id="keep-open"), "search") is not None


def test_local_breaker_control_opens_and_closes_with_rising_versions() -> None:
    asyncio.run(_open_and_close())


async def _open_and_close() -> None:
    view = LiveView()
    view.observe_event(make_event(T0, api_key_id="k1", team="ads"), 1.0)
    control = LocalBreakerControl(view)
    entity = Entity(type="api_key", id="k1")
    (opened,) = await control(BreakerRequest(entity, "open", "storm", "ann", ttl_seconds=600, owner="ads"))
    assert opened.state is BreakerState.OPEN and opened.owner == "ads" and opened.version == int(T0)
    assert opened.expires_at == utc_from_epoch(T0) + timedelta(seconds=600)
    (closed,) = await control(BreakerRequest(entity, "close", "fixed", "ann"))
    assert closed.previous_state is BreakerState.OPEN and closed.version == opened.version + 1
    assert await control(BreakerRequest(entity, "close", "again", "ann")) == []
    (forever,) = await control(BreakerRequest(entity, "open", "x", "ann", ttl_seconds=float("inf")))
    assert forever.expires_at is None
    assert view.breaker(entity, "ads") == forever and len(control.requests) == 4


# -- rejects and notifications ----------------------------------------------------------------


def test_rejects_are_counted_by_bounded_reason_class() -> None:
    view = LiveView()
    for reason in [
        "not valid JSON: expected value at line 1 column 1",
        "input_tokens: Input should be greater than or equal to 0",
        "team: Field required",
        "team: Field required; model: Field required",
        "event: Value error, cached_input_tokens exceeds input_tokens",
        "empty message (null value)",
        "engine error: ValueError: boom",
        "no idea what happened",
    ]:
        view.observe_reject(reason)
    r = view.snapshot()["rejects"]
    assert r["total"] == 8
    assert r["by_reason"] == {
        "missing_team": 2,
        "not_json": 1,
        "invalid_input_tokens": 1,
        "invalid_event": 1,
        "empty": 1,
        "engine_error": 1,
        "other": 1,
    }
    assert r["recent"][-1] == "no idea what happened"
    assert reason_class("x" * 10_000) == "other"


def test_listeners_hear_of_incidents_at_once_and_of_events_once_per_read() -> None:
    view = LiveView()
    heard: list[str] = []
    unsubscribe = view.subscribe(heard.append)
    for i in range(100):
        view.observe_event(make_event(T0 + i), 0.1)
    view.observe_reject("not valid JSON")
    assert heard == ["spend"]  # one call, however many events
    view.snapshot()
    view.observe_event(make_event(T0 + 200), 0.1)
    view.observe_alert(make_alert())
    view.observe_breaker(make_change("api_key:k1", "open", 1))
    assert heard == ["spend", "spend", "incidents", "breakers"]
    version = view.version
    view.observe_breaker(make_change("api_key:k1", "open", 1))  # not a change
    assert view.version == version and len(heard) == 4
    unsubscribe()
    view.observe_alert(make_alert("inc-2"))
    assert len(heard) == 4


def test_feeding_from_a_thread_while_reading_is_safe() -> None:
    view = LiveView(ViewLimits(max_entities_per_type=500))
    errors: list[BaseException] = []

    def feed() -> None:
        try:
            for i in range(20_000):
                view.observe_event(make_event(T0 + i, session_id=f"s{i}", user=f"u{i % 700}"), 0.01)
                if i % 500 == 0:
                    view.observe_alert(make_alert(f"i{i}", at=T0 + i))
        except BaseException as error:  # pragma: no cover - reported below
            errors.append(error)

    thread = threading.Thread(target=feed)
    thread.start()
    for _ in range(30):  # reads interleave with the writes (a spinning reader would starve the writer)
        view.snapshot(86400)
        view.entity("user", "u1")
    thread.join()
    assert not errors
    assert view.totals()["events"] == 20_000


# -- the replay loop ----------------------------------------------------------------------------


def test_replay_into_gives_the_same_alerts_and_spend_as_the_replay() -> None:
    calm = [make_event(T0 + i * 30.0) for i in range(240)]  # two hours at a steady pace
    storm = [make_event(T0 + 7200 + i * 0.5, status="error", retry_attempt=1 + i % 5) for i in range(600)]
    lines = [ev.model_dump_json().encode() for ev in calm + storm]
    lines.insert(10, b"{broken")
    plain_engine, fed_engine = Engine.default(), Engine.default()
    expected: list[Alert] = []
    replay(lines, plain_engine, on_alert=expected.append)
    feed = Feed(LiveView())
    got: list[Alert] = []
    result = replay_into(lines, fed_engine, feed, on_alert=got.append)
    assert expected and [a.alert_id for a in got] == [a.alert_id for a in expected]
    assert (result.events, result.rejected) == (840, 1)
    totals = feed.view.totals()
    assert totals["spend_usd"] == pytest.approx(sum(plain_engine.stats.spend_by_team.values()))
    assert totals["rejected"] == 1
    assert {i["incident_id"] for i in feed.view.incidents()} == {a.incident_id for a in expected}


def test_event_cost_is_the_events_own_or_the_catalogs() -> None:
    catalog = Engine.default().catalog
    assert event_cost(make_event(T0, cost_usd=0.5), catalog) == 0.5
    priced = make_event(T0, model="gpt-4o", input_tokens=1_000_000, output_tokens=0)
    assert event_cost(priced, catalog) == pytest.approx(2.5)
