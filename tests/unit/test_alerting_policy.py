"""The alerting policy: routing, rules, breakers, silences, the ``[alerting]`` config, and a dry-run Dispatcher.

Everything here is pure (Responder) or sends nothing (a dry-run Dispatcher), so nothing is started.
Times are event time, epoch seconds from ``T0`` (2026-11-06 08:00 UTC).
"""

from __future__ import annotations

import asyncio
import math
import os
import pickle
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from detector.alerting.dispatch import Dispatcher
from detector.alerting.outbox import Outbox
from detector.alerting.policy import Decision, Responder, Route
from detector.alerting.slack import header_for
from detector.breakers import make_change
from detector.events import (
    Alert,
    BreakerChange,
    BreakerState,
    Entity,
    IncidentFeedback,
    Severity,
    utc_from_epoch,
)
from detector.settings import ConfigError, Settings, load_settings
from tests.conftest import T0

OPEN, HALF_OPEN, CLOSED = BreakerState.OPEN, BreakerState.HALF_OPEN, BreakerState.CLOSED
SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
K1 = Entity(type="api_key", id="k1")
GW = {"url": "http://127.0.0.1:9/breakers", "secret": SECRET}

CONFIG: dict[str, Any] = {
    "teams": {
        "search": {"slack_channel": "C-SEARCH", "oncall": "U-ANA", "webhooks": ["gw"]},
        "platform": {"slack_channel": "C-PLATFORM", "webhooks": ["gw", "audit"]},
        "billing": {"monthly_budget_usd": 5000},  # no channel, no webhooks
    },
    "alerting": {
        "default_owner": "platform",
        "silence_seconds": 3600,
        "rules": [
            {"kind": "retry_storm", "min_severity": "critical", "action": "trip", "breaker_ttl": "15m"},
            {"kind": "retry_storm", "min_severity": "warning", "action": "notify"},
            {"kind": "agent_loop", "min_severity": "warning", "action": "trip", "breaker_ttl": 1800},
            {"kind": "*", "min_severity": "warning", "action": "notify"},
        ],
        "webhooks": {
            "gw": GW,
            "audit": {"url": "http://127.0.0.1:9/audit", "secret": SECRET, "timeout_seconds": 2},
        },
        "breakers": {"probe_seconds": "5m", "max_ttl": "4h"},
    },
}


def settings(**alerting: Any) -> Settings:
    data = {**CONFIG, "alerting": {**CONFIG["alerting"], **alerting}}
    return Settings.model_validate(data)


def make_alert(
    *,
    kind: str = "retry_storm",
    status: str = "firing",
    severity: str = "critical",
    entity: Entity = K1,
    owner: str = "search",
    at: float = T0,
    incident: str = "inc-1",
    sequence: int = 0,
    ratio: float = 12.0,
) -> Alert:
    return Alert.model_validate(
        {
            "alert_id": f"{incident}-{sequence}",
            "incident_id": incident,
            "sequence": sequence,
            "kind": kind,
            "status": status,
            "severity": severity,
            "entity": entity.model_dump(),
            "owner": owner,
            "detected_at": utc_from_epoch(at),
            "started_at": utc_from_epoch(T0 - 30),
            "resolved_at": utc_from_epoch(at) if status == "resolved" else None,
            "evidence": {
                "metric": "attempts_per_minute",
                "baseline": 3.0,
                "observed": 3.0 * ratio,
                "ratio": ratio,
                "window_seconds": 20,
            },
            "explanation": {"summary": f"{entity} went wild."},
            "cost_rate_usd_per_hour": 120.0,
            "excess_cost_usd": 4.0,
            "recommended_action": "Stop it.",
            "detector": {"name": kind, "version": "1.0"},
        }
    )


def feedback(
    label: str, *, fid: str = "fb-1", entity: Entity = K1, kind: str = "retry_storm", **over: Any
) -> IncidentFeedback:
    base: dict[str, Any] = {
        "feedback_id": fid,
        "incident_id": "inc-1",
        "kind": kind,
        "entity": entity.model_dump(),
        "label": label,
        "actor": "ana@search",
        "labelled_at": utc_from_epoch(T0 + 120),
        **over,
    }
    return IncidentFeedback.model_validate(base)


def states(changes: list[BreakerChange]) -> list[tuple[str, str]]:
    return [(c.previous_state.value, c.state.value) for c in changes]


# -- routing and rules ---------------------------------------------------------------------------


def test_an_alert_goes_to_its_team_and_unknown_teams_to_the_default_owner() -> None:
    r = Responder(settings())
    assert r.route("search") == Route("search", "C-SEARCH", "U-ANA", ("gw",), fallback=False)
    assert r.route("billing") == Route("billing", None, None, (), fallback=False)  # known, but no channel
    assert r.route("nobody-knows") == Route("platform", "C-PLATFORM", None, ("gw", "audit"), fallback=True)
    decision = r.decide(make_alert(owner="nobody-knows", kind="cost_spike"), T0)
    assert decision.route.team == "platform" and decision.route.fallback

    # A default owner that is not configured still routes (to nobody), rather than failing.
    lone = Responder(settings(default_owner="sre"))
    assert lone.route("ghosts") == Route("sre", None, None, (), fallback=True)


def test_the_first_matching_rule_wins_by_kind_and_minimum_severity() -> None:
    r = Responder(settings())
    rules = r.alerting.rules
    assert r.rule_for(make_alert(severity="critical")) is rules[0]
    assert r.rule_for(make_alert(severity="warning")) is rules[1]  # below the trip rule's minimum
    assert r.rule_for(make_alert(severity="info")) is None  # below every rule
    assert r.rule_for(make_alert(kind="agent_loop", severity="warning")) is rules[2]
    assert r.rule_for(make_alert(kind="agent_loop", severity="critical")) is rules[2]
    assert r.rule_for(make_alert(kind="cost_spike", severity="warning")) is rules[3]  # the wildcard
    assert r.rule_for(make_alert(kind="budget_burn", severity="info")) is None
    assert rules[0].breaker_ttl == 900.0 and rules[2].breaker_ttl == 1800.0

    warning = r.decide(make_alert(severity="warning"), T0)
    assert (warning.action, warning.changes) == ("notify", [])
    assert warning.action_text == "Notify only: no breaker tripped."
    assert r.board.get(K1, "search") is None
    info = r.decide(make_alert(severity="info", incident="inc-2"), T0)
    assert (info.action, info.changes) == ("notify", [])  # no rule: notify


def test_the_default_rules_only_notify() -> None:
    r = Responder(Settings.model_validate({"teams": {"search": {"slack_channel": "C1"}}}))
    d = r.decide(make_alert(), T0)
    assert (d.action, d.changes, len(r.board)) == ("notify", [], 0)


# -- tripping ------------------------------------------------------------------------------------


@pytest.mark.parametrize("etype", ["api_key", "agent", "session", "team"])
def test_a_trip_rule_opens_the_breaker_once_and_updates_do_not_change_it(etype: str) -> None:
    entity = Entity.model_validate({"type": etype, "id": "x-1"})
    r = Responder(settings())
    first = r.decide(make_alert(entity=entity), T0)
    assert first.action == "trip"
    (c,) = first.changes
    assert states([c]) == [("closed", "open")]
    assert (c.entity, c.owner, c.incident_id, c.actor) == (entity, "search", "inc-1", "stormwatch")
    assert c.reason == f"{entity} went wild."
    assert c.changed_at.timestamp() == T0 and c.expires_at is not None and c.expires_at.timestamp() == T0 + 900
    assert first.action_text == f"Breaker opened on {entity} until 08:15 UTC (15m from now)."

    update = r.decide(make_alert(entity=entity, status="updated", sequence=1, at=T0 + 60), T0 + 60)
    assert update.action == "trip" and update.changes == []  # still open: not re-opened, not stretched
    assert update.action_text == f"Breaker opened on {entity} until 08:15 UTC (14m from now)."
    breaker = r.board.get(entity, "search")
    assert breaker is not None and breaker.state is OPEN and breaker.expires_at == T0 + 900

    resolved = r.decide(make_alert(entity=entity, status="resolved", sequence=2, at=T0 + 120), T0 + 120)
    assert resolved.action == "notify" and resolved.changes == []
    assert r.board.get(entity, "search").state is OPEN  # type: ignore[union-attr]


@pytest.mark.parametrize("etype", ["user", "model"])
def test_a_trip_rule_on_an_entity_without_a_breaker_only_notifies(etype: str) -> None:
    entity = Entity.model_validate({"type": etype, "id": "gpt-4o" if etype == "model" else "u-7"})
    r = Responder(settings())
    d = r.decide(make_alert(entity=entity), T0)
    assert d.changes == [] and d.action_text == f"Notify only: a {etype} has no breaker."
    assert len(r.board) == 0 and r.advance(T0 + 86400) == []


def test_a_resolved_record_never_trips() -> None:
    r = Responder(settings())
    d = r.decide(make_alert(status="resolved", sequence=3), T0)
    assert (d.action, d.changes, d.action_text) == ("notify", [], "Notify only: no breaker tripped.")
    assert r.board.get(K1, "search") is None


def test_breakers_move_open_half_open_closed_in_event_time() -> None:
    r = Responder(settings())
    (opened,) = r.decide(make_alert(), T0).changes
    assert r.advance(T0 + 899) == []
    (half,) = r.advance(T0 + 950)  # noticed later, dated when it was due
    assert states([half]) == [("open", "half_open")] and half.changed_at.timestamp() == T0 + 900
    assert r.decide(
        make_alert(status="updated", sequence=1, severity="warning", at=T0 + 960), T0 + 960
    ).action_text == ("Breaker on api_key:k1 is half-open: probing.")
    assert r.advance(T0 + 900 + 299) == []
    (closed,) = r.advance(T0 + 900 + 300)  # probe_seconds = 5m without a new trip
    assert states([closed]) == [("half_open", "closed")] and closed.changed_at.timestamp() == T0 + 1200
    assert opened.version < half.version < closed.version
    assert r.advance(T0 + 5000) == []
    resolved = r.decide(make_alert(status="resolved", sequence=2, at=T0 + 5000), T0 + 5000)
    assert resolved.action_text.startswith("Breaker on api_key:k1 closed again at "), "not 'no breaker tripped'"

    # A new incident trips it again from closed, with the rule's TTL.
    (again,) = r.decide(make_alert(incident="inc-2", at=T0 + 6000), T0 + 6000).changes
    assert states([again]) == [("closed", "open")]
    assert again.expires_at is not None and again.expires_at.timestamp() == T0 + 6000 + 900


def test_a_trip_while_half_open_backs_off_from_the_last_ttl() -> None:
    r = Responder(settings())
    r.decide(make_alert(), T0)
    r.advance(T0 + 900)
    (c,) = r.decide(make_alert(incident="inc-2", at=T0 + 1000), T0 + 1000).changes
    assert states([c]) == [("half_open", "open")]
    assert c.expires_at is not None and c.expires_at.timestamp() == T0 + 1000 + 1800  # twice the 15m


# -- owners' feedback ------------------------------------------------------------------------------


@pytest.mark.parametrize("label", ["false_alarm", "planned"])
def test_a_false_alarm_or_planned_label_closes_the_breaker_and_silences_the_pattern(label: str) -> None:
    r = Responder(settings())
    r.decide(make_alert(), T0)
    fb = feedback(label, note="load test")
    (closed,) = r.apply_feedback(fb, T0 + 120)
    assert states([closed]) == [("open", "closed")]
    assert closed.actor == "ana@search" and closed.changed_at.timestamp() == T0 + 120
    assert closed.reason == f"labelled {label} by ana@search: load test"
    assert r.board.get(K1, "search").state is CLOSED  # type: ignore[union-attr]

    # The same kind on the same entity: silenced for silence_seconds (3600), no breaker reopened.
    again = r.decide(make_alert(incident="inc-2", at=T0 + 600), T0 + 600)
    assert again.silenced and again.silenced_until == T0 + 120 + 3600
    assert again.changes == [] and r.board.get(K1, "search").state is CLOSED  # type: ignore[union-attr]
    # Another kind on that entity, or the same kind elsewhere: not silenced.
    other_kind = r.decide(make_alert(kind="agent_loop", incident="inc-3", at=T0 + 600), T0 + 600)
    assert not other_kind.silenced and states(other_kind.changes) == [("closed", "open")]
    k2 = Entity(type="api_key", id="k2")
    other_entity = r.decide(make_alert(entity=k2, incident="inc-4", at=T0 + 600), T0 + 600)
    assert not other_entity.silenced and states(other_entity.changes) == [("closed", "open")]

    # Idempotent by feedback_id: a repeat neither changes anything nor extends the silence.
    assert r.apply_feedback(fb, T0 + 3000) == []
    assert r.silences[("retry_storm", "api_key:k1")] == T0 + 120 + 3600

    # The silence ends; planned work trips again as before, a false alarm only past 1.5x its 12x.
    assert r.decide(make_alert(incident="inc-5", at=T0 + 3719), T0 + 3719).silenced
    r.advance(T0 + 3720)
    assert ("retry_storm", "api_key:k1") not in r.silences
    after = r.decide(make_alert(incident="inc-6", at=T0 + 3721), T0 + 3721)
    if label == "planned":
        assert not after.silenced and states(after.changes) == [("closed", "open")]
        return
    assert after.silenced and after.changes == [] and "18.0x" in after.action_text
    worse = r.decide(make_alert(incident="inc-7", at=T0 + 3722, ratio=19.0), T0 + 3722)
    assert not worse.silenced and states(worse.changes) == [("closed", "open")]
    r.advance(T0 + 120 + 30 * 86400)  # the widened tolerance lasts tolerance_seconds (30 days)
    assert r.tolerance == {}


def test_feedback_with_its_own_silence_and_on_a_closed_breaker() -> None:
    r = Responder(settings())
    assert r.apply_feedback(feedback("planned", silence_seconds=60), T0) == []  # no breaker: nothing to close
    assert r.decide(make_alert(at=T0 + 59), T0 + 59).silenced
    assert not r.decide(make_alert(incident="inc-2", at=T0 + 61), T0 + 61).silenced


@pytest.mark.parametrize("with_team", [True, False])
def test_an_agents_breaker_and_silence_are_its_teams_alone(with_team: bool) -> None:
    """Two teams each run an agent named "assistant": one's loop, label or silence is not the other's."""
    r = Responder(settings())
    assistant = Entity(type="agent", id="assistant")
    (s_open,) = r.decide(make_alert(kind="agent_loop", entity=assistant, owner="search"), T0).changes
    (a_open,) = r.decide(make_alert(kind="agent_loop", entity=assistant, owner="ads", incident="inc-2"), T0).changes
    assert (s_open.owner, a_open.owner) == ("search", "ads") and s_open.change_id != a_open.change_id
    # search labels its incident a false alarm; a label from before labels carried a team has none.
    label = feedback("false_alarm", entity=assistant, kind="agent_loop", **({"team": "search"} if with_team else {}))
    (closed,) = r.apply_feedback(label, T0 + 120)
    assert closed.owner == "search" and states([closed]) == [("open", "closed")]
    assert r.board.get(assistant, "ads").state is OPEN  # type: ignore[union-attr]
    again = {
        team: r.decide(
            make_alert(kind="agent_loop", entity=assistant, owner=team, incident=f"n-{team}", at=T0 + 600), T0 + 600
        )
        for team in ("search", "ads")
    }
    assert again["search"].silenced and not again["ads"].silenced


def test_a_real_label_changes_nothing() -> None:
    r = Responder(settings())
    r.decide(make_alert(), T0)
    assert r.apply_feedback(feedback("real"), T0 + 120) == []
    assert r.silences == {}
    assert r.board.get(K1, "search").state is OPEN  # type: ignore[union-attr]
    assert not r.decide(make_alert(status="updated", sequence=1, at=T0 + 180), T0 + 180).silenced
    assert r.apply_feedback(feedback("false_alarm"), T0 + 200) == []  # the same feedback_id: already seen
    assert r.board.get(K1, "search").state is OPEN  # type: ignore[union-attr]


# -- configuration -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("patch", "field", "says"),
    [
        (
            {"teams": {"search": {"webhooks": ["gw", "pager"]}}, "alerting": {"webhooks": {"gw": GW}}},
            "teams.search.webhooks",
            "no [alerting.webhooks.pager] (known: gw)",
        ),
        ({"alerting": {"rules": [{"kind": "retry_storm", "action": "page"}]}}, "alerting.rules.0.action", "'trip'"),
        ({"alerting": {"rules": [{"action": "trip", "breaker_ttl": "soon"}]}}, "alerting.rules.0.breaker_ttl", "soon"),
        ({"alerting": {"rules": [{"breaker_ttl": 0}]}}, "alerting.rules.0.breaker_ttl", "greater than 0"),
        ({"alerting": {"rules": [{"kind": "cost_spikes"}]}}, "alerting.rules.0.kind", "cost_spike"),
        ({"alerting": {"rules": [{"min_severity": "loud"}]}}, "alerting.rules.0.min_severity", "critical"),
        ({"alerting": {"breakers": {"probe_seconds": "-5m"}}}, "alerting.breakers.probe_seconds", "-5m"),
        ({"alerting": {"default_owner": ""}}, "alerting.default_owner", "at least 1"),
        ({"alerting": {"slack": {"tokn": "xoxb-1"}}}, "alerting.slack.tokn", "Extra inputs"),
        ({"teams": {"search": {"slack_chanel": "C1"}}}, "teams.search.slack_chanel", "Extra inputs"),
        ({"detectors": {"cost_spike": {"interval": 0}}}, "detectors.cost_spike.interval", "greater than 0"),
        ({"detectors": {"cost_spike": {"min_excess_usd_per_hour": -1}}}, "min_excess_usd_per_hour", "or equal to 0"),
        ({"detectors": {"budget_burn": {"fast_burn": "inf"}}}, "detectors.budget_burn.fast_burn", "finite number"),
    ],
)
def test_a_broken_config_is_refused_naming_the_field(patch: dict[str, Any], field: str, says: str) -> None:
    with pytest.raises(ValidationError) as refused:
        Settings.model_validate(patch)
    text = str(refused.value)
    assert field in text and says in text, text


@pytest.mark.parametrize(
    ("webhook", "field"),
    [
        ({"url": "http://127.0.0.1:9/", "secret": "hunter2"}, "alerting.webhooks.gw.secret"),
        ({"url": "http://127.0.0.1:9/", "secret": "whsec_"}, "alerting.webhooks.gw.secret"),
        ({"url": "not a url", "secret": SECRET}, "alerting.webhooks.gw.url"),
        ({"url": "http://127.0.0.1:9/", "secret": SECRET, "timeout": 3}, "alerting.webhooks.gw.timeout"),
    ],
)
def test_a_bad_webhook_receiver_is_refused_at_load_naming_the_field(webhook: dict[str, Any], field: str) -> None:
    """At start, not when the Dispatcher is built after a whole replay."""
    with pytest.raises(ValidationError) as refused:
        Settings.model_validate({"alerting": {"webhooks": {"gw": webhook}}})
    assert field in str(refused.value)


TOML = f"""
[teams.search]
slack_channel = "C-SEARCH"
oncall = "U-ANA"
webhooks = ["gw"]

[teams.billing]
monthly_budget_usd = 5000

[alerting]
default_owner = "search"
silence_seconds = 7200
outbox_path = "/var/lib/stormwatch/outbox.sqlite"

[[alerting.rules]]
kind = "retry_storm"
min_severity = "warning"
action = "trip"
breaker_ttl = "15m"

[[alerting.rules]]
kind = "*"
action = "notify"

[alerting.slack]
token = "xoxb-1"
base_url = "http://127.0.0.1:9/api/"

[alerting.webhooks.gw]
url = "http://127.0.0.1:9/breakers"
secret = "{SECRET}"

[alerting.breakers]
probe_seconds = "10m"
"""

YAML = f"""
teams:
  search:
    slack_channel: C-SEARCH
    oncall: U-ANA
    webhooks: [gw]
  billing:
    monthly_budget_usd: 5000
alerting:
  default_owner: search
  silence_seconds: 7200
  outbox_path: /var/lib/stormwatch/outbox.sqlite
  rules:
    - kind: retry_storm
      min_severity: warning
      action: trip
      breaker_ttl: 15m
    - kind: "*"
      action: notify
  slack:
    token: xoxb-1
    base_url: http://127.0.0.1:9/api/
  webhooks:
    gw:
      url: http://127.0.0.1:9/breakers
      secret: {SECRET}
  breakers:
    probe_seconds: 10m
"""


@pytest.fixture
def no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("STORMWATCH_"):
            monkeypatch.delenv(name)


@pytest.mark.usefixtures("no_env")
@pytest.mark.parametrize("suffix", [".yaml", ".yml"])
def test_a_yaml_config_loads_the_same_as_toml(tmp_path: Path, suffix: str) -> None:
    (tmp_path / "c.toml").write_text(TOML)
    (tmp_path / f"c{suffix}").write_text(YAML)
    from_toml, from_yaml = load_settings(tmp_path / "c.toml"), load_settings(tmp_path / f"c{suffix}")
    assert from_yaml.model_dump() == from_toml.model_dump()
    a = from_yaml.alerting
    assert (a.default_owner, a.silence_seconds, a.breakers.probe_seconds) == ("search", 7200.0, 600.0)
    assert [(str(r.kind), r.min_severity, r.action, r.breaker_ttl) for r in a.rules] == [
        ("retry_storm", Severity.WARNING, "trip", 900.0),
        ("*", Severity.WARNING, "notify", 900.0),
    ]
    assert a.slack.token is not None and a.slack.token.get_secret_value() == "xoxb-1"
    assert a.webhooks["gw"].secret.get_secret_value() == SECRET
    assert from_yaml.teams["search"].webhooks == ["gw"] and from_yaml.teams["billing"].slack_channel is None


@pytest.mark.usefixtures("no_env")
def test_a_yaml_config_is_validated_like_toml(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text(YAML.replace("webhooks: [gw]", "webhooks: [gw, pager]"))
    with pytest.raises(
        ConfigError, match=r"1 wrong field\n  teams\.search\.webhooks: no \[alerting\.webhooks\.pager\]"
    ):
        load_settings(tmp_path / "bad.yaml")


@pytest.mark.usefixtures("no_env")
def test_the_environment_overrides_the_alerting_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "c.toml").write_text(TOML)
    monkeypatch.setenv("STORMWATCH_ALERTING__SLACK__TOKEN", "xoxb-from-env")
    s = load_settings(tmp_path / "c.toml")
    assert s.alerting.slack.token is not None and s.alerting.slack.token.get_secret_value() == "xoxb-from-env"
    assert s.alerting.slack.base_url == "http://127.0.0.1:9/api/"  # the rest of the table stays


# -- snapshots -------------------------------------------------------------------------------------


def test_a_responder_survives_pickling_with_its_breakers_silences_and_seen_feedback() -> None:
    r = Responder(settings())
    r.decide(make_alert(), T0)  # k1 open
    k2 = Entity(type="session", id="s-2")
    r.decide(make_alert(kind="agent_loop", entity=k2, incident="inc-2"), T0 + 10)  # s-2 open
    r.apply_feedback(feedback("false_alarm", fid="fb-9"), T0 + 20)  # k1 closed and silenced
    restored: Responder = pickle.loads(pickle.dumps(r))

    def future(x: Responder) -> list[Any]:
        out: list[Any] = [x.apply_feedback(feedback("planned", fid="fb-9"), T0 + 30)]  # seen: nothing
        out.append(x.decide(make_alert(incident="inc-3", at=T0 + 40), T0 + 40))  # silenced
        out.append(x.advance(T0 + 1810 + 300))  # s-2: half-open, then closed
        # Silence over; past the false alarm's widened tolerance (1.5 x 12x): trips.
        out.append(x.decide(make_alert(incident="inc-4", at=T0 + 4000, ratio=20.0), T0 + 4000))
        return [[d.silenced_until, d.changes, d.action_text] if isinstance(d, Decision) else d for d in out]

    expected = future(r)
    assert future(restored) == expected
    assert expected[0] == [] and expected[1][0] == T0 + 20 + 3600
    assert states(expected[2]) == [("open", "half_open"), ("half_open", "closed")]
    assert states(expected[3][1]) == [("closed", "open")]


# -- the Dispatcher, dry run ---------------------------------------------------------------------


def test_a_dry_run_prints_the_slack_post_and_the_breaker_change_and_stores_nothing(tmp_path: Path) -> None:
    outbox = tmp_path / "outbox.sqlite"
    s = settings(outbox_path=str(outbox), slack={"token": "xoxb-1", "base_url": "http://127.0.0.1:9/api/"})
    lines: list[str] = []
    published: list[BreakerChange] = []

    async def publish(change: BreakerChange) -> None:
        published.append(change)

    async def scenario() -> None:
        d = Dispatcher(s, dry_run=True, echo=lines.append, publish_breaker=publish)
        assert d.outbox is None and d.slack is None and d.webhooks is None
        alert = make_alert()
        decision = await d.handle(alert, T0)
        assert states(decision.changes) == [("closed", "open")]
        assert lines == [
            f"would post to Slack C-SEARCH: {header_for(alert)} | "
            "Breaker opened on api_key:k1 until 08:15 UTC (15m from now).",
            "would publish breaker api_key:k1: closed -> open for 15m; webhooks: gw (http://127.0.0.1:9/breakers)",
        ]
        assert header_for(alert) == "🔴 FIRING · Retry storm · api_key:k1"

        lines.clear()
        unknown = make_alert(kind="agent_loop", owner="nobody", entity=Entity(type="agent", id="a-1"), incident="i2")
        await d.handle(unknown, T0 + 60)  # routed to platform: both its webhooks
        assert lines[0].startswith("would post to Slack C-PLATFORM: 🔴 FIRING · Agent loop · agent:a-1 | ")
        assert lines[1] == (
            "would publish breaker agent:nobody/a-1: closed -> open for 30m; webhooks: "
            "gw (http://127.0.0.1:9/breakers), audit (http://127.0.0.1:9/audit)"
        )

        lines.clear()
        billing = make_alert(
            owner="billing", kind="cost_spike", entity=Entity(type="team", id="billing"), incident="i3"
        )
        await d.handle(billing, T0 + 70)
        assert lines == [f"no Slack channel for team billing: {header_for(billing)}"]

        lines.clear()
        assert await d.advance(T0 + 900) != []  # k1 half-open: printed like the others
        assert lines == [
            "would publish breaker api_key:k1: open -> half_open; webhooks: gw (http://127.0.0.1:9/breakers)"
        ]

        lines.clear()
        await d.feedback(feedback("false_alarm"), T0 + 1000)
        assert lines == [
            "would publish breaker api_key:k1: half_open -> closed; webhooks: gw (http://127.0.0.1:9/breakers)"
        ]
        lines.clear()
        await d.handle(make_alert(incident="i4", at=T0 + 1100), T0 + 1100)
        assert lines == ["silenced  🔴 FIRING · Retry storm · api_key:k1 (an owner's label)"]

        assert await d.drain(timeout=1.0) == 0
        assert d.summary() == {"alerts": 4, "silenced": 1, "breaker_changes": 2, "dead_letters": 0}
        await d.close()

    asyncio.run(scenario())
    assert published == []  # a dry run publishes no breaker change
    assert not outbox.exists() and list(tmp_path.iterdir()) == []  # and stores nothing


def test_dry_run_can_come_from_the_settings(tmp_path: Path) -> None:
    lines: list[str] = []
    d = Dispatcher(settings(dry_run=True, outbox_path=str(tmp_path / "o.sqlite")), echo=lines.append)
    asyncio.run(d.handle(make_alert(severity="warning"), T0))
    assert lines == [
        f"would post to Slack C-SEARCH: {header_for(make_alert(severity='warning'))} | Notify only: no breaker tripped."
    ]
    assert d.outbox is None and list(tmp_path.iterdir()) == []
    assert math.isclose(d.responder.alerting.silence_seconds, 3600)


# -- the Dispatcher, for real (nothing is started: what it stores and publishes) --------------------


def test_a_dispatcher_publishes_breaker_changes_and_stores_each_delivery_once(tmp_path: Path) -> None:
    outbox = tmp_path / "outbox.sqlite"
    s = settings(outbox_path=str(outbox), slack={"token": "xoxb-1", "base_url": "http://127.0.0.1:9/api/"})
    published: list[BreakerChange] = []

    async def publish(change: BreakerChange) -> None:
        published.append(change)

    def pending(d: Dispatcher) -> list[tuple[str, str, str]]:
        assert d.outbox is not None
        return sorted((x.channel, x.target, x.delivery_id) for x in d.outbox.due("slack") + d.outbox.due("webhook"))

    async def run_once() -> list[tuple[str, str, str]]:
        lines: list[str] = []
        d = Dispatcher(s, publish_breaker=publish, echo=lines.append)
        await d.handle(make_alert(), T0)
        await d.handle(make_alert(status="updated", sequence=1, at=T0 + 60), T0 + 60)
        # The next alert comes after k1's TTL: the half-open change is carried out before it is decided.
        other = make_alert(kind="agent_loop", entity=Entity(type="session", id="s-9"), owner="ghosts", incident="i2")
        await d.handle(other.model_copy(update={"detected_at": utc_from_epoch(T0 + 1000)}), T0 + 1000)
        assert lines == []  # nothing printed when it sends for real
        seen = pending(d)
        await d.close()
        return seen

    first = asyncio.run(run_once())
    assert states(published) == [("closed", "open"), ("open", "half_open"), ("closed", "open")]
    assert [(str(c.entity), c.owner, c.changed_at.timestamp()) for c in published] == [
        ("api_key:k1", "search", T0),
        ("api_key:k1", "search", T0 + 900),
        ("session:s-9", "ghosts", T0 + 1000),  # the alert's team, though platform is paged
    ]
    k1_open, k1_half, s9_open = (c.change_id for c in published)
    # Slack: only the oldest record of each incident is due (one thread, in order); webhooks: per team's receivers.
    assert first == sorted(
        [
            ("slack", "C-SEARCH", "inc-1-0"),
            ("slack", "C-PLATFORM", "i2-0"),
            ("webhook", "http://127.0.0.1:9/breakers", f"{k1_open}:gw"),
            ("webhook", "http://127.0.0.1:9/breakers", f"{s9_open}:gw"),
            ("webhook", "http://127.0.0.1:9/audit", f"{s9_open}:audit"),
        ]
    )
    box = Outbox(outbox)
    assert box.pending_count() == 7  # and, waiting behind those: inc-1-1 and k1's half-open
    assert not box.put("inc-1-1", "slack", "C-SEARCH", {}) and not box.put(f"{k1_half}:gw", "webhook", "x", {})
    box.close()

    # A restart handling the same alerts again: the same changes are published (the topic is compacted and
    # versioned), but nothing new is stored for Slack or the webhooks.
    published.clear()
    assert asyncio.run(run_once()) == first
    assert len(published) == 3
    box = Outbox(outbox)
    assert box.pending_count() == 7
    box.close()


# -- what a review found: ordering against crashes, stale settings, TTL caps -----------------------


def test_a_breaker_change_is_stored_for_its_webhooks_before_it_is_published(tmp_path: Path) -> None:
    """Once published, a restart adopts the change from the topic and never makes it again: its webhook
    must already be in the outbox, or it is lost for good."""
    outbox = tmp_path / "outbox.sqlite"

    async def publish(change: BreakerChange) -> None:
        box = Outbox(outbox)
        stored = [d.delivery_id for d in box.due("webhook")]
        box.close()
        assert f"{change.change_id}:gw" in stored, "published before its webhook was stored"
        raise ConnectionError("the alerter dies here")

    async def handle() -> None:
        d = Dispatcher(settings(outbox_path=str(outbox)), publish_breaker=publish)
        try:
            await d.handle(make_alert(), T0)
        finally:
            await d.close()

    with pytest.raises(ConnectionError):
        asyncio.run(handle())


def test_a_restored_responder_takes_the_breaker_settings_of_this_run() -> None:
    old = Responder(settings(breakers={"max_ttl": "4h", "probe_seconds": "5m"}))
    restored = pickle.loads(pickle.dumps(old)).configure(settings(breakers={"max_ttl": "1h", "probe_seconds": "1m"}))
    assert (restored.board.max_ttl, restored.board.probe_seconds) == (3600.0, 60.0)


def test_a_trip_rule_longer_than_the_cap_is_refused_and_a_short_cap_works() -> None:
    with pytest.raises(ValidationError) as refused:
        settings(rules=[{"kind": "*", "action": "trip", "breaker_ttl": "8h"}])
    assert "rules[0].breaker_ttl (8h) is above breakers.max_ttl (4h)" in str(refused.value)
    short = settings(rules=[{"kind": "*", "action": "trip", "breaker_ttl": "5m"}], breakers={"max_ttl": "10m"})
    (change,) = Responder(short).decide(make_alert(), T0).changes
    assert change.expires_at is not None and change.expires_at.timestamp() == T0 + 300


def test_a_half_open_breaker_known_only_from_the_topic_backs_off_from_the_rule_ttl() -> None:
    """The responder's file was lost: compaction kept only the half-open record, not the TTL it opened for."""
    first = Responder(settings())
    first.decide(make_alert(kind="agent_loop", entity=Entity(type="session", id="s-1")), T0)
    (half_open,) = first.advance(T0 + 1800)
    assert half_open.state is HALF_OPEN
    fresh = Responder(settings())
    assert fresh.board.apply(half_open)
    again = make_alert(kind="agent_loop", entity=Entity(type="session", id="s-1"), at=T0 + 1860)
    (reopened,) = fresh.decide(again, T0 + 1860).changes
    assert reopened.expires_at is not None
    assert reopened.expires_at.timestamp() - (T0 + 1860) == 2 * 1800, "twice the rule's 30 min, as with the file"


def test_the_webhook_loop_outlives_a_failing_outbox(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A locked SQLite file (a backup, an operator's shell) must pause deliveries, not end them."""
    from detector.alerting import webhooks

    monkeypatch.setattr(webhooks, "FAILED_PASS_PAUSE_SECONDS", 0.01)

    async def scenario() -> int:
        d = Dispatcher(settings(outbox_path=str(tmp_path / "o.sqlite")))
        sender = d.webhooks
        assert sender is not None
        passes = 0
        real = sender.deliver_due

        async def locked_then_fine() -> int:
            nonlocal passes
            passes += 1
            if passes <= 3:
                raise OSError("database is locked")
            return await real()

        monkeypatch.setattr(sender, "deliver_due", locked_then_fine)
        stop = asyncio.Event()
        loop = asyncio.ensure_future(sender.run(stop))
        async with asyncio.timeout(10):
            while passes < 4 and not loop.done():  # three failed passes, then one that works
                await asyncio.sleep(0.01)
        stop.set()
        await loop  # raises if the loop died on the error
        await d.close()
        return passes

    assert asyncio.run(scenario()) == 4


def test_a_labelled_incident_still_closes_its_slack_thread_and_a_silenced_one_posts_nothing(tmp_path: Path) -> None:
    """The label silences pages, not the end of a thread already posted: its header would say FIRING for good."""
    outbox = tmp_path / "outbox.sqlite"
    s = settings(outbox_path=str(outbox), slack={"token": "xoxb-1", "base_url": "http://127.0.0.1:9/api/"})

    async def scenario() -> list[str]:
        d = Dispatcher(s, echo=lambda _: None)
        await d.handle(make_alert(), T0)
        await d.feedback(feedback("false_alarm"), T0 + 120)
        await d.handle(make_alert(status="resolved", sequence=1, at=T0 + 300), T0 + 300)
        # A new incident on the silenced pattern: silenced from its start, so nothing of it goes out.
        await d.handle(make_alert(incident="inc-2", at=T0 + 900), T0 + 900)
        await d.handle(make_alert(incident="inc-2", status="resolved", sequence=1, at=T0 + 1200), T0 + 1200)
        assert d.outbox is not None
        stored = [row[0] for row in d.outbox._query("SELECT delivery_id FROM outbox WHERE channel = 'slack'")]
        await d.close()
        return stored

    assert asyncio.run(scenario()) == ["inc-1-0", "inc-1-1"]


# -- labels and breakers from before breakers were per team ----------------------------------------

ASSISTANT = Entity(type="agent", id="assistant")


def agent_breaker(owner: str, incident_id: str | None, state: BreakerState = BreakerState.OPEN) -> BreakerChange:
    at = T0 if state is BreakerState.OPEN else T0 - 86400
    return make_change(
        ASSISTANT,
        owner=owner,
        state=state,
        previous=None,
        at=at,
        reason="loop",
        actor="stormwatch",
        incident_id=incident_id,
    )


def test_a_label_whose_team_is_unknown_silences_no_team() -> None:
    user = Entity(type="user", id="ana")
    r = Responder(settings())
    r.owners.clear()  # the incident is forgotten, and the label (an older client's) names no team
    r.apply_feedback(feedback("planned", entity=user, kind="cost_spike"), T0 + 120)
    assert r.silences == {} and r.tolerance == {}
    again = r.decide(make_alert(kind="cost_spike", entity=user, owner="search", incident="inc-2"), T0 + 200)
    assert not again.silenced


def test_a_label_closes_the_breaker_its_incident_tripped_whoever_owns_it() -> None:
    """Tripped before breakers were per team, a breaker of an unconfigured team's agent is the default owner's."""
    r = Responder(settings())
    assert r.board.apply(agent_breaker("platform", "inc-1"))
    closed = r.apply_feedback(feedback("false_alarm", entity=ASSISTANT, kind="agent_loop", team="growth"), T0 + 120)
    assert [(c.owner, c.state.value) for c in closed] == [("platform", "closed")]
    r.board.apply(agent_breaker("ads", "inc-9"))
    again = feedback("false_alarm", fid="fb-2", entity=ASSISTANT, kind="agent_loop", team="growth")
    assert r.apply_feedback(again, T0 + 130) == []  # ads' breaker is another incident's


def test_a_label_without_a_team_takes_the_team_of_the_only_breaker_still_refusing() -> None:
    r = Responder(settings())
    r.owners.clear()
    r.board.apply(agent_breaker("ads", None, BreakerState.CLOSED)), r.board.apply(agent_breaker("search", "inc-7"))
    closed = r.apply_feedback(feedback("planned", entity=ASSISTANT, kind="agent_loop"), T0 + 120)
    assert [(c.owner, c.state.value) for c in closed] == [("search", "closed")]
    assert list(r.silences) == [("agent_loop", "search\x1fagent:assistant")]
