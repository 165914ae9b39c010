"""budget_burn: a team spends its monthly budget far faster than the month allows.

Multi-window burn rates, as in SRE error-budget alerting: the burn rate is spend over a
window divided by the budget's fair share of that window (1.0 spends exactly the budget by
month end). An alert needs a long and a short window both past the threshold, so it starts
fast and stops fast:

=========  ============  ==============  ====================================================
severity   long window   short window    burn
=========  ============  ==============  ====================================================
critical   1 h           5 min           14.4 (2% of the month's budget in an hour)
warning    6 h           30 min          2.0, and the month-end forecast exceeds the budget
=========  ============  ==============  ====================================================

The forecast is month-to-date spend (as seen since the detector started, or as configured)
plus the last 6 h rate for the rest of the month.

>>> from detector.events import UsageEvent
>>> det = BudgetBurn(budgets={"search": 3000.0})
>>> t0 = 1_793_750_400.0  # 2026-11-04 00:00 UTC
>>> def ev(t):
...     return UsageEvent(event_id=str(t), timestamp=t, team="search", api_key_id="k",
...                       provider="openai", model="gpt-4o", operation="chat", input_tokens=1000,
...                       output_tokens=100, status="ok")
>>> for m in range(8 * 60):  # $1 a minute: the month's $3000 gone in about two days
...     det.observe(ev(t0 + 60 * m), t0 + 60 * m, 1.0)
>>> [(f.severity.value, f.evidence.metric) for f in det.evaluate(t0 + 8 * 3600)]
[('warning', 'burn_rate_6h')]
"""

from __future__ import annotations

import calendar
from datetime import UTC, datetime
from typing import ClassVar

from detector.detectors.base import Finding, usd
from detector.events import AlertKind, DetectorRef, Entity, Evidence, Severity, Usage
from detector.models import DAY, HOUR, SlotRing

MINUTE = 60.0


class TeamSpend(SlotRing):
    FIELDS = ("spend",)
    spend: list[float]
    __slots__ = ("month", "month_end", "month_to_date", "spend")

    def __init__(self, now: float, month_to_date: float) -> None:
        super().__init__(MINUTE, int(6 * HOUR / MINUTE) + 1, now)
        self.month = _month(now)
        self.month_end = _month_end(now)
        self.month_to_date = month_to_date

    def turn_month(self, ts: float) -> None:
        """At ``ts`` (the first event or tick of a month since the last): month-to-date starts again at zero."""
        if ts >= self.month_end:
            self.month, self.month_end, self.month_to_date = _month(ts), _month_end(ts), 0.0


class BudgetBurn:
    """Flags teams burning their monthly budget too fast."""

    name: ClassVar[str] = "budget_burn"
    version: ClassVar[str] = "1.0"

    def __init__(
        self,
        budgets: dict[str, float] | None = None,
        spent_to_date: dict[str, float] | None = None,
        fast_burn: float = 14.4,
        slow_burn: float = 2.0,
        interval: float = 60.0,
    ) -> None:
        self.budgets = dict(budgets or {})
        self.spent_to_date = dict(spent_to_date or {})
        self.fast_burn = fast_burn
        self.slow_burn = slow_burn
        self.interval = interval
        self._ref = DetectorRef(name=self.name, version=self.version)
        self.teams: dict[str, TeamSpend] = {}

    def adopt(self, old: BudgetBurn) -> None:
        # Month-to-date spend carries over; a team whose budget was removed is no longer judged.
        self.teams = {team: st for team, st in old.teams.items() if team in self.budgets}
        for st in self.teams.values():
            if not hasattr(st, "month_end"):  # a snapshot from before month_end was kept
                year, month = st.month
                st.month_end = datetime(year + month // 12, month % 12 + 1, 1, tzinfo=UTC).timestamp()

    def observe(self, ev: Usage, ts: float, cost: float) -> None:
        st = self.teams.get(ev.team)
        if st is None:
            if ev.team not in self.budgets:
                return
            st = self.teams[ev.team] = TeamSpend(ts, self.spent_to_date.get(ev.team, 0.0))
        slot = int(ts // MINUTE)
        if slot > st.slot:
            st.roll(slot)
        if ts >= st.month_end:  # checked on every event: the tick may have rolled the ring into the month
            st.turn_month(ts)
        st.spend[st.idx] += cost
        st.month_to_date += cost

    def evaluate(self, now: float) -> list[Finding]:
        findings = []
        for team, st in self.teams.items():
            st.roll(int(now // MINUTE))
            st.turn_month(now)
            finding = self._judge(team, st, now)
            if finding is not None:
                findings.append(finding)
        return findings

    def _judge(self, team: str, st: TeamSpend, now: float) -> Finding | None:
        budget = self.budgets[team]
        month_seconds = _month_seconds(now)

        def burn(minutes: int) -> float:
            return st.closed("spend", minutes) / (budget * minutes * MINUTE / month_seconds)

        remaining = _month_end(now) - now
        rate_6h = st.closed("spend", 360) / (6 * HOUR)
        forecast = st.month_to_date + rate_6h * remaining
        if burn(60) >= self.fast_burn and burn(5) >= self.fast_burn:
            severity, metric, burn_now, window = Severity.CRITICAL, "burn_rate_1h", burn(60), HOUR
        elif burn(360) >= self.slow_burn and burn(30) >= self.slow_burn and forecast > budget:
            severity, metric, burn_now, window = Severity.WARNING, "burn_rate_6h", burn(360), 6 * HOUR
        else:
            return None
        rate = st.closed("spend", 60) / HOUR * 3600
        fair = budget / month_seconds * 3600
        days_left = max(budget - st.month_to_date, 0.0) / max(rate_6h, 1e-12) / DAY
        summary = (
            f"team {team} is burning its {usd(budget)} monthly budget at {burn_now:.1f}x the sustainable "
            f"rate ({usd(rate)}/h against {usd(fair)}/h); at this pace the rest lasts {days_left:.1f} days "
            f"and the month ends at {usd(forecast)}."
        )
        return Finding(
            kind=AlertKind.BUDGET_BURN,
            entity=Entity(type="team", id=team),
            team=team,
            group=team,
            at=now,
            started_at=now - window,
            severity=severity,
            score=burn_now,
            evidence=Evidence(
                metric=metric,
                baseline=1.0,
                observed=round(burn_now, 3),
                ratio=round(burn_now, 3),
                window_seconds=window,
                details={
                    "budget_usd": budget,
                    "month_to_date_usd": round(st.month_to_date, 2),
                    "forecast_month_end_usd": round(forecast, 2),
                    "burn_rate_5m": round(burn(5), 3),
                    "burn_rate_30m": round(burn(30), 3),
                    "burn_rate_1h": round(burn(60), 3),
                    "burn_rate_6h": round(burn(360), 3),
                },
            ),
            summary=summary,
            cost_rate_usd_per_hour=round(rate, 4),
            excess_usd_per_hour=round(max(rate - fair, 0.0), 4),
            recommended_action=(
                f"Ask team {team} whether this spend is planned; if not, find its top keys and cap them, "
                "or raise the budget in the config if it is."
            ),
            detector=self._ref,
        )

    def evict(self, now: float) -> int:
        return 0  # one entry per budgeted team: bounded by the config

    def pin(self, entity: Entity, team: str, pinned: bool) -> None:
        pass

    def entity_count(self) -> int:
        return len(self.teams)


def _month(ts: float) -> tuple[int, int]:
    d = datetime.fromtimestamp(ts, UTC)
    return d.year, d.month


def _month_seconds(ts: float) -> float:
    year, month = _month(ts)
    return calendar.monthrange(year, month)[1] * DAY


def _month_end(ts: float) -> float:
    year, month = _month(ts)
    nxt = datetime(year + month // 12, month % 12 + 1, 1, tzinfo=UTC)
    return nxt.timestamp()
