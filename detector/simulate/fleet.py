"""The simulated fleet: teams, their API keys and agents, and when they are busy.

Numbers are hand-set to look like a mid-sized company (six teams, ~20 keys, ~7 agents) and
jittered by the seed, so two seeds give two plausible companies with the same shape.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np

from detector.simulate.block import F64

TABLE_RATE_SCALE = 0.7  # brings the table's peaks to ~500k requests per weekday at scale 1
DAY = 86_400.0
HOUR = 3_600.0
MINUTE = 60.0

Workload = Literal["code", "conv"]


def rng_for(seed: int, *names: str | int) -> np.random.Generator:
    """An independent stream per component, so adding a scenario does not shift the baseline."""
    return np.random.default_rng([seed, *(zlib.crc32(str(n).encode()) for n in names)])


@dataclass(frozen=True)
class KeyProfile:
    key_id: str
    team: str
    provider: str
    models: tuple[str, ...]
    weights: tuple[float, ...]
    peak_rps: float  # at business-hours peak, before the spec's scale
    workload: Workload = "conv"
    operation: str = "chat"
    ctx_scale: float = 1.0  # multiplies the trace's context tokens
    out_scale: float = 1.0  # multiplies the trace's generated tokens
    cached_share: float = 0.0  # mean share of input tokens served from the prompt cache
    burst: float = 0.5  # share of the trace's minute-level burstiness this key shows
    error_rate: float = 0.006
    rate_limit_rate: float = 0.005
    timeout_rate: float = 0.001
    has_users: bool = False

    @property
    def main_model(self) -> str:
        return self.models[int(np.argmax(self.weights))]


@dataclass(frozen=True)
class AgentProfile:
    agent_id: str
    team: str
    key_id: str
    model: str
    median_steps: float
    sessions_per_hour: float  # at peak, before scale
    gap_median_s: float
    ctx_base: int
    ctx_step: int
    out_median: float
    tools: tuple[str, ...]

    @property
    def steps_sigma(self) -> float:
        """Lognormal sigma that puts the p95 session length at min(2.2 x median, 30) steps."""
        p95 = min(2.2 * self.median_steps, 30.0)
        return math.log(p95 / self.median_steps) / 1.645


@dataclass(frozen=True)
class Team:
    name: str
    tz_hours: float  # local business hours are UTC + tz_hours
    night_level: float  # share of the peak rate at night
    users: tuple[str, ...]


@dataclass(frozen=True)
class Fleet:
    teams: dict[str, Team]
    keys: dict[str, KeyProfile]
    agents: dict[str, AgentProfile]
    scale: float

    def provider_of(self, key_id: str) -> str:
        return self.keys[key_id].provider

    def team_keys(self, team: str, *, with_agents: bool = True) -> list[KeyProfile]:
        agent_keys = {a.key_id for a in self.agents.values()}
        return [k for k in self.keys.values() if k.team == team and (with_agents or k.key_id not in agent_keys)]

    def activity(self, team: str, t: F64) -> F64:
        """Share of the peak rate at epoch seconds ``t``: business-hours plateau, quiet nights and weekends."""
        tm = self.teams[team]
        local = t + tm.tz_hours * HOUR
        hour = (local % DAY) / HOUR
        weekday = (np.floor(local / DAY).astype(np.int64) + 3) % 7  # 1970-01-01 was a Thursday
        # 0 at night, cosine ramps 07-09 and 17-21, 1 in between
        rise = np.clip((hour - 7.0) / 2.0, 0.0, 1.0)
        fall = np.clip((21.0 - hour) / 4.0, 0.0, 1.0)
        bump = 0.5 - 0.5 * np.cos(np.pi * np.minimum(rise, fall))
        level = tm.night_level + (1.0 - tm.night_level) * bump
        weekend = np.where(weekday >= 5, 0.35, 1.0)
        out: F64 = level * weekend
        return out

    def expected_rps(self, key_id: str, t: float) -> float:
        """The key's normal request rate at ``t`` (no burstiness), after the spec's scale."""
        key = self.keys[key_id]
        return float(key.peak_rps * self.scale * self.activity(key.team, np.array([t]))[0])


_TEAMS = {
    "search": (0.0, 0.30),
    "support": (-1.0, 0.25),
    "growth": (1.0, 0.20),
    "data-platform": (0.0, 0.25),
    "research": (2.0, 0.20),
    "billing": (-2.0, 0.22),
}

_KEYS: tuple[KeyProfile, ...] = (
    KeyProfile(
        "key-search-prod", "search", "openai", ("gpt-4o-mini", "gpt-4o"), (0.85, 0.15), 2.2, cached_share=0.3, burst=0.4
    ),
    KeyProfile(
        "key-search-embed",
        "search",
        "openai",
        ("text-embedding-3-small",),
        (1.0,),
        1.8,
        operation="embedding",
        ctx_scale=0.08,
        out_scale=0.0,
        burst=0.4,
    ),
    KeyProfile("key-search-eval", "search", "anthropic", ("claude-sonnet-4",), (1.0,), 0.08, workload="code"),
    KeyProfile(
        "key-support-chat",
        "support",
        "anthropic",
        ("claude-haiku-4-5", "claude-sonnet-4"),
        (0.8, 0.2),
        1.3,
        cached_share=0.4,
        has_users=True,
    ),
    KeyProfile("key-support-agent", "support", "openai", ("gpt-4.1-mini",), (1.0,), 0.15, has_users=True),
    KeyProfile("key-support-batch", "support", "openai", ("gpt-4o-mini",), (1.0,), 0.3, burst=0.7),
    KeyProfile("key-growth-copy", "growth", "openai", ("gpt-4.1-nano", "gpt-4o-mini"), (0.7, 0.3), 0.9, has_users=True),
    KeyProfile(
        "key-growth-personalize",
        "growth",
        "google",
        ("gemini-2.0-flash", "gemini-2.5-flash"),
        (0.75, 0.25),
        1.3,
        burst=0.6,
    ),
    KeyProfile("key-growth-agent", "growth", "anthropic", ("claude-sonnet-4",), (1.0,), 0.05),
    KeyProfile(
        "key-data-etl",
        "data-platform",
        "openai",
        ("gpt-4o-mini",),
        (1.0,),
        0.9,
        workload="code",
        ctx_scale=0.8,
        burst=0.7,
    ),
    KeyProfile(
        "key-data-embed",
        "data-platform",
        "openai",
        ("text-embedding-3-large",),
        (1.0,),
        1.2,
        operation="embedding",
        ctx_scale=0.3,
        out_scale=0.0,
    ),
    KeyProfile("key-data-sql-agent", "data-platform", "openai", ("gpt-4.1",), (1.0,), 0.08, workload="code"),
    KeyProfile(
        "key-data-notebook",
        "data-platform",
        "anthropic",
        ("claude-haiku-4-5",),
        (1.0,),
        0.3,
        workload="code",
        has_users=True,
        cached_share=0.2,
    ),
    KeyProfile(
        "key-research-lab",
        "research",
        "anthropic",
        ("claude-sonnet-4", "claude-opus-4", "claude-haiku-4-5"),
        (0.5, 0.1, 0.4),
        0.3,
        workload="code",
        has_users=True,
        cached_share=0.3,
    ),
    KeyProfile("key-research-eval", "research", "openai", ("o3", "gpt-4.1"), (0.4, 0.6), 0.35, burst=0.8),
    KeyProfile("key-research-agent", "research", "openai", ("o4-mini",), (1.0,), 0.05, workload="code"),
    KeyProfile("key-billing-invoice", "billing", "openai", ("gpt-4.1-nano", "gpt-4o-mini"), (0.6, 0.4), 0.6),
    KeyProfile("key-billing-assist", "billing", "google", ("gemini-2.5-flash",), (1.0,), 0.4, has_users=True),
    KeyProfile("key-billing-agent", "billing", "anthropic", ("claude-haiku-4-5",), (1.0,), 0.05),
)

_AGENTS: tuple[AgentProfile, ...] = (
    AgentProfile(
        "support-triage-agent",
        "support",
        "key-support-agent",
        "gpt-4.1-mini",
        10,
        40,
        5.0,
        2500,
        600,
        220,
        ("kb_search", "ticket_update"),
    ),
    AgentProfile(
        "support-refund-agent",
        "support",
        "key-support-agent",
        "gpt-4.1-mini",
        14,
        10,
        6.0,
        3000,
        700,
        180,
        ("orders_lookup", "refund_api"),
    ),
    AgentProfile(
        "growth-outreach-agent",
        "growth",
        "key-growth-agent",
        "claude-sonnet-4",
        18,
        6,
        8.0,
        4000,
        900,
        350,
        ("crm_search", "email_draft"),
    ),
    AgentProfile(
        "data-sql-agent",
        "data-platform",
        "key-data-sql-agent",
        "gpt-4.1",
        12,
        15,
        7.0,
        5000,
        1200,
        260,
        ("run_sql", "schema_lookup"),
    ),
    AgentProfile(
        "research-browse-agent",
        "research",
        "key-research-agent",
        "o4-mini",
        17,
        5,
        9.0,
        3000,
        1500,
        500,
        ("web_search", "fetch_url"),
    ),
    AgentProfile(
        "research-code-agent",
        "research",
        "key-research-agent",
        "o4-mini",
        19,
        4,
        10.0,
        6000,
        1100,
        700,
        ("run_python", "read_file"),
    ),
    AgentProfile(
        "billing-reconcile-agent",
        "billing",
        "key-billing-agent",
        "claude-haiku-4-5",
        8,
        12,
        4.0,
        2000,
        500,
        150,
        ("ledger_query",),
    ),
)


def build_fleet(seed: int, scale: float) -> Fleet:
    """The hand-set fleet with seed-dependent rates and sizes (each within ±25 % of the table)."""
    rng = rng_for(seed, "fleet")
    teams = {
        name: Team(
            name,
            tz,
            night * float(rng.uniform(0.9, 1.1)),
            tuple(f"{name}-u{i:03d}" for i in rng.choice(400, size=int(rng.integers(8, 30)), replace=False)),
        )
        for name, (tz, night) in _TEAMS.items()
    }
    keys = {
        k.key_id: replace(
            k,
            peak_rps=k.peak_rps * TABLE_RATE_SCALE * float(rng.uniform(0.8, 1.25)),
            ctx_scale=k.ctx_scale * float(rng.uniform(0.8, 1.25)),
            out_scale=k.out_scale * float(rng.uniform(0.8, 1.25)),
            error_rate=k.error_rate * float(rng.uniform(0.6, 1.6)),
            rate_limit_rate=k.rate_limit_rate * float(rng.uniform(0.4, 1.8)),
        )
        for k in _KEYS
    }
    agents = {
        a.agent_id: replace(
            a,
            median_steps=a.median_steps * float(rng.uniform(0.85, 1.15)),
            sessions_per_hour=a.sessions_per_hour * float(rng.uniform(0.8, 1.25)),
            gap_median_s=a.gap_median_s * float(rng.uniform(0.85, 1.15)),
            out_median=a.out_median * float(rng.uniform(0.8, 1.25)),
        )
        for a in _AGENTS
    }
    return Fleet(teams, keys, agents, scale)
