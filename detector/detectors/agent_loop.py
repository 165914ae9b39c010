"""agent_loop: an agent session that keeps going without getting anywhere.

Judged step by step on each session (a step is a first attempt, not an SDK retry):

* **cycle**: the request fingerprints repeat with period 1, 2 or 3 for ``cycle_steps`` steps
  (the agent asks the same things again and again).
* **no progress**: fresh fingerprints, but each step's output is within a few percent of the
  last one's and the pace is steady, for ``steady_steps`` steps (a planner stuck re-planning).
* **runaway**: the session has run ``runaway_factor`` x the steps this agent's sessions
  normally take (their median), and twice their 95th percentile, both learned with river's
  P² quantile sketch from sessions that ended; or twice their 95th-percentile cost with
  most of those steps. A legitimately long session with varied steps stays quiet.

Session state is a few numbers; sessions idle for ``session_idle`` seconds end, feed their
agent's norms and are forgotten, and at most ``max_sessions`` are held.

>>> from detector.events import UsageEvent
>>> det = AgentLoop()
>>> def step(i, fp):
...     return UsageEvent(event_id=str(i), timestamp=1_700_000_000 + 3 * i, team="t", api_key_id="k",
...                       provider="openai", model="gpt-4o", operation="chat", input_tokens=900,
...                       output_tokens=50 + 37 * i % 200, status="ok", agent_id="triage",
...                       session_id="s1", request_fingerprint=fp)
>>> for i, fp in enumerate(["plan", "search", "read", "search", "read"] + ["search", "read"] * 4):
...     det.observe(step(i, fp), 1_700_000_000 + 3 * i, 0.01)
>>> [(f.entity.id, f.evidence.metric) for f in det.evaluate(1_700_000_000 + 40)]
[('s1', 'cycle_period')]
"""

from __future__ import annotations

import math
from typing import ClassVar

from river import stats

from detector.detectors.base import SEP, EntityStores, Finding, entity_id, store_key, usd
from detector.events import AlertKind, DetectorRef, Entity, Evidence, Severity, Usage
from detector.state import EntityStore

MIN_OUTPUT_TOKENS = 20  # below this, identical outputs ("ok", a label) say nothing about progress


class AgentNorms:
    """What one agent's sessions normally need: steps and dollars, 95th percentile."""

    __slots__ = ("cost_p95", "limit_steps", "limit_usd", "sessions", "steps_p50", "steps_p95")

    def __init__(self) -> None:
        self.steps_p50 = stats.Quantile(0.5)
        self.steps_p95 = stats.Quantile(0.95)
        self.cost_p95 = stats.Quantile(0.95)
        self.sessions = 0
        # Past these a session is a runaway; infinite until enough sessions were seen.
        self.limit_steps = math.inf
        self.limit_usd = math.inf

    def learn(self, steps: int, cost: float) -> None:
        self.steps_p50.update(steps)
        self.steps_p95.update(steps)
        self.cost_p95.update(cost)
        self.sessions += 1


class Session:
    __slots__ = (
        "agent",
        "api_key",
        "calm",
        "cost",
        "first",
        "fp1",
        "fp2",
        "fp3",
        "gap",
        "last",
        "last_output",
        "limit_steps",
        "limit_usd",
        "loop_cost",
        "loop_kind",
        "loop_period",
        "loop_since",
        "loop_steps",
        "looping",
        "reported",
        "run1",
        "run2",
        "run3",
        "steady",
        "steady_cost",
        "steady_since",
        "steps",
        "team",
        "user",
    )

    def __init__(self, now: float) -> None:
        self.first = self.last = now
        self.steps = 0
        self.cost = 0.0
        # The last three fingerprints, newest first.
        self.fp1: str | None = None
        self.fp2: str | None = None
        self.fp3: str | None = None
        self.run1 = self.run2 = self.run3 = 0
        self.last_output = -1
        self.gap = 0.0
        self.steady = 0
        self.steady_since = now
        self.steady_cost = 0.0
        self.calm = 0  # looping, steps in a row that repeat nothing: the session got out of its loop
        self.looping = False
        self.loop_kind = ""
        self.limit_steps = self.limit_usd = math.inf  # the agent's runaway bar when the session began
        self.loop_period = 0
        self.loop_since = math.inf
        self.loop_steps = 0
        self.loop_cost = 0.0
        self.reported = -math.inf
        self.agent: str | None = None
        self.team = self.api_key = ""
        self.user: str | None = None


class AgentLoop(EntityStores):
    """Flags looping, stalled and runaway agent sessions."""

    name: ClassVar[str] = "agent_loop"
    version: ClassVar[str] = "1.0"

    def __init__(
        self,
        cycle_steps: int = 4,
        steady_steps: int = 8,
        steady_band: float = 0.06,
        runaway_factor: float = 5.75,
        min_runaway_steps: int = 40,
        min_runaway_usd: float = 0.5,
        min_agent_sessions: int = 50,
        session_idle: float = 900.0,
        max_sessions: int = 200_000,
        agent_ttl: float = 30 * 86400.0,
        max_agents: int = 50_000,
        interval: float = 5.0,
    ) -> None:
        self.cycle_steps = cycle_steps
        self.steady_steps = steady_steps
        self.steady_band = steady_band
        self.runaway_factor = runaway_factor
        self.min_runaway_steps = min_runaway_steps
        self.min_runaway_usd = min_runaway_usd
        self.min_agent_sessions = min_agent_sessions
        self.session_idle = session_idle
        self.max_sessions = max_sessions
        self.agent_ttl = agent_ttl
        self.max_agents = max_agents
        self.interval = interval
        self._ref = DetectorRef(name=self.name, version=self.version)
        self.sessions: EntityStore[Session] = EntityStore(
            _new_session, ttl=session_idle, max_entities=max_sessions, on_evict=self._ended
        )
        # Agents are few, but a producer minting agent ids must not grow memory without end.
        self.norms: EntityStore[AgentNorms] = EntityStore(_new_norms, ttl=agent_ttl, max_entities=max_agents)
        self._stores = {"session": self.sessions, "agent": self.norms}
        self._looping: set[str] = set()

    def adopt(self, old: AgentLoop) -> None:
        self._take_stores(old)
        self._looping = {sid for sid in old._looping if SEP in sid}

    def observe(self, ev: Usage, ts: float, cost: float) -> None:
        if ev.session_id is None:
            return
        sid = f"{ev.team}{SEP}{ev.session_id}"  # store_key("session", ...): sessions are the team's
        s = self.sessions.get(sid, ts)
        s.cost += cost
        if s.looping:
            s.loop_cost += cost
        if ev.retry_attempt or ev.operation == "tool":
            return  # a step is a model call; SDK retries and tool calls ride along with it
        if s.steps == 0:
            self._first_step(s, ev)
        s.steps += 1
        gap, s.last = ts - s.last, ts
        fp = ev.request_fingerprint
        if fp is not None:
            s.run1 = s.run1 + 1 if fp == s.fp1 else 0
            s.run2 = s.run2 + 1 if fp == s.fp2 else 0
            s.run3 = s.run3 + 1 if fp == s.fp3 else 0
            s.fp1, s.fp2, s.fp3 = fp, s.fp1, s.fp2
        out = ev.output_tokens
        last_out = s.last_output
        if (
            out >= MIN_OUTPUT_TOKENS
            and abs(out - last_out) <= self.steady_band * last_out
            and gap > 0  # requests sent in parallel (one timestamp) are not a steady pace
            and 0.6 * s.gap <= gap <= 1.6 * s.gap
        ):
            s.steady += 1
            s.steady_cost += cost
        else:
            s.steady, s.steady_since, s.steady_cost = 0, ts, cost
        s.last_output, s.gap = out, gap
        cycle = self.cycle_steps
        if s.looping:
            if s.loop_kind != "runaway" and max(s.run1, s.run2, s.run3) < cycle and s.steady < self.steady_steps:
                s.calm = getattr(s, "calm", 0) + 1  # older snapshots have no calm
                if s.calm >= self.steady_steps:  # as many steps as make a loop, and none repeated: out of it
                    s.looping, s.calm = False, 0
                    return
            else:
                s.calm = 0
            s.loop_steps += 1
            self._looping.add(sid)
            return
        if (
            s.run1 >= cycle
            or s.run2 >= cycle
            or s.run3 >= cycle
            or s.steady >= self.steady_steps
            or s.steps >= s.limit_steps
            or (s.cost >= s.limit_usd and s.steps >= 0.8 * s.limit_steps)
        ):
            self._start(s)
            self._looping.add(sid)

    def _first_step(self, s: Session, ev: Usage) -> None:
        s.agent, s.team, s.api_key, s.user = ev.agent_id, ev.team, ev.api_key_id, ev.user
        norms = self.norms.peek(store_key("agent", ev.team, ev.agent_id)) if ev.agent_id is not None else None
        if norms is not None:
            s.limit_steps, s.limit_usd = norms.limit_steps, norms.limit_usd

    def _start(self, s: Session) -> None:
        cycle = self.cycle_steps
        period = 1 if s.run1 >= cycle else 2 if s.run2 >= cycle else 3 if s.run3 >= cycle else 0
        if period:
            self._start_loop(s, "cycle", period, cycle + period)
        elif s.steady >= self.steady_steps:
            self._start_loop(s, "no_progress", 0, s.steady + 1)
            s.loop_since, s.loop_cost = s.steady_since, s.steady_cost
        else:
            # Past the agent's normal steps, or its normal cost with many steps too: one giant
            # request is not a loop.
            self._start_loop(s, "runaway", 0, s.steps)
            s.loop_since, s.loop_cost = s.first, s.cost

    @staticmethod
    def _start_loop(s: Session, kind: str, period: int, steps: int) -> None:
        s.looping = True
        s.loop_kind, s.loop_period, s.loop_steps = kind, period, steps
        s.loop_since = s.last - (steps - 1) * s.gap
        s.loop_cost = s.cost * min(1.0, steps / max(s.steps, 1))

    def evaluate(self, now: float) -> list[Finding]:
        findings = []
        for sid in self._looping:
            s = self.sessions.peek(sid)
            if s is not None and now - s.last < 120:
                findings.append(self._finding(sid, s, now))
        self._looping.clear()
        return findings

    def _finding(self, key: str, s: Session, now: float) -> Finding:
        sid = entity_id("session", key)
        duration = max(s.last - s.loop_since, 1.0)
        rate = s.loop_cost / duration * 3600
        norms = self.norms.peek(store_key("agent", s.team, s.agent)) if s.agent else None
        typical_steps = _quantile(norms.steps_p50) if norms and norms.sessions else math.nan
        pace = s.loop_steps / duration * 60
        agent = f"agent {s.agent}" if s.agent else "a session"
        if s.loop_kind == "cycle":
            what = f"repeats the same {s.loop_period} request{'s' if s.loop_period > 1 else ''} in a cycle"
            metric, baseline, observed = "cycle_period", 0.0, float(s.loop_period)
        elif s.loop_kind == "no_progress":
            what = f"makes no progress: {s.loop_steps} steps with near-identical output at a steady pace"
            metric, baseline, observed = "steady_steps", float(self.steady_steps), float(s.loop_steps)
        else:
            what = f"has run {s.steps} steps and {usd(s.cost)}, far past what its sessions normally need"
            metric, baseline, observed = "session_steps", typical_steps, float(s.steps)
        summary = (
            f"{agent} session {sid} {what} ({s.loop_steps} looping steps, {pace:.0f}/min, "
            f"{usd(s.loop_cost)} so far, {usd(rate)}/h)."
        )
        critical = rate >= 20 or s.loop_cost >= 20
        return Finding(
            kind=AlertKind.AGENT_LOOP,
            entity=Entity(type="session", id=sid),
            team=s.team,
            group=f"{s.team}/{s.agent or sid}",
            at=now,
            started_at=s.loop_since,
            severity=Severity.CRITICAL if critical else Severity.WARNING,
            score=float(s.loop_steps),
            evidence=Evidence(
                metric=metric,
                baseline=round(baseline, 3) if not math.isnan(baseline) else 0.0,
                observed=observed,
                ratio=round(observed / baseline, 2) if baseline and not math.isnan(baseline) else 0.0,
                window_seconds=round(duration, 1),
                details={
                    "session_steps": s.steps,
                    "session_cost_usd": round(s.cost, 4),
                    "agent_median_steps": round(typical_steps, 1) if not math.isnan(typical_steps) else -1.0,
                    "steps_per_minute": round(pace, 2),
                },
            ),
            summary=summary,
            cost_rate_usd_per_hour=round(rate, 4),
            excess_usd_per_hour=round(rate, 4),
            recommended_action=(
                f"Stop session {sid} (open its breaker); then give {agent} a step budget and a repeated-action check."
            ),
            detector=self._ref,
            contributors=(),
        )

    def _ended(self, sid: str, s: Session) -> None:
        """A session went idle: it teaches its agent what a normal session needs."""
        self._looping.discard(sid)
        if s.agent is None or s.looping:
            return
        norms = self.norms.get(store_key("agent", s.team, s.agent), s.last)
        norms.learn(s.steps, s.cost)
        # The P² estimate moves slowly; refreshing the bar every few sessions is plenty.
        if norms.sessions >= self.min_agent_sessions and norms.sessions % 4 == 0:
            # Far past the typical session, and past twice the long ones for heavy-tailed agents.
            norms.limit_steps = max(
                self.runaway_factor * _quantile(norms.steps_p50), 2 * _quantile(norms.steps_p95), self.min_runaway_steps
            )
            norms.limit_usd = max(2 * _quantile(norms.cost_p95), self.min_runaway_usd)


def _new_session(key: str, now: float) -> Session:
    return Session(now)


def _quantile(q: stats.Quantile) -> float:
    value = q.get()
    return float(value) if value is not None else math.nan


def _new_norms(key: str, now: float) -> AgentNorms:
    return AgentNorms()
