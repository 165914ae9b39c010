"""cost_spike: an entity suddenly pays far more than it normally does.

Two signals, each against the entity's own learned normal:

* **unit cost** (api_key only): dollars and input tokens per request over the last 3 minutes,
  with the two biggest requests left out, against a log-scale baseline. Catches a switch to
  a premium model or a prompt that blew up, within minutes, and cannot be set off by one
  giant request.
* **spend level** (api_key and team): spend per minute over the last 5 and 10 minutes against
  the larger of the seasonal normal for this hour (of day, later of week) and a gated recent
  level that follows slow growth but is outrun by a fast ramp. Armed only once the entity has
  a day of history, so a nightly batch is learned, not flagged, and a new key ramping up is
  left alone.

>>> from detector.events import UsageEvent
>>> det = CostSpike(min_excess_usd_per_hour=0.5)
>>> def ev(i, model, tokens):
...     return UsageEvent(event_id=str(i), timestamp=1_700_000_000 + i, team="t", api_key_id="k",
...                       provider="openai", model=model, operation="chat", input_tokens=tokens,
...                       output_tokens=100, status="ok")
>>> for i in range(3600):  # an hour on a cheap model, one request a second
...     det.observe(ev(i, "gpt-4o-mini", 800), 1_700_000_000 + i, 0.0002)
...     if i % 30 == 0: _ = det.evaluate(1_700_000_000 + i)
>>> for i in range(3600, 3900):  # then the key switches to a model 20x the price
...     det.observe(ev(i, "gpt-4o", 800), 1_700_000_000 + i, 0.004)
>>> [f.evidence.metric for f in det.evaluate(1_700_000_000 + 3900)]
['usd_per_request']
"""

from __future__ import annotations

import heapq
import math
from collections import defaultdict, deque
from functools import partial
from typing import ClassVar

from detector.detectors.base import EntityStores, Finding, entity_id, keyed_stores, top_contributors, usd
from detector.events import AlertKind, Contributor, DetectorRef, Entity, EntityType, Evidence, Severity, Usage
from detector.models import DAY, HOUR, GatedLevel, LogBaseline, SeasonalProfile, SlotRing, alpha_for_half_life
from detector.state import EntityStore

SLOT = 10.0
BY_TOKENS_UNIT_RATIO = 3.0  # a prompt blow-up must also have raised the unit cost this much
LEARN_GATE = 1.8  # a 30-minute rate this many times the baseline is not learned as normal
RECENT = 256  # recent requests kept per entity, to name the top contributors


class SpendRing(SlotRing):
    FIELDS = ("n", "cost", "tokens", "top_cost", "top2_cost", "top_tokens")
    n: list[float]
    cost: list[float]
    tokens: list[float]
    top_cost: list[float]
    top2_cost: list[float]
    top_tokens: list[float]
    __slots__ = (
        "burst",
        "burst30",
        "cost",
        "dirty",
        "entity_type",
        "first_seen",
        "gate",
        "level",
        "minute_cost",
        "minute_idx",
        "minute_n",
        "minute_tokens",
        "minute_top",
        "minutes",
        "n",
        "quiet_until",
        "recent",
        "season",
        "tokens",
        "tokens_base",
        "top2_cost",
        "top_cost",
        "top_tokens",
        "unit",
    )

    def __init__(
        self,
        entity_type: EntityType,
        now: float,
        level_half_life_min: float,
        gate: tuple[float, float, float, float],
    ) -> None:
        super().__init__(SLOT, 60, now)
        self.gate = gate
        self.entity_type = entity_type
        self.dirty = False
        self.first_seen = now
        self.season = SeasonalProfile()
        self.level = GatedLevel(half_life=level_half_life_min, max_step=1.3)
        self.unit = LogBaseline(fading_factor=0.02)
        self.tokens_base = LogBaseline(fading_factor=0.02)
        self.burst = LogBaseline(fading_factor=0.002)  # 5-minute rate / baseline, in logs
        self.burst30 = LogBaseline(fading_factor=0.002)  # the same over 30 minutes
        self.minutes = [0.0] * 30  # spend of the last 30 closed minutes
        self.minute_idx = 0
        self.minute_cost = self.minute_n = self.minute_top = self.minute_tokens = 0.0
        self.quiet_until = -math.inf  # learning of unit and season is held while anomalous
        # (event time, cost, (api_key, model, user, agent)) of the latest requests.
        self.recent: deque[tuple[float, float, tuple[str | None, ...]]] = deque(maxlen=RECENT)

    def on_close(self, slot: int, idx: int) -> None:
        n = self.n
        self.minute_cost += self.cost[idx]
        self.minute_n += n[idx]
        self.minute_tokens += self.tokens[idx]
        self.minute_top = max(self.minute_top, self.top_cost[idx])
        if slot % 6 == 5:  # the last 10 s slot of a minute
            self._learn_minute((slot + 1) * SLOT - 60.0)

    def _learn_minute(self, ts: float) -> None:
        self.minutes[self.minute_idx] = self.minute_cost
        self.minute_idx = (self.minute_idx + 1) % len(self.minutes)
        base = max(self.season.expected(ts) or 0.0, self.level.mean)
        r5 = self.window("cost", 30) / 5.0
        r30 = sum(self.minutes) / len(self.minutes)
        anomalous = ts < self.quiet_until
        bar5, bar30 = self.bars()
        learning = ts - self.first_seen < self.gate[3]  # the first day learns all it sees: recurring jobs too
        if base > 0 and not anomalous and not learning:
            # What looks unusual is not learned as normal, or a ramp would teach itself; the
            # gate sits below the alert bars so the climb to them is not learned either.
            anomalous = r5 >= bar5 * base or r30 >= LEARN_GATE * base
        if not anomalous:
            expected = self.season.expected(ts)
            capped = expected is not None and not learning
            self.season.learn(ts, min(self.minute_cost, 3 * expected) if capped and expected else self.minute_cost)
            if self.minute_n >= 3:
                self.unit.learn((self.minute_cost - self.minute_top) / (self.minute_n - 1))
                self.tokens_base.learn(self.minute_tokens / self.minute_n)
            # How far a 5- and a 30-minute rate normally stray from the baseline: bursty keys (a
            # few agent sessions at a time) need a higher bar than a steady stream of requests.
            if base > 0:
                self.burst.learn(min(r5 / base, bar5))
                self.burst30.learn(min(r30 / base, bar30))
        # The level learns a smoothed rate (the last 10 min), gated, so it follows slow growth
        # (and, in time, a lasting change) but is outrun by a spike or a ramp.
        minutes = min(10.0, max(1.0, (ts + 60.0 - self.first_seen) / 60.0))  # a young entity has less
        self.level.learn(self.window("cost", 60) / minutes if self.minute_n or self.level.n else 0.0)
        self.minute_cost = self.minute_n = self.minute_top = self.minute_tokens = 0.0

    def bars(self) -> tuple[float, float]:
        """How many times the baseline a 5- and a 30-minute spend rate must reach to be anomalous."""
        ratio5, ratio30, sigmas, _ = self.gate
        return (
            max(ratio5, self.burst.typical * math.exp(sigmas * self.burst.log_std)),
            max(ratio30, self.burst30.typical * math.exp(sigmas * self.burst30.log_std)),
        )


class CostSpike(EntityStores):
    """Flags a sudden rise in what an api_key or a team pays, per request or per minute."""

    name: ClassVar[str] = "cost_spike"
    version: ClassVar[str] = "1.0"
    DEFAULT_ENTITY_TYPES: ClassVar[tuple[EntityType, ...]] = ("api_key", "team")

    def __init__(
        self,
        entity_types: tuple[EntityType, ...] = DEFAULT_ENTITY_TYPES,
        unit_ratio: float = 5.0,
        tokens_ratio: float = 5.0,
        level_ratio: float = 3.0,
        level_sigmas: float = 4.0,
        sustained_ratio: float = 2.0,
        min_excess_usd_per_hour: float = 0.25,
        critical_usd_per_hour: float = 50.0,
        learn_seconds: float = DAY,
        unit_learn_minutes: int = 60,
        level_half_life_min: float = 60.0,
        interval: float = 30.0,
        ttl: float = 7 * DAY,
        max_entities: int = 200_000,
    ) -> None:
        self.entity_types = entity_types
        self.unit_ratio = unit_ratio
        self.tokens_ratio = tokens_ratio
        self.level_ratio = level_ratio
        self.level_sigmas = level_sigmas
        self.sustained_ratio = sustained_ratio
        self.min_excess_usd_per_hour = min_excess_usd_per_hour
        self.critical_usd_per_hour = critical_usd_per_hour
        self.learn_seconds = learn_seconds
        self.unit_learn_minutes = unit_learn_minutes
        self.level_half_life_min = level_half_life_min
        self.interval = interval
        self.ttl = ttl
        self.max_entities = max_entities
        self._ref = DetectorRef(name=self.name, version=self.version)
        self._stores: dict[EntityType, EntityStore[SpendRing]] = {
            t: EntityStore(partial(self._new, t), ttl=ttl, max_entities=max_entities, on_evict=partial(self._gone, t))
            for t in entity_types
        }
        self._keyed = keyed_stores(self._stores)
        self._teams: dict[tuple[EntityType, str], str] = {}
        self._dirty: list[tuple[EntityType, str, SpendRing]] = []  # seen since the last evaluate

    def _gone(self, entity_type: EntityType, key: str, state: SpendRing) -> None:
        self._teams.pop((entity_type, key), None)  # the store let it go: so does its owner's record

    def _gate(self) -> tuple[float, float, float, float]:
        return (self.level_ratio, self.sustained_ratio, self.level_sigmas, self.learn_seconds)

    def _new(self, entity_type: EntityType, key: str, now: float) -> SpendRing:
        return SpendRing(entity_type, now, self.level_half_life_min, self._gate())

    def adopt(self, old: CostSpike) -> None:
        self._take_stores(old)
        gate, alpha = self._gate(), alpha_for_half_life(self.level_half_life_min)
        for store in self._stores.values():
            for _, st in store.items():
                st.gate, st.level.alpha = gate, alpha
        # Only for what the stores took (a snapshot from before team scoping left its users' and agents'
        # bare keys behind: no eviction would ever clear their entries).
        held = {(etype, key) for etype, store in self._stores.items() for key in store}
        self._teams = {ident: team for ident, team in old._teams.items() if ident in held}
        self._dirty = [d for d in old._dirty if (d[0], d[1]) in held]

    def observe(self, ev: Usage, ts: float, cost: float) -> None:
        slot = int(ts // SLOT)
        recent = (ts, cost, (ev.api_key_id, ev.model, ev.user, ev.agent_id))
        tokens = ev.input_tokens
        dirty = self._dirty
        for etype, store, key_of in self._keyed:
            key = key_of(ev)
            if key is None:
                continue
            st = store.get(key, ts)
            if slot > st.slot:
                st.roll(slot)
            i = st.idx
            st.n[i] += 1
            st.cost[i] += cost
            st.tokens[i] += tokens
            if cost > st.top2_cost[i]:
                if cost > st.top_cost[i]:
                    st.top2_cost[i] = st.top_cost[i]
                    st.top_cost[i] = cost
                else:
                    st.top2_cost[i] = cost
            if tokens > st.top_tokens[i]:
                st.top_tokens[i] = tokens
            st.recent.append(recent)
            if not st.dirty:
                st.dirty = True
                dirty.append((etype, key, st))
                self._teams[etype, key] = ev.team

    def evaluate(self, now: float) -> list[Finding]:
        findings: list[Finding] = []
        slot = int(now // SLOT) - 1  # the last slot that is complete at ``now``
        for etype, key, st in self._dirty:
            st.dirty = False
            ident = (etype, key)
            st.roll(slot + 1)
            finding = self._unit_rule(st, ident, now) if etype == "api_key" else None
            finding = finding or self._level_rule(st, ident, now)
            if finding is not None:
                st.quiet_until = now + 15 * 60
                findings.append(finding)
        self._dirty = []
        return findings

    def _unit_rule(self, st: SpendRing, ident: tuple[EntityType, str], now: float) -> Finding | None:
        if st.unit.n < self.unit_learn_minutes:
            return None
        slots = 18  # 3 minutes, ending with the slot closed at ``now``
        n = st.closed("n", slots)
        if n < 8:
            return None
        cost = st.closed("cost", slots)
        if cost < min(self.unit_ratio, BY_TOKENS_UNIT_RATIO) * st.unit.typical * (n - 2):
            return None  # even untrimmed, too cheap per request for either test below
        trimmed = cost - _largest_two(st, slots)
        unit_now = trimmed / (n - 2)
        unit_ratio = st.unit.ratio(unit_now)
        tokens_ratio = st.tokens_base.ratio((st.closed("tokens", slots) - st.closed_max("top_tokens", slots)) / (n - 1))
        threshold = max(self.unit_ratio, math.exp(3.0 * st.unit.log_std))
        tokens_bar = max(self.tokens_ratio, math.exp(3.0 * st.tokens_base.log_std))
        # No token baseline (a gateway that reported no tokens until now) says nothing of prompts.
        by_tokens = st.tokens_base.typical > 0 and tokens_ratio >= tokens_bar and unit_ratio >= BY_TOKENS_UNIT_RATIO
        if unit_ratio < threshold and not by_tokens:
            return None
        minutes = slots * SLOT / 60
        rate = cost / minutes * 60
        normal_rate = st.unit.typical * n / minutes * 60
        excess = rate - normal_rate
        if excess < self.min_excess_usd_per_hour:
            return None
        contributors = self._contributors(st, ident, now - slots * SLOT, ("model", "agent", "user"))
        top = contributors[0] if contributors else None
        what = (
            f"input tokens per request are {tokens_ratio:.1f}x usual (prompt blow-up?)"
            if by_tokens and unit_ratio < threshold
            else f"it now pays {usd(unit_now)} per request, {unit_ratio:.1f}x its usual {usd(st.unit.typical)}"
        )
        summary = f"{_name(ident)}: {what}; spending {usd(rate)}/h against a normal {usd(normal_rate)}/h" + (
            f", {top.entity.type} {top.entity.id} carries {top.share:.0%}." if top else "."
        )
        action = (
            f"Check what changed for {_name(ident)}"
            + (f" (model {top.entity.id})" if top and top.entity.type == "model" else "")
            + "; if it was not meant, revert the deploy or open its breaker."
        )
        return self._finding(
            ident,
            now,
            slots * SLOT,
            "usd_per_request",
            st.unit.typical,
            unit_now,
            unit_ratio,
            rate,
            excess,
            summary,
            action,
            contributors,
            {"tokens_per_request_ratio": round(tokens_ratio, 2), "requests": n},
        )

    def _level_rule(self, st: SpendRing, ident: tuple[EntityType, str], now: float) -> Finding | None:
        if now - st.first_seen < self.learn_seconds:
            return None
        seasonal = _seasonal_expected(st.season, now)
        if seasonal is None:
            return None
        base = max(seasonal, st.level.mean, self.min_excess_usd_per_hour / 60 / 4)
        bar, bar30 = st.bars()
        r5 = st.closed("cost", 30) / 5
        r10 = st.closed("cost", 60) / 10
        r30 = sum(st.minutes) / len(st.minutes)
        # A sudden jump shows in 5 and 10 minutes; a ramp, sooner in the smoother 30 minutes.
        sudden = r5 >= bar * base and r10 >= 0.6 * bar * base
        sustained = r30 >= bar30 * base and r5 >= bar30 * base
        if not (sudden or sustained) or st.closed("n", 30) < 20:
            return None
        if not sudden:
            bar = bar30
        excess = (r5 - base) * 60
        if excess < self.min_excess_usd_per_hour:
            return None
        ratio = r5 / base
        keys: tuple[EntityType, ...] = (
            ("api_key", "model", "agent") if ident[0] == "team" else ("model", "agent", "user")
        )
        contributors = self._contributors(st, ident, now - 300, keys)
        top = contributors[0] if contributors else None
        summary = (
            f"{_name(ident)} is spending {usd(r5 * 60)}/h, {ratio:.1f}x the {usd(base * 60)}/h normal "
            f"for {_hour_name(now)}" + (f"; {top.entity.type} {top.entity.id} carries {top.share:.0%}." if top else ".")
        )
        action = (
            f"Find what started at {_clock(now - 300)} UTC in {_name(ident)}; cap it or open the breaker if unplanned."
        )
        return self._finding(
            ident,
            now,
            300.0,
            "usd_per_minute",
            base,
            r5,
            ratio,
            r5 * 60,
            excess,
            summary,
            action,
            contributors,
            {
                "usd_per_minute_10m": round(r10, 4),
                "seasonal_usd_per_minute": round(seasonal, 4),
                "ratio_bar": round(bar, 2),
            },
        )

    def _finding(
        self,
        ident: tuple[EntityType, str],
        now: float,
        window: float,
        metric: str,
        baseline: float,
        observed: float,
        ratio: float,
        rate: float,
        excess: float,
        summary: str,
        action: str,
        contributors: tuple[Contributor, ...],
        details: dict[str, float],
    ) -> Finding:
        etype, key = ident
        critical = excess >= self.critical_usd_per_hour or ratio >= 10
        return Finding(
            kind=AlertKind.COST_SPIKE,
            entity=Entity(type=etype, id=entity_id(etype, key)),
            team=self._teams[ident],
            group=self._teams[ident],
            at=now,
            started_at=now - window,
            severity=Severity.CRITICAL if critical else Severity.WARNING,
            score=ratio,
            evidence=Evidence(
                metric=metric,
                baseline=round(baseline, 6),
                observed=round(observed, 6),
                ratio=round(ratio, 2),
                window_seconds=window,
                details=details,
            ),
            summary=summary,
            cost_rate_usd_per_hour=round(rate, 4),
            excess_usd_per_hour=round(excess, 4),
            recommended_action=action,
            detector=self._ref,
            contributors=contributors,
        )

    def _contributors(
        self, st: SpendRing, ident: tuple[EntityType, str], since: float, dims: tuple[EntityType, ...]
    ) -> tuple[Contributor, ...]:
        rows = [r for r in st.recent if r[0] >= since]
        total = sum(r[1] for r in rows)
        column = {"api_key": 0, "model": 1, "user": 2, "agent": 3}
        best: tuple[Contributor, ...] = ()
        for dim in dims:
            col = column[dim]
            spend: defaultdict[str, float] = defaultdict(float)
            for r in rows:  # sum by plain id first: an Entity per row is costly on a busy key
                if (key := r[2][col]) is not None:
                    spend[key] += r[1]
            ranked = top_contributors(((Entity(type=dim, id=k), v) for k, v in spend.items()), total=total)
            # Name the dimension that concentrates the spend most: that is the story.
            if ranked and (not best or ranked[0].share > best[0].share + 0.05):
                best = ranked
        return best


def _largest_two(st: SpendRing, slots: int) -> float:
    return sum(heapq.nlargest(2, st.closed_values("top_cost", slots) + st.closed_values("top2_cost", slots)))


def _seasonal_expected(season: SeasonalProfile, now: float) -> float | None:
    """The seasonal normal, tolerant of schedules that drift a few minutes across the hour."""
    values = [season.expected(t) for t in (now, now - 900, now + 900)]
    known = [v for v in values if v is not None]
    return max(known) if values[0] is not None else None


def _name(ident: tuple[EntityType, str]) -> str:
    return f"{ident[0].replace('_', ' ')} {entity_id(*ident)}"


_DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")


def _hour_name(ts: float) -> str:
    hour = int(ts // HOUR)
    return f"{_DAYS[((hour + 72) // 24) % 7]} {hour % 24:02d}:00 UTC"


def _clock(ts: float) -> str:
    seconds = int(ts) % int(DAY)
    return f"{seconds // 3600:02d}:{seconds // 60 % 60:02d}"
