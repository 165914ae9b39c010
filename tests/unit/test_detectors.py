"""Each detector on hand-built traffic: the incident it must catch, the look-alike it must not."""

from __future__ import annotations

import math
import random
from collections.abc import Iterable

from detector.detectors.agent_loop import AgentLoop
from detector.detectors.base import Detector, Finding, store_key
from detector.detectors.budget_burn import BudgetBurn
from detector.detectors.cost_spike import CostSpike
from detector.detectors.retry_storm import RetryStorm
from detector.events import UsageEvent
from detector.pricing import PriceCatalog
from tests.conftest import T0, make_event

CATALOG = PriceCatalog.default()
HOUR = 3600.0


def drive(det: Detector, events: Iterable[UsageEvent]) -> list[Finding]:
    """Observe events in order, judging at each interval boundary of event time like the engine."""
    findings: list[Finding] = []
    due = next_evict = -math.inf
    for ev in events:
        ts = ev.timestamp.timestamp()
        if due == -math.inf:
            due, next_evict = (ts // det.interval + 1) * det.interval, ts + 300
        while ts >= due:
            findings.extend(det.evaluate(due))
            if due >= next_evict:
                det.evict(due)
                next_evict = due + 300
            due += det.interval
        cost = ev.cost_usd if ev.cost_usd is not None else CATALOG.cost(ev.model, ev.input_tokens, ev.output_tokens)
        det.observe(ev, ts, cost)
    return findings


def traffic(start: float, seconds: float, rate: float, seed: int = 1, **fields: object) -> list[UsageEvent]:
    """Poisson arrivals at ``rate`` per second with lognormal request sizes."""
    rng = random.Random(seed)
    out, t = [], start
    while True:
        t += rng.expovariate(rate)
        if t >= start + seconds:
            return out
        f = {"input_tokens": int(rng.lognormvariate(7, 0.5)), "output_tokens": int(rng.lognormvariate(5, 0.5))}
        f.update(fields)  # type: ignore[arg-type]
        out.append(make_event(t, **f))


def merged(*streams: list[UsageEvent]) -> list[UsageEvent]:
    return sorted((e for s in streams for e in s), key=lambda e: e.timestamp)


def first_at(findings: list[Finding], kind_metric: str | None = None) -> float | None:
    hits = [f.at for f in findings if kind_metric is None or f.evidence.metric == kind_metric]
    return min(hits) if hits else None


# -- cost_spike --------------------------------------------------------------------------------


def test_premium_model_switch_is_caught_within_minutes() -> None:
    normal = traffic(T0, 2 * HOUR, 1.0)
    switch = traffic(T0 + 2 * HOUR, 20 * 60, 1.0, seed=2, model="o3")
    findings = drive(CostSpike(), merged(normal, switch))
    at = first_at(findings)
    assert at is not None and at - (T0 + 2 * HOUR) <= 180
    assert all(f.at >= T0 + 2 * HOUR for f in findings)
    assert {f.entity.type for f in findings} == {"api_key"}
    assert max(f.evidence.ratio for f in findings) >= 8  # o3 costs ~13x gpt-4o-mini per request
    assert findings[0].contributors and findings[0].contributors[0].entity.id == "o3"


def test_prompt_blowup_is_caught() -> None:
    normal = traffic(T0, 2 * HOUR, 1.0)
    blown = [
        make_event(e.timestamp.timestamp(), input_tokens=e.input_tokens * 10, output_tokens=e.output_tokens)
        for e in traffic(T0 + 2 * HOUR, 20 * 60, 1.0, seed=3)
    ]
    findings = drive(CostSpike(), merged(normal, blown))
    at = first_at(findings)
    assert at is not None and at - (T0 + 2 * HOUR) <= 180


def test_one_giant_request_is_not_a_spike() -> None:
    normal = traffic(T0, 3 * HOUR, 1.0)
    giant = [make_event(T0 + 2 * HOUR, input_tokens=100_000, output_tokens=4000, model="gpt-4o")]
    assert drive(CostSpike(), merged(normal, giant)) == []


def test_steady_traffic_over_two_days_is_quiet() -> None:
    assert drive(CostSpike(), traffic(T0, 50 * HOUR, 0.3)) == []


def test_fast_ramp_is_caught_after_the_learning_day() -> None:
    base = traffic(T0, 28 * HOUR, 0.3)
    ramp_start = T0 + 28 * HOUR
    ramp = []
    for k in range(6):  # the rate doubles every 30 minutes
        ramp += traffic(ramp_start + k * 1800, 1800, 0.3 * 2 ** (k + 1), seed=10 + k)
    findings = drive(CostSpike(), merged(base, ramp))
    at = first_at(findings, "usd_per_minute")
    assert at is not None and ramp_start < at <= ramp_start + 3 * HOUR
    assert all(f.at > ramp_start for f in findings)


def test_nightly_batch_that_recurs_is_learned_not_flagged() -> None:
    days = 3
    base = traffic(T0, days * 24 * HOUR, 0.2)
    batches = []
    for d in range(days):
        start = T0 + d * 24 * HOUR + 18 * HOUR  # 02:00 UTC next morning
        batches += traffic(start, 50 * 60, 3.0, seed=100 + d, api_key_id="key-1")
    findings = drive(CostSpike(), merged(base, batches))
    late = [f for f in findings if f.at > T0 + 30 * HOUR]  # once a day of history exists
    assert late == []


# -- retry_storm -------------------------------------------------------------------------------


def _storm(start: float, seconds: float, per_second: float) -> list[UsageEvent]:
    out, t, attempt = [], start, 1
    while t < start + seconds:
        out.append(make_event(t, status="error", http_status=500, output_tokens=0, cost_usd=0.0, retry_attempt=attempt))
        attempt = attempt + 1 if attempt < 30 else 1
        t += 1 / per_second
    return out


def test_full_retry_storm_is_caught_within_30_seconds() -> None:
    normal = traffic(T0, HOUR, 0.5)
    start = T0 + HOUR - 600
    findings = drive(RetryStorm(), merged(normal, _storm(start, 300, 8.0)))
    at = first_at(findings)
    assert at is not None and at - start <= 30
    assert {f.entity.type for f in findings} == {"api_key"}
    assert findings[0].evidence.details["failure_share"] >= 0.5


def test_partial_storm_with_billed_successes_is_caught() -> None:
    normal = traffic(T0, HOUR, 0.5)
    start = T0 + 30 * 60
    rng = random.Random(4)
    partial = []
    t, attempt = start, 0
    while t < start + 600:
        failed = rng.random() < 0.65
        partial.append(
            make_event(t, status="error" if failed else "ok", retry_attempt=attempt, output_tokens=0 if failed else 200)
        )
        attempt = attempt + 1 if failed else 0
        t += 0.4
    findings = drive(RetryStorm(), merged(normal, partial))
    at = first_at(findings)
    assert at is not None and at - start <= 150


def test_provider_429_blip_with_backoff_is_quiet() -> None:
    rng = random.Random(5)
    events = traffic(T0, HOUR, 1.0)
    blip_start = T0 + 30 * 60
    retries = []
    for e in events:
        t = e.timestamp.timestamp()
        if blip_start <= t < blip_start + 60 and rng.random() < 0.5:
            delay = 0.0
            for attempt in range(1, 5):  # exponential backoff with jitter, then success
                delay += 2 ** (attempt - 1) * (1 + rng.random() * 0.2)
                ok = attempt == 4 or rng.random() < 0.5
                retries.append(make_event(t + delay, status="ok" if ok else "rate_limited", retry_attempt=attempt))
                if ok:
                    break
    assert drive(RetryStorm(), merged(events, retries)) == []


# -- agent_loop --------------------------------------------------------------------------------


def _session(
    sid: str, start: float, fingerprints: list[str], outputs: list[int], gaps: list[float], agent: str = "triage"
) -> list[UsageEvent]:
    out, t = [], start
    for fp, tokens, gap in zip(fingerprints, outputs, gaps, strict=True):
        t += gap
        out.append(make_event(t, session_id=sid, agent_id=agent, request_fingerprint=fp, output_tokens=tokens))
    return out


def _normal_sessions(n: int, start: float, seed: int = 7) -> list[UsageEvent]:
    rng = random.Random(seed)
    out: list[UsageEvent] = []
    for i in range(n):
        steps = rng.randint(5, 15)
        out += _session(
            f"normal-{i}",
            start + i * 120,
            [f"fp-{i}-{k}" for k in range(steps)],
            [rng.randint(50, 800) for _ in range(steps)],
            [rng.uniform(2, 12) for _ in range(steps)],
        )
    return out


def test_fingerprint_cycle_is_caught_within_a_minute() -> None:
    steps = 40
    fps = ["plan", "read"] + ["search", "open", "summarise"] * steps
    loop = _session("loopy", T0, fps[:steps], [100 + 7 * k for k in range(steps)], [4.0] * steps)
    findings = drive(AgentLoop(), loop)
    assert findings and findings[0].entity.id == "loopy"
    assert findings[0].evidence.metric == "cycle_period" and findings[0].evidence.observed == 3.0
    cycle_start = loop[2].timestamp.timestamp()
    assert findings[0].at - cycle_start <= 60


def test_no_progress_run_is_caught() -> None:
    steps = 60
    loop = _session(
        "stuck",
        T0,
        [f"fresh-{k}" for k in range(steps)],
        [400 + (k % 3) for k in range(steps)],
        [5.0 + (k % 2) * 0.3 for k in range(steps)],
    )
    findings = drive(AgentLoop(), loop)
    assert findings and findings[0].evidence.metric == "steady_steps"


def test_runaway_session_is_caught_once_the_agent_is_known() -> None:
    rng = random.Random(8)
    history = _normal_sessions(60, T0)
    start = T0 + 60 * 120 + 1200
    steps = 150
    runaway = _session(
        "runaway",
        start,
        [f"r-{k}" for k in range(steps)],
        [rng.randint(50, 900) for _ in range(steps)],
        [rng.uniform(2, 12) for _ in range(steps)],
    )
    findings = drive(AgentLoop(), merged(history, runaway))
    assert [f.entity.id for f in findings][:1] == ["runaway"]
    assert findings[0].evidence.metric == "session_steps"


def test_long_but_varied_session_is_quiet() -> None:
    rng = random.Random(9)
    history = _normal_sessions(60, T0)
    start = T0 + 60 * 120 + 1200
    steps = 35  # about 3x typical, below the runaway bar
    long = _session(
        "long",
        start,
        [f"l-{k}" for k in range(steps)],
        [rng.randint(50, 900) for _ in range(steps)],
        [rng.uniform(2, 20) for _ in range(steps)],
    )
    assert drive(AgentLoop(), merged(history, long)) == []


def test_sessions_are_forgotten_when_idle() -> None:
    det = AgentLoop(session_idle=60.0)
    drive(det, _normal_sessions(50, T0))
    det.evict(T0 + 50 * 120 + 3600)
    assert len(det.sessions) == 0
    norms = det.norms.peek(store_key("agent", "search", "triage"))  # an agent's norms are its team's
    assert norms is not None and norms.sessions == 50


# -- budget_burn -------------------------------------------------------------------------------


def test_budget_burn_critical_on_fast_burn_and_quiet_on_fair_spend() -> None:
    fair = 3000.0 / 30 / 24 / 60  # dollars a minute that spend exactly the budget by month end
    det = BudgetBurn(budgets={"search": 3000.0})
    events = [make_event(T0 + 60 * m, cost_usd=fair * 0.8) for m in range(6 * 60)]
    assert drive(det, events) == []
    burst = [make_event(T0 + 6 * HOUR + 60 * m, cost_usd=fair * 30) for m in range(70)]
    findings = drive(det, burst)
    assert findings and findings[-1].severity.value == "critical"
    assert findings[-1].evidence.details["burn_rate_1h"] >= 14.4


def test_budget_burn_starts_month_to_date_again_when_the_month_turns_in_the_engine() -> None:
    """The engine ticks at the minute before each event, so the month must turn by time, not by slot."""
    from datetime import UTC, datetime

    from detector.engine import Engine
    from detector.settings import Settings

    settings = Settings.model_validate({"teams": {"search": {"monthly_budget_usd": 3000, "spent_to_date_usd": 2900}}})
    start = datetime(2026, 10, 31, 12, tzinfo=UTC).timestamp()
    for every in (20.0, 90.0):
        engine = Engine.from_settings(settings)
        (burn,) = [d for d in engine.detectors if isinstance(d, BudgetBurn)]
        for i in range(int(24 * HOUR / every)):  # noon on the 31st to noon on the 1st, $0.05 a call
            engine.process(make_event(start + i * every, cost_usd=0.05))
        st = burn.teams["search"]
        assert st.month == (2026, 11)
        assert abs(st.month_to_date - 12 * HOUR / every * 0.05) < 1e-6, "November's spend only"


def test_requests_sent_in_parallel_at_one_timestamp_are_no_loop() -> None:
    """A map step fans out distinct requests with one (second-resolution) timestamp: no steady pace."""
    from detector.engine import Engine

    engine = Engine.default()
    fanned = [
        make_event(T0, agent_id="mapper", session_id="s1", request_fingerprint=f"chunk-{i}", output_tokens=256)
        for i in range(10)
    ]
    alerts = [a for ev in fanned for a in engine.process(ev)] + engine.advance(T0 + 60)
    assert alerts == []


def test_a_session_that_gets_out_of_its_loop_stops_being_reported() -> None:
    """Five identical polls, then an hour of progress: one incident that resolves, not updates for an hour."""
    from detector.engine import Engine

    engine = Engine.default()
    steps = ["poll"] * 5 + [f"step-{i}" for i in range(1200)]
    alerts = []
    for i, fp in enumerate(steps):
        ev = make_event(
            T0 + 3 * i, agent_id="worker", session_id="s1", request_fingerprint=fp, output_tokens=50 + 37 * i % 300
        )
        alerts += engine.process(ev)
    alerts += engine.advance(T0 + 3 * len(steps) + 1000)
    assert [a.status.value for a in alerts] == ["firing", "resolved"]
    assert alerts[1].detected_at.timestamp() < T0 + 15 * 60, "resolved within minutes of the last repeat"


def test_a_storm_under_an_agent_name_two_teams_share_pages_the_team_that_storms() -> None:
    """Agent ids are names teams choose: 'assistant' in alpha and in beta. One old failure in alpha made
    alpha the owner of beta's storm (found in review)."""
    from detector.engine import Engine

    engine = Engine.default()
    events = []
    for i in range(1800):
        events.append(make_event(T0 + 2 * i, team="alpha", api_key_id="ka", agent_id="assistant"))
        events.append(make_event(T0 + 2 * i + 1, team="beta", api_key_id="kb", agent_id="assistant"))
    events.append(make_event(T0 + 3601, team="alpha", api_key_id="ka", agent_id="assistant", status="error"))
    events += [
        make_event(
            T0 + 3610 + 0.1 * i,
            team="beta",
            api_key_id="kb",
            agent_id="assistant",
            status="rate_limited",
            retry_attempt=i % 40 + 1,
        )
        for i in range(600)
    ]
    alerts = [a for ev in sorted(events, key=lambda e: e.timestamp) for a in engine.process(ev)]
    assert alerts and {a.owner for a in alerts} == {"beta"}


def test_agents_and_sessions_of_two_teams_under_one_name_are_two() -> None:
    """'assistant' in alpha and in beta, session '1' in each: their state, norms and alerts stay apart."""
    from detector.engine import Engine

    engine = Engine.default()
    events = []
    for team in ("alpha", "beta"):  # each team's session "1" of agent "assistant": a loop in beta only
        fps = ["plan", "read"] + (
            ["search", "open", "summarise"] * 6 if team == "beta" else [f"s{i}" for i in range(18)]
        )
        events += [
            make_event(
                T0 + 4.0 * i + (team == "beta"),
                team=team,
                api_key_id=f"k-{team}",
                agent_id="assistant",
                session_id="1",
                request_fingerprint=fp,
                output_tokens=50 + 97 * i % 400,  # varied output: no "steady" run
            )
            for i, fp in enumerate(fps)
        ]
    alerts = [a for ev in sorted(events, key=lambda e: e.timestamp) for a in engine.process(ev)]
    alerts += engine.advance(T0 + 200)
    loops = [a for a in alerts if a.kind.value == "agent_loop"]
    assert loops and {(a.owner, a.entity.id) for a in loops} == {("beta", "1")}, "alpha's session 1 made progress"
    (loop,) = [d for d in engine.detectors if isinstance(d, AgentLoop)]
    assert sorted(loop.sessions) == [store_key("session", "alpha", "1"), store_key("session", "beta", "1")]


def test_a_snapshot_from_before_team_scoping_keeps_keys_and_relearns_agents() -> None:
    import pickle

    old = RetryStorm()
    old._stores["api_key"].get("k1", T0)
    old._stores["agent"].get("assistant", T0)  # keyed by the bare name, as before
    new = RetryStorm()
    new.adopt(pickle.loads(pickle.dumps(old)))
    assert list(new._stores["api_key"]) == ["k1"] and list(new._stores["agent"]) == []


def test_a_cost_spike_snapshot_from_before_team_scoping_leaves_no_orphan_owners() -> None:
    import pickle

    old = CostSpike(entity_types=("api_key", "agent"))
    old.observe(make_event(T0, api_key_id="k1", agent_id="assistant"), T0, 0.01)
    old._stores["agent"].drop(lambda key: True)  # put back the keys of before: a bare agent name
    old._stores["agent"].get("assistant", T0)
    old._teams[("agent", "assistant")] = "search"
    old._dirty.append(("agent", "assistant", old._stores["agent"].peek("assistant")))
    new = CostSpike(entity_types=("api_key", "agent"))
    new.adopt(pickle.loads(pickle.dumps(old)))
    assert set(new._teams) == {("api_key", "k1")} and [d[:2] for d in new._dirty] == [("api_key", "k1")]
    assert new.evaluate(T0 + 60) == []
