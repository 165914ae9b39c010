"""retry_storm: failing calls retried far faster than the entity normally calls.

Per api_key and per agent, 5-second slots count attempts, failures and *deep* retries
(``retry_attempt`` at or past ``deep_attempt``). A storm is, over the last 20 seconds:

* many attempts fail (``min_failure_share``, 0.4: partial storms bill their successes, and the
  entity's healthy traffic goes on beside the storm), and
* attempts run at ``rate_ratio`` x the entity's learned normal rate or more, with the failures
  alone at half that, and
* either deep retries (at least ``min_deep``) come at ``deep_ratio`` x the entity's normal call rate
  (a client with no backoff climbs to attempt 20 in seconds; proper exponential backoff
  reaches attempt 5 only after half a minute), or the first two hold for ``sustain_seconds``.

A one-minute provider-wide 429 blip answered with exponential backoff stays below both.

>>> from detector.events import UsageEvent
>>> det = RetryStorm()
>>> t0 = 1_700_000_000.0
>>> def ev(t, status="ok", attempt=0):
...     return UsageEvent(event_id=str(t), timestamp=t, team="t", api_key_id="k", provider="openai",
...                       model="gpt-4o", operation="chat", input_tokens=10, output_tokens=10,
...                       status=status, retry_attempt=attempt)
>>> for s in range(1800):  # half an hour at one call every 2 s
...     det.observe(ev(t0 + 2 * s), t0 + 2 * s, 0.001)
...     if s % 5 == 0: _ = det.evaluate(t0 + 2 * s)
>>> start = t0 + 3600
>>> for i in range(200):  # then 10 attempts a second, all failing, attempt numbers climbing
...     t = start + i / 10
...     det.observe(ev(t, "rate_limited", i % 40), t, 0.0)
>>> [f.entity.id for f in det.evaluate(start + 20)]
['k']
"""

from __future__ import annotations

import math
from typing import ClassVar

from detector.detectors.base import EntityStores, Finding, entity_id, keyed_stores, usd
from detector.events import AlertKind, DetectorRef, Entity, EntityType, Evidence, Severity, Status, Usage
from detector.models import DAY, GatedLevel, SlotRing
from detector.state import EntityStore

SLOT = 5.0
WINDOW_SLOTS = 4  # 20 s
SLOTS_PER_MINUTE = 12
WINDOW_CHOICES = (WINDOW_SLOTS, 12)  # 20 s, else 60 s


class AttemptRing(SlotRing):
    FIELDS = ("attempts", "failures", "deep", "spend", "max_attempt")
    attempts: list[float]
    failures: list[float]
    deep: list[float]
    spend: list[float]
    max_attempt: list[float]
    __slots__ = (
        "attempts",
        "deep",
        "failures",
        "hot_last",
        "hot_since",
        "max_attempt",
        "minute_attempts",
        "normal",
        "quiet_until",
        "spend",
        "team",
    )

    def __init__(self, now: float, team: str) -> None:
        super().__init__(SLOT, 24, now)
        self.team = team
        # Attempts per slot, learned once a minute; half-life 30 min; a storm cannot drag it up fast.
        self.normal = GatedLevel(half_life=30, max_step=1.5)
        self.minute_attempts = 0.0
        self.hot_since = math.inf
        self.hot_last = -math.inf
        self.quiet_until = -math.inf

    def on_close(self, slot: int, idx: int) -> None:
        self.minute_attempts += self.attempts[idx]
        if slot % SLOTS_PER_MINUTE == SLOTS_PER_MINUTE - 1:
            if slot * SLOT >= self.quiet_until:
                self.normal.learn(self.minute_attempts / SLOTS_PER_MINUTE)
            self.minute_attempts = 0.0


class RetryStorm(EntityStores):
    """Flags retry storms on api keys and agents."""

    name: ClassVar[str] = "retry_storm"
    version: ClassVar[str] = "1.0"
    DEFAULT_ENTITY_TYPES: ClassVar[tuple[EntityType, ...]] = ("api_key", "agent")

    def __init__(
        self,
        entity_types: tuple[EntityType, ...] = DEFAULT_ENTITY_TYPES,
        min_failure_share: float = 0.4,
        rate_ratio: float = 3.0,
        deep_attempt: int = 5,
        deep_ratio: float = 0.25,
        min_deep: int = 5,
        sustain_seconds: float = 150.0,
        min_failures: int = 10,
        min_normal_per_minute: float = 2.0,
        interval: float = 5.0,
        ttl: float = 2 * DAY,
        max_entities: int = 200_000,
    ) -> None:
        self.entity_types = entity_types
        self.min_failure_share = min_failure_share
        self.rate_ratio = rate_ratio
        self.deep_attempt = deep_attempt
        self.deep_ratio = deep_ratio
        self.min_deep = min_deep
        self.sustain_seconds = sustain_seconds
        self.min_failures = min_failures
        self.min_normal_per_minute = min_normal_per_minute
        self.interval = interval
        self.ttl = ttl
        self.max_entities = max_entities
        self._ref = DetectorRef(name=self.name, version=self.version)
        self._stores: dict[EntityType, EntityStore[AttemptRing]] = {
            t: EntityStore(_new_ring, ttl=ttl, max_entities=max_entities) for t in entity_types
        }
        self._keyed = keyed_stores(self._stores)
        self._dirty: set[tuple[EntityType, str]] = set()

    def adopt(self, old: RetryStorm) -> None:
        self._take_stores(old)
        self._dirty = {d for d in old._dirty if d[0] in self._stores}

    def observe(self, ev: Usage, ts: float, cost: float) -> None:
        slot = int(ts // SLOT)
        failed = ev.status is not Status.OK
        attempt = ev.retry_attempt
        for etype, store, key_of in self._keyed:
            key = key_of(ev)
            if key is None:
                continue
            st = store.get(key, ts)
            if slot > st.slot:
                st.roll(slot)
            i = st.idx
            st.attempts[i] += 1
            st.spend[i] += cost
            if failed:
                st.failures[i] += 1
                if attempt >= self.deep_attempt:
                    st.deep[i] += 1
                if attempt > st.max_attempt[i]:
                    st.max_attempt[i] = attempt
                # An agent or user id may be shared by teams: the owner is the team failing now,
                # not the first that ever failed under that name.
                st.team = ev.team
                self._dirty.add((etype, key))

    def evaluate(self, now: float) -> list[Finding]:
        findings = []
        slot = int(now // SLOT)
        for etype, key in self._dirty:
            st = self._stores[etype].peek(key)
            if st is None:
                continue
            st.roll(slot)
            finding = self._judge(st, etype, key, now)
            if finding is not None:
                findings.append(finding)
            elif st.hot_since != math.inf and st.window("failures", WINDOW_SLOTS + 1) == 0:
                st.hot_since = math.inf
        # Entities keep their place in the dirty set while they fail, so a storm is re-judged
        # every interval; one that went quiet drops out.
        self._dirty = {
            (etype, key)
            for etype, key in self._dirty
            if (st := self._stores[etype].peek(key)) is not None and st.window("failures", WINDOW_SLOTS + 1) > 0
        }
        return findings

    def _judge(self, st: AttemptRing, etype: EntityType, key: str, now: float) -> Finding | None:
        # 20 s for a busy entity; a quiet one (at night) needs a minute to show enough failures.
        slots = next((k for k in WINDOW_CHOICES if st.closed("failures", k) >= self.min_failures), 0)
        if not slots:
            if now - st.hot_last > 2 * SLOT * WINDOW_SLOTS:
                st.hot_since = math.inf
            return None
        failures = st.closed("failures", slots)
        attempts = st.closed("attempts", slots)
        normal = max(st.normal.mean, self.min_normal_per_minute * SLOT / 60) * slots
        share = failures / attempts
        ratio = attempts / normal
        if share < self.min_failure_share or ratio < self.rate_ratio or failures < 0.5 * self.rate_ratio * normal:
            if now - st.hot_last > 2 * SLOT * WINDOW_SLOTS:
                st.hot_since = math.inf
            return None
        st.hot_last = now
        if st.hot_since == math.inf:
            st.hot_since = now - slots * SLOT
        deep = st.closed("deep", slots)
        deep_ratio = deep / normal
        if (deep < self.min_deep or deep_ratio < self.deep_ratio) and now - st.hot_since < self.sustain_seconds:
            return None
        st.quiet_until = now + 300
        window = slots * SLOT
        per_minute = attempts / window * 60
        normal_per_minute = normal / window * 60
        spend_rate = st.closed("spend", slots) / window * 3600
        max_attempt = st.closed_max("max_attempt", slots)
        critical = ratio >= 10 or spend_rate >= 50
        name = f"{etype.replace('_', ' ')} {entity_id(etype, key)}"
        summary = (
            f"{name} is retrying failing calls: {per_minute:,.0f} attempts/min, {ratio:.1f}x its normal "
            f"{normal_per_minute:,.0f}/min, {share:.0%} failing, retry attempt up to {max_attempt:.0f}"
            + (f"; successful calls still bill {usd(spend_rate)}/h." if spend_rate >= 0.01 else ".")
        )
        action = (
            f"Open the breaker on {name} to stop the storm, then fix the client's retry policy "
            "(exponential backoff with jitter, a retry budget, honour Retry-After)."
        )
        return Finding(
            kind=AlertKind.RETRY_STORM,
            entity=Entity(type=etype, id=entity_id(etype, key)),
            team=st.team,
            group=st.team,
            at=now,
            started_at=st.hot_since,
            severity=Severity.CRITICAL if critical else Severity.WARNING,
            score=ratio,
            evidence=Evidence(
                metric="attempts_per_minute",
                baseline=round(normal_per_minute, 3),
                observed=round(per_minute, 3),
                ratio=round(ratio, 2),
                window_seconds=window,
                details={
                    "failure_share": round(share, 3),
                    "deep_retries_per_minute": round(deep / window * 60, 3),
                    "max_retry_attempt": max_attempt,
                },
            ),
            summary=summary,
            cost_rate_usd_per_hour=round(spend_rate, 4),
            excess_usd_per_hour=round(spend_rate * (1 - 1 / ratio), 4),
            recommended_action=action,
            detector=self._ref,
        )


def _new_ring(key: str, now: float) -> AttemptRing:
    return AttemptRing(now, "")
