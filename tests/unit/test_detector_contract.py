"""What every detector promises, checked on all of them alike."""

from __future__ import annotations

import pickle
import random
from collections.abc import Callable

import pytest

from detector.detectors.agent_loop import AgentLoop
from detector.detectors.base import Detector
from detector.detectors.budget_burn import BudgetBurn
from detector.detectors.cost_spike import CostSpike
from detector.detectors.retry_storm import RetryStorm
from detector.events import UsageEvent
from tests.conftest import T0, make_event
from tests.unit.test_detectors import drive

FACTORIES: dict[str, Callable[[], Detector]] = {
    "cost_spike": CostSpike,
    "retry_storm": RetryStorm,
    "agent_loop": AgentLoop,
    "budget_burn": lambda: BudgetBurn(budgets={"search": 50_000.0, "ads": 50_000.0}),
}


def fleet(hours: float, seed: int = 3, keys: int = 8) -> list[UsageEvent]:
    """Healthy, varied traffic: several keys and teams, agent sessions, a trickle of handled errors."""
    rng = random.Random(seed)
    events, t, session, left = [], T0, 0, 0
    while t < T0 + hours * 3600:
        t += rng.expovariate(2.0)
        k = rng.randrange(keys)
        if left == 0:  # sessions of 3 to 15 steps per agent, interleaved
            session, left = session + 1, rng.randint(9, 45)
        left -= 1
        failed = rng.random() < 0.01
        events.append(
            make_event(
                t,
                api_key_id=f"key-{k}",
                team="search" if k % 2 else "ads",
                agent_id=f"agent-{k % 3}",
                session_id=f"s-{session}-{k % 3}",
                request_fingerprint=f"{rng.getrandbits(48):x}",
                input_tokens=int(rng.lognormvariate(7, 0.6)),
                output_tokens=int(rng.lognormvariate(5, 0.7)),
                status="error" if failed else "ok",
                retry_attempt=0,
            )
        )
    return events


@pytest.fixture(scope="module")
def healthy() -> list[UsageEvent]:
    return fleet(6)


@pytest.mark.parametrize("name", FACTORIES)
def test_quiet_on_healthy_traffic(name: str, healthy: list[UsageEvent]) -> None:
    assert drive(FACTORIES[name](), healthy) == []


@pytest.mark.parametrize("name", FACTORIES)
def test_deterministic_and_picklable_mid_stream(name: str, healthy: list[UsageEvent]) -> None:
    storm = [
        make_event(
            T0 + 3 * 3600 + 0.05 * i,
            status="error",
            retry_attempt=i % 25 + 1,
            output_tokens=0,
            cost_usd=0.0,
            api_key_id="key-1",
            team="search",
        )
        for i in range(2000)
    ]
    events = sorted(healthy + storm, key=lambda e: e.timestamp)
    det = FACTORIES[name]()
    half = len(events) // 2
    first = drive(det, events[:half])
    clone = pickle.loads(pickle.dumps(det))
    assert first + drive(det, events[half:]) == first + drive(clone, events[half:])
    assert drive(FACTORIES[name](), events) == drive(FACTORIES[name](), events)


@pytest.mark.parametrize("name", FACTORIES)
def test_judging_with_nothing_seen_is_empty(name: str) -> None:
    assert FACTORIES[name]().evaluate(T0) == []


@pytest.mark.parametrize("name", ["cost_spike", "retry_storm", "agent_loop"])
def test_memory_is_bounded_by_eviction(name: str) -> None:
    det = FACTORIES[name]()
    for i in range(5000):  # every event a new key, agent and session
        det.observe(
            make_event(T0 + i, api_key_id=f"k{i}", agent_id=f"a{i}", session_id=f"s{i}", status="error"), T0 + i, 0.01
        )
    det.evict(T0 + 5000 + 31 * 86400)  # past every TTL, agent norms (30 days) included
    assert det.entity_count() <= 5  # teams, or agent norms, may stay; per-key and per-session state go


def test_evidence_over_a_zero_baseline_stays_a_number_in_json() -> None:
    """JSON has no inf: it went out as null, against the alert schema."""
    import math

    from detector.events import Evidence

    ev = Evidence(metric="m", baseline=0.0, observed=5.0, ratio=math.inf, window_seconds=60, details={"r": math.nan})
    assert (ev.ratio, ev.details["r"]) == (1e12, 0.0)
    assert '"ratio":1000000000000.0' in ev.model_dump_json()
