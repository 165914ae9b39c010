"""Injected incidents and benign look-alikes, one function per scenario.

Each injector takes the :class:`World` (baseline traffic, fleet, the calendar of what is
already placed) and a random stream, changes or adds traffic, appends one label and returns
True; it returns False when it found no free place, and the caller tries again.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime

import numpy as np

from detector.events import Entity, EntityType, IncidentLabel, utc_from_epoch
from detector.pricing import PriceCatalog
from detector.simulate.azure_trace import TraceProfile
from detector.simulate.block import ERROR, F64, I64, OK, RATE_LIMITED, Block, costs, hex_ids
from detector.simulate.fleet import DAY, HOUR, MINUTE, AgentProfile, Fleet, KeyProfile
from detector.simulate.traffic import (
    REASONING_MODELS,
    Multiplier,
    fail,
    key_traffic,
    new_session_id,
    normal_steps,
    requests,
    sdk_retries,
    session_block,
    session_user,
)

MARGIN = 20 * MINUTE  # quiet time kept between two placed scenarios of one team
PREMIUM = {
    "openai": ("o3", "gpt-4.1", "gpt-4o", "o1"),
    "anthropic": ("claude-opus-4", "claude-sonnet-4"),
    "google": ("gemini-2.5-pro",),
}


@dataclass
class World:
    fleet: Fleet
    trace: TraceProfile
    catalog: PriceCatalog
    t_begin: float  # warm-up starts
    t_warm: float  # incident days start
    t_end: float
    key_blocks: dict[str, Block]  # baseline per key; injectors may edit these in place
    agent_blocks: list[Block]
    extra: list[Block] = field(default_factory=list)
    labels: list[IncidentLabel] = field(default_factory=list)
    busy: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    budgets: dict[str, float] = field(default_factory=dict)

    # -- calendar ------------------------------------------------------------------------------

    def is_free(self, team: str, start: float, end: float) -> bool:
        return all(end + MARGIN <= s or start >= e + MARGIN for s, e in self.busy.get(team, []))

    def book(self, team: str, start: float, end: float) -> None:
        self.busy.setdefault(team, []).append((start, end))

    def slot(
        self, teams: list[str], duration: float, rng: np.random.Generator, *, night_weight: float = 0.25
    ) -> float | None:
        """A start in the incident days where ``teams`` are free for ``duration``; mostly business hours."""
        hi = self.t_end - duration
        if hi <= self.t_warm:
            return None
        for _ in range(400):
            start = float(rng.uniform(self.t_warm, hi))
            busy_hours = float(self.fleet.activity(teams[0], np.array([start]))[0]) > 0.9
            if not busy_hours and rng.random() > night_weight:
                continue
            if all(self.is_free(t, start, start + duration) for t in teams):
                for t in teams:
                    self.book(t, start, start + duration)
                return start
        return None

    def label(
        self, kind: str, scenario: str, entity: tuple[EntityType, str], team: str, start: float, end: float
    ) -> None:
        self.labels.append(
            IncidentLabel(
                label_id=f"{scenario}-{len(self.labels) + 1:03d}",
                kind=kind,
                scenario=scenario,
                entity=Entity(type=entity[0], id=entity[1]),
                team=team,
                start=_dt(start),
                end=_dt(end),
            )
        )

    # -- traffic helpers -----------------------------------------------------------------------

    def rows(self, key_id: str, start: float, end: float) -> I64:
        t = self.key_blocks[key_id].t
        return np.flatnonzero((t >= start) & (t < end))

    def plain_keys(self, team: str | None = None, *, chat_only: bool = True) -> list[KeyProfile]:
        agent_keys = {a.key_id for a in self.fleet.agents.values()}
        return [
            k
            for k in self.fleet.keys.values()
            if k.key_id not in agent_keys
            and (team is None or k.team == team)
            and (not chat_only or k.operation == "chat")
        ]

    def mean_cost(self, key_id: str) -> float:
        block = self.key_blocks[key_id]
        ok = block.status == OK
        return float(costs(block, self.catalog)[ok].mean()) if ok.any() else 0.0

    def mean_tokens(self, key_id: str) -> tuple[int, int]:
        block = self.key_blocks[key_id]
        ok = block.status == OK
        return int(block.input_tokens[ok].mean()), int(block.output_tokens[ok].mean())


Injector = Callable[[World, np.random.Generator], bool]


def _dt(seconds: float) -> datetime:
    return utc_from_epoch(round(seconds, 3))


def _pick(rng: np.random.Generator, items: list[KeyProfile]) -> KeyProfile:
    return items[int(rng.integers(0, len(items)))]


def _pick_agent(world: World, rng: np.random.Generator) -> AgentProfile:
    agents = list(world.fleet.agents.values())
    return agents[int(rng.integers(0, len(agents)))]


def _const(value: float) -> Multiplier:
    return lambda t: np.full(t.shape, value)


def _poisson_times(rng: np.random.Generator, rate: float, start: float, end: float) -> F64:
    return np.sort(rng.uniform(start, end, int(rng.poisson(rate * (end - start)))))


# -- cost_spike ---------------------------------------------------------------------------------


def premium_model_switch(world: World, rng: np.random.Generator) -> bool:
    """The key's traffic moves to a model 10-30x more expensive per request, for 30-90 min."""
    options: list[tuple[KeyProfile, str]] = []
    for key in world.plain_keys():
        if any(m.startswith(REASONING_MODELS) for m in key.models):
            continue
        sample = world.key_blocks[key.key_id].take(np.arange(min(len(world.key_blocks[key.key_id]), 5000)))
        base = float(costs(sample, world.catalog).sum())
        for target in PREMIUM.get(key.provider, ()):
            sample.model[:] = target
            if base > 0 and 10.0 <= float(costs(sample, world.catalog).sum()) / base <= 30.0:
                options.append((key, target))
    if not options:
        return False
    key, target = options[int(rng.integers(0, len(options)))]
    duration = float(rng.uniform(30, 90)) * MINUTE
    start = world.slot([key.team], duration, rng)
    if start is None:
        return False
    rows = world.rows(key.key_id, start, start + duration)
    block = world.key_blocks[key.key_id]
    block.model[rows] = target
    if target.startswith(REASONING_MODELS):  # the same answers, part of them now spent thinking
        share = rng.uniform(0.3, 0.7, rows.size)
        block.reasoning[rows] = np.floor(block.output_tokens[rows] * share).astype(np.int64)
    world.label("cost_spike", "premium_model_switch", ("api_key", key.key_id), key.team, start, start + duration)
    return True


def prompt_blowup(world: World, rng: np.random.Generator) -> bool:
    """Input tokens x8-15 on one key for 20-60 min (a prompt template pulls in far too much context).

    Only keys whose spend is mostly input qualify, so the blow-up is a cost spike and not a ripple.
    """
    keys = []
    for k in world.plain_keys():
        mi, mo = world.mean_tokens(k.key_id)
        total = world.catalog.cost(k.main_model, mi, mo)
        if total > 0 and world.catalog.cost(k.main_model, mi, 0) / total >= 0.5:
            keys.append(k)
    if not keys:
        return False
    key = _pick(rng, keys)
    duration = float(rng.uniform(20, 60)) * MINUTE
    start = world.slot([key.team], duration, rng)
    if start is None:
        return False
    rows = world.rows(key.key_id, start, start + duration)
    block = world.key_blocks[key.key_id]
    factor = rng.uniform(8.0, 15.0, rows.size)
    block.input_tokens[rows] = np.round(block.input_tokens[rows] * factor).astype(np.int64)
    world.label("cost_spike", "prompt_blowup", ("api_key", key.key_id), key.team, start, start + duration)
    return True


def exponential_ramp(world: World, rng: np.random.Generator) -> bool:
    """The key's request rate doubles every ~30 min for 2-3 h, from its normal rate."""
    key = _pick(rng, world.plain_keys())
    duration = float(rng.uniform(2, 3)) * HOUR
    start = world.slot([key.team], duration, rng)
    if start is None:
        return False
    doubling = float(rng.uniform(25, 35)) * MINUTE

    def mult(t: F64) -> F64:
        out: F64 = np.power(2.0, (t - start) / doubling) - 1.0
        return np.maximum(out, 0.0)

    world.extra.append(key_traffic(world.fleet, world.trace, key, start, start + duration, rng, mult))
    world.label("cost_spike", "exponential_ramp", ("api_key", key.key_id), key.team, start, start + duration)
    return True


# -- retry_storm --------------------------------------------------------------------------------


def _failure_kinds(rng: np.random.Generator, n: int) -> np.ndarray:
    share_429 = float(rng.choice([0.1, 0.5, 0.9]))
    return np.where(rng.random(n) < share_429, RATE_LIMITED, ERROR).astype(object)


def _storm_rate(
    world: World, key: KeyProfile, start: float, low: float, high: float, rng: np.random.Generator
) -> float:
    normal = max(world.fleet.expected_rps(key.key_id, start), 1e-3)
    mult = float(np.clip(max(rng.uniform(low, high), 0.5 / normal), low, high))
    return mult * normal


def _storm(
    world: World, rng: np.random.Generator, minutes: tuple[float, float], rate: tuple[float, float]
) -> tuple[KeyProfile, float, float, Block] | None:
    """A key, a free slot on its team and the storm's requests at ``rate`` x the key's normal rate."""
    key = _pick(rng, world.plain_keys(chat_only=False))
    duration = float(rng.uniform(*minutes)) * MINUTE
    start = world.slot([key.team], duration, rng)
    if start is None:
        return None
    t = _poisson_times(rng, _storm_rate(world, key, start, *rate, rng), start, start + duration)
    return key, start, duration, requests(world.fleet, world.trace, key, t, rng, background_errors=False)


def full_storm(world: World, rng: np.random.Generator) -> bool:
    """A client bug retries failing calls without backoff: 3-50x the normal rate, 5-20 min."""
    storm = _storm(world, rng, (5, 20), (3.0, 50.0))
    if storm is None:
        return False
    key, start, duration, block = storm
    n = len(block)
    fail(block, np.arange(n), _failure_kinds(rng, n), rng)
    lengths = rng.integers(20, 51, size=n // 20 + 1)  # each chain: a first try, then retries up to 20-50
    chain = np.repeat(np.arange(lengths.size), lengths)[:n]
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    block.retry[:] = np.arange(n) - starts[chain]
    block.fingerprint[:] = np.array(hex_ids(rng, lengths.size, 8), dtype=object)[chain]
    world.extra.append(block)
    world.label("retry_storm", "full_storm", ("api_key", key.key_id), key.team, start, start + duration)
    return True


def partial_storm(world: World, rng: np.random.Generator) -> bool:
    """55-75 % of calls fail and are retried at once; successes are billed. 3-10x the rate, 10-30 min."""
    storm = _storm(world, rng, (10, 30), (3.0, 10.0))
    if storm is None:
        return False
    key, start, duration, block = storm
    n = len(block)
    failed = rng.random(n) < rng.uniform(0.55, 0.75)
    fail(block, np.flatnonzero(failed), _failure_kinds(rng, int(failed.sum())), rng)
    fps = hex_ids(rng, n, 8)
    attempt, chain = 0, 0
    for i, bad in enumerate(failed.tolist()):
        block.retry[i] = attempt
        block.fingerprint[i] = fps[chain]
        if bad and attempt < 50:
            attempt += 1
        else:
            attempt, chain = 0, i + 1
    world.extra.append(block)
    world.label("retry_storm", "partial_storm", ("api_key", key.key_id), key.team, start, start + duration)
    return True


# -- agent_loop ---------------------------------------------------------------------------------


def _looping_session(world: World, rng: np.random.Generator, scenario: str, kind: str) -> bool:
    agent = _pick_agent(world, rng)
    typical = agent.median_steps
    if scenario == "runaway_session":
        lead = max(round(typical), 2)
        total = round(typical * float(rng.uniform(6, 15)))
        gaps, outputs = normal_steps(agent, total, rng)
        fps = hex_ids(rng, total, 8)
    elif scenario == "long_legit_session":
        lead = 0
        total = round(typical * float(rng.uniform(3, 5)))
        gaps = np.clip(agent.gap_median_s * rng.lognormal(0.0, 0.8, total), 2.0, 60.0)
        gaps[0] = 0.0
        outputs = agent.out_median * rng.lognormal(0.0, 0.8, total)
        fps = hex_ids(rng, total, 8)
    else:
        lead = int(rng.integers(3, max(4, round(typical * 0.6)) + 1))
        if scenario == "fingerprint_cycle":
            period = int(rng.integers(1, 4))
            loop = int(rng.integers(30, 201))
            lead_gaps, lead_out = normal_steps(agent, lead, rng)
            loop_gaps, _ = normal_steps(agent, loop + 1, rng)
            pattern = hex_ids(rng, period, 8)
            pattern_out = agent.out_median * rng.lognormal(0.0, 0.5, period)
            idx = np.arange(loop) % period
            fps = hex_ids(rng, lead, 8) + [pattern[i] for i in idx.tolist()]
            outputs = np.concatenate([lead_out, pattern_out[idx] * rng.uniform(0.95, 1.05, loop)])
            gaps = np.concatenate([lead_gaps, loop_gaps[1:]])
        else:  # no_progress
            loop = int(rng.integers(40, 151))
            lead_gaps, lead_out = normal_steps(agent, lead, rng)
            level = agent.out_median * float(rng.lognormal(0.0, 0.3))
            outputs = np.concatenate([lead_out, level * rng.uniform(0.97, 1.03, loop)])
            gaps = np.concatenate([lead_gaps, agent.gap_median_s * rng.uniform(0.85, 1.15, loop)])
            fps = hex_ids(rng, lead + loop, 8)
    offsets = np.cumsum(gaps)
    start = world.slot([agent.team], float(offsets[-1]) + 5.0, rng)
    if start is None:
        return False
    session = new_session_id(rng)
    times = start + offsets
    block = session_block(world.fleet, agent, times, fps, outputs, rng, session, session_user(world.fleet, agent, rng))
    world.agent_blocks.append(block)
    world.label(kind, scenario, ("session", session), agent.team, float(times[lead]), float(block.t.max()))
    return True


def fingerprint_cycle(world: World, rng: np.random.Generator) -> bool:
    """After a few normal steps the session repeats 1-3 requests in a cycle, 30-200 more steps."""
    return _looping_session(world, rng, "fingerprint_cycle", "agent_loop")


def no_progress(world: World, rng: np.random.Generator) -> bool:
    """Fresh requests but near-constant output and a metronome pace, 40-150 more steps."""
    return _looping_session(world, rng, "no_progress", "agent_loop")


def runaway_session(world: World, rng: np.random.Generator) -> bool:
    """Ordinary-looking steps that never stop: 6-15x the agent's typical session length."""
    return _looping_session(world, rng, "runaway_session", "agent_loop")


# -- budget_burn --------------------------------------------------------------------------------


def team_burn(world: World, rng: np.random.Generator) -> bool:
    """Extra spend on 2-3 keys of a team for hours: 15-30x the rate its monthly budget allows."""
    teams = sorted(world.budgets)
    team = teams[int(rng.integers(0, len(teams)))]
    keys = world.plain_keys(team)
    if not keys:
        return False
    chosen = [keys[i] for i in rng.permutation(len(keys))[: int(rng.integers(2, 4))]]
    duration = float(rng.uniform(3, 6)) * HOUR
    start = world.slot([team], duration, rng)
    if start is None:
        return False
    per_second = float(rng.uniform(15, 30)) * world.budgets[team] / (30 * DAY) / len(chosen)
    for key in chosen:
        unit = max(world.mean_cost(key.key_id), 1e-6)
        rate = float(rng.uniform(0.5, 1.5)) * world.fleet.scale
        factor = per_second / rate / unit
        if factor < 1.0:
            rate, factor = per_second / unit, 1.0
        elif factor > 20.0:
            rate, factor = per_second / (unit * 20.0), 20.0
        block = requests(world.fleet, world.trace, key, _poisson_times(rng, rate, start, start + duration), rng)
        block.input_tokens[:] = np.minimum(np.round(block.input_tokens * factor), 190_000).astype(np.int64)
        block.output_tokens[:] = np.round(block.output_tokens * factor).astype(np.int64)
        block.reasoning[:] = np.round(block.reasoning * factor).astype(np.int64)
        block.reasoning[:] = np.minimum(block.reasoning, block.output_tokens)
        block.cached[:] = np.minimum(block.cached, block.input_tokens)
        world.extra.append(block)
    world.label("budget_burn", "team_burn", ("team", team), team, start, start + duration)
    return True


# -- benign look-alikes -------------------------------------------------------------------------


def nightly_batch(world: World, rng: np.random.Generator) -> bool:
    """Every night at 02:00 UTC (± minutes) one key runs a 45-60 min batch at 10-20x its night rate."""
    key = world.fleet.keys["key-data-etl"]
    level = float(rng.uniform(10, 20))
    minutes = float(rng.uniform(45, 60))
    day = np.floor(world.t_begin / DAY) * DAY
    while day < world.t_end:
        start = day + 2 * HOUR + float(np.clip(rng.normal(0.0, 120.0), -300.0, 300.0))
        end = min(start + minutes * MINUTE * float(rng.uniform(0.97, 1.03)), world.t_end)
        day += DAY
        if start < world.t_begin or start >= world.t_end:
            continue
        mult = _const(level * float(rng.uniform(0.95, 1.05)))
        world.extra.append(key_traffic(world.fleet, world.trace, key, start, end, rng, mult))
        world.book(key.team, start, end)
        if start >= world.t_warm:
            world.label("benign", "nightly_batch", ("api_key", key.key_id), key.team, start, end)
    return True


def new_key_rampup(world: World, rng: np.random.Generator) -> bool:
    """A brand-new key whose traffic grows smoothly (1.25x per 30 min) to a normal level over 3-6 h."""
    template = _pick(rng, world.plain_keys())
    serial = 1 + sum(k.startswith(f"{template.key_id}-new") for k in world.key_blocks)
    new = replace(
        template,
        key_id=f"{template.key_id}-new{serial}",
        peak_rps=template.peak_rps * float(rng.uniform(0.5, 1.0)),
        burst=0.3,
    )
    duration = float(rng.uniform(3, 6)) * HOUR
    start = world.slot([new.team], duration, rng)
    if start is None:
        return False
    full = start + duration

    def mult(t: F64) -> F64:
        out: F64 = np.minimum(np.power(1.25, (t - full) / (30 * MINUTE)), 1.0)
        return out

    block = key_traffic(world.fleet, world.trace, new, start, world.t_end, rng, mult)
    world.key_blocks[new.key_id] = block
    world.label("benign", "new_key_rampup", ("api_key", new.key_id), new.team, start, full)
    return True


def giant_request(world: World, rng: np.random.Generator) -> bool:
    """One request with 50-100x the key's usual input tokens."""
    key = _pick(rng, world.plain_keys())
    start = world.slot([key.team], MINUTE, rng)
    if start is None:
        return False
    block = requests(world.fleet, world.trace, key, np.array([start]), rng, background_errors=False)
    typical = float(np.median(world.key_blocks[key.key_id].input_tokens))
    block.input_tokens[:] = round(typical * float(rng.uniform(50, 100)))
    block.cached[:] = 0
    world.extra.append(block)
    world.label("benign", "giant_request", ("api_key", key.key_id), key.team, start, start + 1.0)
    return True


def provider_429_blip(world: World, rng: np.random.Generator) -> bool:
    """For 60 s half the calls to one provider are rate limited; clients back off (1, 2, 4, 8 s)."""
    providers = sorted({k.provider for k in world.fleet.keys.values()})
    provider = providers[int(rng.integers(0, len(providers)))]
    keys = [k for k in world.fleet.keys.values() if k.provider == provider and k.key_id in world.key_blocks]
    teams = sorted({k.team for k in keys})
    start = world.slot(teams, MINUTE, rng)
    if start is None:
        return False
    end = start + MINUTE
    busiest, most = keys[0], -1
    for key in keys:
        block = world.key_blocks[key.key_id]
        rows = world.rows(key.key_id, start, end)
        rows = rows[(block.status[rows] == OK) & (block.retry[rows] == 0) & (rng.random(rows.size) < 0.5)]
        if rows.size > most:
            busiest, most = key, int(rows.size)
        if rows.size == 0:
            continue
        out, think, cached = block.output_tokens[rows].copy(), block.reasoning[rows].copy(), block.cached[rows].copy()
        fail(block, rows, np.full(rows.size, RATE_LIMITED, dtype=object), rng)
        block.fingerprint[rows] = np.array(hex_ids(rng, rows.size, 8), dtype=object)
        retries = sdk_retries(
            block,
            rows,
            out,
            think,
            cached,
            rng,
            delays=(1.0, 2.0, 4.0, 8.0),
            p_retry=1.0,
            p_fail_again=0.5,
            fail_until=end,
        )
        world.key_blocks[key.key_id] = Block.concat([block, retries])
    world.label("benign", "provider_429_blip", ("api_key", busiest.key_id), busiest.team, start, end)
    return True


def long_legit_session(world: World, rng: np.random.Generator) -> bool:
    """A session 3-5x the agent's typical length, but varied: new requests, varied outputs, irregular gaps."""
    return _looping_session(world, rng, "long_legit_session", "benign")


def lunch_peak(world: World, rng: np.random.Generator) -> bool:
    """A team's traffic +60 % for an hour around its local noon."""
    teams = sorted(world.fleet.teams)
    start: float | None = None
    for team in [teams[i] for i in rng.permutation(len(teams))]:
        tz = world.fleet.teams[team].tz_hours
        day = np.floor(world.t_warm / DAY) * DAY
        while day < world.t_end and start is None:
            candidate = day + (12 - tz) * HOUR - 30 * MINUTE + float(rng.normal(0.0, 600.0))
            weekday = int((candidate + tz * HOUR) // DAY + 3) % 7 < 5
            if (
                weekday
                and world.t_warm <= candidate <= world.t_end - HOUR
                and world.is_free(team, candidate, candidate + HOUR)
            ):
                start = candidate
                world.book(team, start, start + HOUR)
            day += DAY
        if start is not None:
            break
    if start is None:  # no weekday noon inside the incident days: any busy hour will do
        team = teams[int(rng.integers(0, len(teams)))]
        start = world.slot([team], HOUR, rng, night_weight=0.0)
    if start is None:
        return False
    for key in world.plain_keys(team, chat_only=False):
        world.extra.append(key_traffic(world.fleet, world.trace, key, start, start + HOUR, rng, _const(0.6)))
    world.label("benign", "lunch_peak", ("team", team), team, start, start + HOUR)
    return True


INCIDENTS: dict[str, dict[str, Injector]] = {
    "cost_spike": {
        "premium_model_switch": premium_model_switch,
        "prompt_blowup": prompt_blowup,
        "exponential_ramp": exponential_ramp,
    },
    "retry_storm": {"full_storm": full_storm, "partial_storm": partial_storm},
    "agent_loop": {
        "fingerprint_cycle": fingerprint_cycle,
        "no_progress": no_progress,
        "runaway_session": runaway_session,
    },
    "budget_burn": {"team_burn": team_burn},
}

BENIGN: dict[str, Injector] = {
    "lunch_peak": lunch_peak,
    "new_key_rampup": new_key_rampup,
    "provider_429_blip": provider_429_blip,
    "giant_request": giant_request,
    "long_legit_session": long_legit_session,
}

RECURRING: dict[str, Injector] = {"nightly_batch": nightly_batch}

# Long scenarios are placed first, while the calendar still has room for them.
PLACEMENT_ORDER = (
    "team_burn",
    "lunch_peak",
    "new_key_rampup",
    "exponential_ramp",
    "premium_model_switch",
    "runaway_session",
    "fingerprint_cycle",
    "no_progress",
    "long_legit_session",
    "partial_storm",
    "prompt_blowup",
    "full_storm",
    "provider_429_blip",
    "giant_request",
)
