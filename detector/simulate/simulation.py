"""The simulation's entry points: a spec in, labelled events, budgets and month-to-date spend out."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from detector.events import IncidentLabel
from detector.pricing import PriceCatalog
from detector.simulate.azure_trace import TraceProfile
from detector.simulate.block import Block, Columns, assemble, costs, iter_dicts
from detector.simulate.fleet import DAY, HOUR, build_fleet, rng_for
from detector.simulate.scenarios import BENIGN, INCIDENTS, PLACEMENT_ORDER, RECURRING, World
from detector.simulate.traffic import agent_sessions, key_traffic

DEFAULT_INCIDENTS: Mapping[str, int] = {"cost_spike": 3, "retry_storm": 3, "agent_loop": 4, "budget_burn": 1}
PLACEMENT_ATTEMPTS = 6


@dataclass(frozen=True)
class SimulationSpec:
    """What to simulate. The same spec always gives byte-identical output."""

    seed: int = 7
    days: float = 1.0  # days with labelled incidents, after the warm-up
    warmup_hours: float = 24.0  # normal traffic only; benign look-alikes may appear
    start: datetime = datetime(2026, 11, 2, tzinfo=UTC)  # a Monday; the warm-up starts here
    scale: float = 1.0  # multiplies baseline request rates
    incidents_per_day: Mapping[str, int] = field(default_factory=lambda: dict(DEFAULT_INCIDENTS))
    benign_per_day: int = 6  # benign look-alikes per day, besides the nightly batch

    def __post_init__(self) -> None:
        if self.days < 0 or self.warmup_hours < 0 or self.days + self.warmup_hours <= 0:
            raise ValueError("days and warmup_hours must be >= 0, and not both 0")
        if self.scale <= 0:
            raise ValueError("scale must be > 0")
        if self.start.tzinfo is None:
            raise ValueError("start must be timezone-aware")
        unknown = set(self.incidents_per_day) - set(INCIDENTS)
        if unknown:
            raise ValueError(f"unknown incident kinds {sorted(unknown)}; known: {sorted(INCIDENTS)}")

    @property
    def span_days(self) -> float:
        return self.days + self.warmup_hours / 24.0


@dataclass
class Simulation:
    events: list[dict[str, Any]]  # JSON-ready UsageEvent dicts, sorted by timestamp
    labels: list[IncidentLabel]
    budgets: dict[str, float]  # team -> monthly budget USD
    spent_to_date: dict[str, float]  # team -> month-to-date spend before the start


@dataclass
class Plan:
    """Everything but the event dicts, which :meth:`events` makes lazily."""

    spec: SimulationSpec
    columns: Columns
    labels: list[IncidentLabel]
    budgets: dict[str, float]
    spent_to_date: dict[str, float]
    skipped: list[str]  # scenarios that found no free place

    def events(self) -> Iterator[dict[str, Any]]:
        return iter_dicts(self.columns)


def count(per_day: float, days: float) -> int:
    """How many of a scenario to place: per-day rate times days, at least one when both are positive."""
    return max(1, round(per_day * days)) if per_day > 0 and days > 0 else 0


def plan(spec: SimulationSpec) -> Plan:
    fleet = build_fleet(spec.seed, spec.scale)
    trace = TraceProfile.load()
    catalog = PriceCatalog.default()
    t_begin = spec.start.timestamp()
    t_warm = t_begin + spec.warmup_hours * HOUR
    t_end = t_warm + spec.days * DAY
    world = World(
        fleet=fleet,
        trace=trace,
        catalog=catalog,
        t_begin=t_begin,
        t_warm=t_warm,
        t_end=t_end,
        key_blocks={
            k: key_traffic(fleet, trace, key, t_begin, t_end, rng_for(spec.seed, "key", k))
            for k, key in fleet.keys.items()
        },
        agent_blocks=[
            agent_sessions(fleet, a, t_begin, t_end, rng_for(spec.seed, "agent", name))
            for name, a in fleet.agents.items()
        ],
    )
    for name, recurring in RECURRING.items():
        recurring(world, rng_for(spec.seed, name))
    budgets, spent = _budgets(spec, world, [*world.key_blocks.values(), *world.agent_blocks, *world.extra])
    world.budgets = budgets

    jobs: list[tuple[str, int]] = []
    for kind, per_day in spec.incidents_per_day.items():
        names = list(INCIDENTS[kind])
        jobs += [(names[i % len(names)], i) for i in range(count(per_day, spec.days))]
    names = list(BENIGN)
    jobs += [(names[i % len(names)], i) for i in range(count(spec.benign_per_day, spec.days))]
    jobs.sort(key=lambda job: (PLACEMENT_ORDER.index(job[0]), job[1]))
    injectors = {name: fn for group in INCIDENTS.values() for name, fn in group.items()} | BENIGN
    skipped = []
    for name, index in jobs:
        if not any(injectors[name](world, rng_for(spec.seed, name, index, a)) for a in range(PLACEMENT_ATTEMPTS)):
            skipped.append(name)

    blocks = [*world.key_blocks.values(), *world.agent_blocks, *world.extra]
    columns = assemble(blocks, catalog, rng_for(spec.seed, "assemble"))
    labels = sorted(world.labels, key=lambda label: (label.start, label.label_id))
    return Plan(spec, columns, labels, budgets, spent, skipped)


def _budgets(spec: SimulationSpec, world: World, blocks: list[Block]) -> tuple[dict[str, float], dict[str, float]]:
    """Monthly budgets 1.3-2x a month of normal spend; month-to-date spend at the normal daily rate."""
    rng = rng_for(spec.seed, "budgets")
    spend = dict.fromkeys(sorted(world.fleet.teams), 0.0)
    for block in blocks:
        if len(block) == 0:
            continue
        usd = costs(block, world.catalog)
        for team in spend:
            spend[team] += float(usd[block.team == team].sum())
    span = max(spec.span_days, 1.0 / 24.0)
    elapsed = spec.start.astimezone(UTC).day - 1
    budgets, spent = {}, {}
    for team, total in spend.items():
        daily = total / span
        budgets[team] = round(max(daily * 30 * float(rng.uniform(1.3, 2.0)), 1.0), 2)
        spent[team] = round(daily * elapsed * float(rng.uniform(0.95, 1.05)), 2)
    return budgets, spent


def iter_events(spec: SimulationSpec) -> Iterator[dict[str, Any]]:
    """The events of ``spec`` one at a time, in timestamp order (the planning is done up front)."""
    return plan(spec).events()


def simulate(spec: SimulationSpec) -> Simulation:
    p = plan(spec)
    return Simulation(list(p.events()), p.labels, p.budgets, p.spent_to_date)
