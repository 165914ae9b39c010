"""The incident book: one incident per root cause, updated when worse, resolved when quiet."""

from __future__ import annotations

from dataclasses import replace

from detector.detectors.base import Finding
from detector.events import AlertKind, DetectorRef, Entity, Evidence, Severity
from detector.incidents import MAX_RELATED, IncidentBook

REF = DetectorRef(name="retry_storm", version="1.0")


def finding(
    at: float,
    entity: str = "k1",
    score: float = 5.0,
    severity: Severity = Severity.WARNING,
    kind: AlertKind = AlertKind.RETRY_STORM,
    group: str = "search",
) -> Finding:
    return Finding(
        kind=kind,
        entity=Entity(type="api_key", id=entity),
        team="search",
        group=group,
        at=at,
        started_at=at - 20,
        severity=severity,
        score=score,
        evidence=Evidence(
            metric="attempts_per_minute", baseline=10, observed=10 * score, ratio=score, window_seconds=20
        ),
        summary=f"storm x{score}",
        cost_rate_usd_per_hour=score,
        excess_usd_per_hour=score,
        recommended_action="open the breaker",
        detector=REF,
    )


def test_repeated_findings_make_one_incident_then_resolve_after_quiet() -> None:
    book = IncidentBook()
    alerts = []
    for k in range(40):  # a finding every 5 s for 200 s
        alerts += book.observe([finding(1000 + 5 * k)])
        alerts += book.tick(1000 + 5 * k)
    assert [a.status.value for a in alerts] == ["firing"]
    alerts = book.tick(1195 + 119)
    assert alerts == []
    (resolved,) = book.tick(1195 + 120)
    assert resolved.status.value == "resolved" and resolved.sequence == 1
    assert resolved.incident_id == book.recent[(AlertKind.RETRY_STORM, "search")].incident_id
    assert resolved.excess_cost_usd > 0


def test_worse_severity_updates_immediately_and_bigger_score_after_a_gap() -> None:
    book = IncidentBook(min_update_gap=300)
    (fire,) = book.observe([finding(0)])
    (upd,) = book.observe([finding(5, severity=Severity.CRITICAL)])
    assert upd.status.value == "updated" and upd.severity is Severity.CRITICAL and upd.sequence == 1
    assert book.observe([finding(10, score=50)]) == []  # worse, but too soon after the last record
    (again,) = book.observe([finding(400, score=50)])
    assert again.sequence == 2 and again.incident_id == fire.incident_id
    assert len({fire.alert_id, upd.alert_id, again.alert_id}) == 3


def test_a_key_and_its_agent_in_one_team_are_one_incident() -> None:
    book = IncidentBook()
    first = book.observe([finding(0, entity="k1")])
    second = book.observe([replace(finding(5), entity=Entity(type="agent", id="bot"))])
    assert len(first) == 1 and second == []
    assert book.open_entities() == {
        ("search", Entity(type="api_key", id="k1")),
        ("search", Entity(type="agent", id="bot")),
    }


def test_relapse_within_the_reopen_window_reopens_the_same_incident() -> None:
    book = IncidentBook(reopen=1800)
    (fire,) = book.observe([finding(0)])
    (resolved,) = book.tick(200)
    assert resolved.status.value == "resolved"
    (reopened,) = book.observe([finding(600)])
    assert reopened.incident_id == fire.incident_id and reopened.status.value == "updated"
    assert reopened.explanation.summary == "Back after 7 min: storm x5.0", "it says it came back, after how long"
    book.tick(800)
    book.tick(800 + 1801)
    (new,) = book.observe([finding(5000)])
    assert new.incident_id != fire.incident_id and new.status.value == "firing"


def test_incidents_in_one_team_link_to_each_other() -> None:
    book = IncidentBook()
    (storm,) = book.observe([finding(0)])
    (spike,) = book.observe([finding(10, kind=AlertKind.COST_SPIKE)])
    assert spike.related_incidents == [storm.incident_id]


def test_ids_are_deterministic() -> None:
    a = IncidentBook().observe([finding(0)])
    b = IncidentBook().observe([finding(0)])
    assert a[0].alert_id == b[0].alert_id and a[0].incident_id == b[0].incident_id


def test_links_of_a_long_open_incident_stay_bounded() -> None:
    book = IncidentBook()
    (burn,) = book.observe([finding(0, kind=AlertKind.BUDGET_BURN, group="search")])
    for i in range(30):
        book.observe([finding(10 + i, entity=f"k{i}", group=f"search/agent-{i}", kind=AlertKind.AGENT_LOOP)])
    related = book.open[(AlertKind.BUDGET_BURN, "search")].related
    assert len(related) == 20 and burn.incident_id not in related


def test_a_relapse_is_reported_at_its_severity_now_and_links_stay_bounded() -> None:
    book = IncidentBook(reopen=1800)
    book.observe([finding(0)])
    book.tick(200)
    (back,) = book.observe([finding(600, entity="k2", score=50.0, severity=Severity.CRITICAL)])
    assert back.severity is Severity.CRITICAL, "not the warning it resolved at"
    many = IncidentBook()
    alerts = [a for i in range(300) for a in many.observe([finding(i, group=f"loop-{i}")])]
    assert max(len(a.related_incidents) for a in alerts) <= MAX_RELATED
