"""Who owns an alert and what happens to it: the ``[alerting]`` settings and the pure :class:`Responder`.

The responder is the alerting agents' core, in the spirit of the detection engine: no I/O and
no wall clock. For each alert record it finds the owner (the alert's team, or the default owner
when the team is unknown), the first rule that matches the alert's kind and severity, and
whether the rule trips a circuit breaker; it keeps the :class:`~detector.breakers.BreakerBoard`
and the silences that owners' feedback asks for. What it decides (a :class:`Decision`) is
carried out by a shell: Slack and webhooks through the durable outbox, breaker changes to the
breakers topic, or printed by ``--dry-run``.

>>> from detector.settings import Settings
>>> settings = Settings.model_validate({
...     "teams": {"search": {"slack_channel": "C-SEARCH"}},
...     "alerting": {"rules": [{"kind": "retry_storm", "min_severity": "warning", "action": "trip",
...                             "breaker_ttl": "15m"}]},
... })
>>> responder = Responder(settings)
>>> responder.route("search").slack_channel, responder.route("nobody-knows").team
('C-SEARCH', 'platform')
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Literal, get_args

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, SecretStr, model_validator

from detector.alerting.webhooks import WebhookTarget
from detector.breakers import Breaker, BreakerBoard, format_duration, parse_duration
from detector.detectors.base import SCOPED, SEP
from detector.events import (
    Alert,
    AlertKind,
    AlertStatus,
    BreakerChange,
    BreakerEntityType,
    BreakerState,
    Entity,
    FeedbackLabel,
    IncidentFeedback,
    Severity,
    utc_from_epoch,
)

if TYPE_CHECKING:
    from detector.settings import Settings

BREAKABLE = frozenset(get_args(BreakerEntityType))
MAX_REMEMBERED_INCIDENTS = 100_000  # incidents whose ratio a later label can refer to


def pattern_key(entity: Entity, team: str | None) -> str:
    """What silences and tolerances are kept by: the entity, and its team for the kinds teams name."""
    return f"{team}{SEP}{entity}" if entity.type in SCOPED else str(entity)


def _seconds(value: float | str) -> float:
    return parse_duration(value) if isinstance(value, str) else float(value)


Seconds = Annotated[float, BeforeValidator(_seconds, json_schema_input_type=float | str)]  # 900, or "15m", "1h30m"


class Rule(BaseModel):
    """What happens to alerts of one kind (or all: ``*``) from a severity up."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: AlertKind | Literal["*"] = "*"
    min_severity: Severity = Severity.WARNING
    action: Literal["notify", "trip"] = Field(
        default="notify", description="notify: Slack and the alerts topic only; trip: also open the entity's breaker."
    )
    breaker_ttl: Seconds = Field(default=900.0, gt=0, description="How long a tripped breaker stays open (s or '15m').")

    def matches(self, alert: Alert) -> bool:
        return (self.kind == "*" or self.kind == alert.kind) and alert.severity.rank >= self.min_severity.rank


class SlackSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    token: SecretStr | None = Field(
        default=None, description="Bot token (xoxb-...); set STORMWATCH_ALERTING__SLACK__TOKEN rather than the file."
    )
    base_url: str = Field(default="https://slack.com/api/", description="Slack Web API base URL.")


class BreakerSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    max_ttl: Seconds = Field(default=4 * 3600.0, gt=0, description="Cap of the TTL, which doubles on each re-trip.")
    probe_seconds: Seconds = Field(default=300.0, gt=0, description="Quiet half-open time after which it closes.")


def _default_rules() -> list[Rule]:
    return [Rule(kind="*", min_severity=Severity.WARNING, action="notify")]


class AlertingSettings(BaseModel):
    """``[alerting]``: routing defaults, rules, Slack, webhooks and breakers."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dry_run: bool = Field(default=False, description="Decide everything, send nothing: print what would be sent.")
    default_owner: str = Field(default="platform", min_length=1, description="Team that gets alerts of unknown teams.")
    rules: list[Rule] = Field(default_factory=_default_rules, description="First match wins; no match: notify.")
    slack: SlackSettings = Field(default_factory=SlackSettings)
    webhooks: dict[str, WebhookTarget] = Field(default_factory=dict, description="Kill-switch receivers by name.")
    breakers: BreakerSettings = Field(default_factory=BreakerSettings)
    outbox_path: str = Field(
        default="stormwatch-outbox.sqlite",
        description="SQLite file of the durable outbox (what is to be sent, what was sent); keep it on a volume.",
    )
    silence_seconds: float = Field(
        default=24 * 3600.0, ge=0, description="How long a false_alarm or planned label silences the same pattern."
    )
    tolerance_factor: float = Field(
        default=1.5,
        ge=1.0,
        description="After a false_alarm label, the same kind on the same entity alerts only when its ratio "
        "(observed / normal) beats the labelled incident's ratio times this factor ...",
    )
    tolerance_seconds: float = Field(default=30 * 86400.0, ge=0, description="... for this long.")

    @model_validator(mode="after")
    def _ttls_within_the_cap(self) -> AlertingSettings:
        cap = self.breakers.max_ttl
        for i, rule in enumerate(self.rules):
            if rule.action == "trip" and rule.breaker_ttl > cap:
                raise ValueError(
                    f"rules[{i}].breaker_ttl ({format_duration(rule.breaker_ttl)}) is above "
                    f"breakers.max_ttl ({format_duration(cap)}), the most a breaker stays open"
                )
        return self


@dataclass(frozen=True, slots=True)
class Route:
    team: str
    slack_channel: str | None
    oncall: str | None
    webhooks: tuple[str, ...]
    fallback: bool  # the alert's own team is unknown: this is the default owner


@dataclass(frozen=True, slots=True)
class Decision:
    """What one alert record leads to."""

    alert: Alert
    route: Route
    action: Literal["notify", "trip"]
    changes: list[BreakerChange] = field(default_factory=list)
    action_text: str = ""
    silenced_until: float | None = None  # an owner's label silences this pattern: nothing is sent

    @property
    def silenced(self) -> bool:
        return self.silenced_until is not None


class Responder:
    """Routes alerts, applies the rules, keeps breakers and silences. Pure; picklable."""

    def __init__(self, settings: Settings) -> None:
        self.alerting = settings.alerting
        self.teams = settings.teams
        b = settings.alerting.breakers
        self.board = BreakerBoard(ttl=min(900.0, b.max_ttl), max_ttl=b.max_ttl, probe_seconds=b.probe_seconds)
        self.silences: dict[tuple[str, str], float] = {}  # (kind, pattern_key) -> until, epoch seconds
        # (kind, pattern_key) -> (the ratio an alert must beat, until): widened by false_alarm labels
        self.tolerance: dict[tuple[str, str], tuple[float, float]] = {}
        self.ratios: OrderedDict[str, float] = OrderedDict()  # incident -> its highest ratio (bounded)
        self.owners: OrderedDict[str, str] = OrderedDict()  # incident -> its entity's team (bounded)
        self.feedback_seen: OrderedDict[str, None] = OrderedDict()  # label ids taken (bounded, oldest out)

    def configure(self, settings: Settings) -> Responder:
        """Take the settings of this run (a restored responder keeps what it learned, not its old config)."""
        self.alerting, self.teams = settings.alerting, settings.teams
        b = settings.alerting.breakers
        self.board.max_ttl, self.board.probe_seconds = b.max_ttl, b.probe_seconds
        self.board.ttl = min(self.board.ttl, b.max_ttl)
        if isinstance(self.feedback_seen, set):  # pickled by an older version
            self.feedback_seen = OrderedDict.fromkeys(sorted(self.feedback_seen))
        if not hasattr(self, "owners"):  # pickled before agents and sessions were kept per team
            self.owners = OrderedDict()  # its silences of agents, users and sessions name no team: they lapse
        return self

    def route(self, owner: str) -> Route:
        team, fallback = owner, owner not in self.teams
        if fallback:
            team = self.alerting.default_owner
        t = self.teams.get(team)
        if t is None:
            return Route(team, None, None, (), fallback)
        return Route(team, t.slack_channel, t.oncall, tuple(t.webhooks), fallback)

    def rule_for(self, alert: Alert) -> Rule | None:
        return next((r for r in self.alerting.rules if r.matches(alert)), None)

    def decide(self, alert: Alert, now: float) -> Decision:
        """The decision for one alert record at time ``now`` (epoch seconds)."""
        route = self.route(alert.owner)
        pattern = (alert.kind.value, pattern_key(alert.entity, alert.owner))
        self._remember(alert)
        until = self.silences.get(pattern)
        if until is not None and now < until:
            return Decision(alert, route, "notify", action_text="Silenced by an owner's label.", silenced_until=until)
        bar = self.tolerance.get(pattern)
        if bar is not None and now < bar[1] and alert.evidence.ratio < bar[0]:
            text = f"Below the {bar[0]:.1f}x an owner's false-alarm label asks of this entity."
            return Decision(alert, route, "notify", action_text=text, silenced_until=bar[1])
        rule = self.rule_for(alert)
        if rule is None or rule.action == "notify" or alert.status is AlertStatus.RESOLVED:
            return Decision(alert, route, "notify", action_text=self._status_text(alert.entity, alert.owner, now))
        if alert.entity.type not in BREAKABLE:
            text = f"Notify only: a {alert.entity.type} has no breaker."
            return Decision(alert, route, "trip", action_text=text)
        # The breaker's owner is the alert's team, not the routing fallback: gateways match it to the
        # request's team, and an agent's or a session's breaker is that team's alone.
        breaker = self.board.get(alert.entity, alert.owner)
        changes: list[BreakerChange] = []
        if breaker is None or breaker.state is not BreakerState.OPEN:  # an open one is not stretched by updates
            changes = self.board.trip(
                alert.entity,
                now,
                owner=alert.owner,
                reason=alert.explanation.summary,
                incident_id=alert.incident_id,
                ttl=self._trip_ttl(rule, breaker),
            )
        return Decision(alert, route, "trip", changes, self._status_text(alert.entity, alert.owner, now))

    def _trip_ttl(self, rule: Rule, breaker: Breaker | None) -> float | None:
        """The rule's TTL from closed; from half-open None: the board backs off from the last TTL.

        A half-open breaker learned from the topic alone (the responder's file lost) has no last TTL
        (the record of its opening is compacted away): it backs off from the rule's.
        """
        if breaker is None or breaker.state is BreakerState.CLOSED:
            return rule.breaker_ttl
        if not breaker.ttl:
            return min(rule.breaker_ttl * self.board.backoff, self.board.max_ttl)
        return None

    def _status_text(self, entity: Entity, owner: str, now: float) -> str:
        breaker = self.board.get(entity, owner)
        if breaker is None:
            return "Notify only: no breaker tripped."
        if breaker.state is BreakerState.CLOSED:
            return f"Breaker on {entity} closed again at {utc_from_epoch(breaker.since):%H:%M} UTC ({breaker.reason})."
        if breaker.state is BreakerState.HALF_OPEN:
            return f"Breaker on {entity} is half-open: probing."
        expires = breaker.expires_at
        if expires is None or math.isinf(expires):
            return f"Breaker opened on {entity} until closed by hand."
        left = format_duration(max(0.0, expires - now))
        return f"Breaker opened on {entity} until {utc_from_epoch(expires):%H:%M} UTC ({left} from now)."

    def _remember(self, alert: Alert) -> None:
        """The incident's highest ratio (what a false-alarm label widens) and its team (labels may not say)."""
        ratios, owners = self.ratios, self.owners
        ratios[alert.incident_id] = max(ratios.pop(alert.incident_id, 0.0), alert.evidence.ratio)
        owners[alert.incident_id] = alert.owner
        owners.move_to_end(alert.incident_id)
        if len(ratios) > MAX_REMEMBERED_INCIDENTS:
            ratios.popitem(last=False)
        if len(owners) > MAX_REMEMBERED_INCIDENTS:
            owners.popitem(last=False)

    def advance(self, now: float) -> list[BreakerChange]:
        """Breakers that expire or close by time, and silences and tolerances that end."""
        self.silences = {k: until for k, until in self.silences.items() if until > now}
        self.tolerance = {k: bar for k, bar in self.tolerance.items() if bar[1] > now}
        return self.board.advance(now)

    def apply_feedback(self, feedback: IncidentFeedback, now: float) -> list[BreakerChange]:
        """An owner's label: a false alarm or planned work silences the pattern and closes its breaker.

        A false alarm also widens the entity's tolerance: for ``tolerance_seconds`` the same kind on
        the same entity only alerts past ``tolerance_factor`` times the labelled incident's ratio.
        """
        if feedback.feedback_id in self.feedback_seen:
            return []
        self.feedback_seen[feedback.feedback_id] = None
        if len(self.feedback_seen) > MAX_REMEMBERED_INCIDENTS:
            self.feedback_seen.popitem(last=False)
        if feedback.label is FeedbackLabel.REAL:
            return []
        seconds = feedback.silence_seconds or self.alerting.silence_seconds
        team = self._team_of(feedback)
        if team is not None or feedback.entity.type not in SCOPED:
            pattern = (feedback.kind.value, pattern_key(feedback.entity, team))
            self.silences[pattern] = now + seconds
            ratio = self.ratios.get(feedback.incident_id)
            if feedback.label is FeedbackLabel.FALSE_ALARM and ratio is not None:
                a = self.alerting
                self.tolerance[pattern] = (ratio * a.tolerance_factor, now + a.tolerance_seconds)
        # else: whose user, agent or session is it? Not known (a label from before labels carried the
        # team, of an incident forgotten since): no silence, lest another team's of that name be silenced.
        breaker = self.board.get(feedback.entity, team) if team is not None else None
        if breaker is None or breaker.state is BreakerState.CLOSED:
            breaker = self._incident_breaker(feedback)
        if breaker is None or breaker.state is BreakerState.CLOSED or feedback.entity.type not in BREAKABLE:
            return []
        note = f": {feedback.note}" if feedback.note else ""
        reason = f"labelled {feedback.label.value} by {feedback.actor}{note}"
        return self.board.close(feedback.entity, now, owner=breaker.owner, reason=reason, actor=feedback.actor)

    def _incident_breaker(self, feedback: IncidentFeedback) -> Breaker | None:
        """The open breaker on the labelled entity that the labelled incident tripped, whoever owns it.

        A breaker tripped before breakers were per team is owned by the team its alert was routed
        to (the default owner, for a team with no routing of its own), not by the label's team.
        """
        return next(
            (
                b
                for b in self.board.on(feedback.entity)
                if b.state is not BreakerState.CLOSED and b.incident_id == feedback.incident_id
            ),
            None,
        )

    def _team_of(self, feedback: IncidentFeedback) -> str | None:
        """The labelled entity's team: the label's own, else the incident's, else the only breaker's on it."""
        if feedback.team is not None:
            return feedback.team
        if feedback.entity.type == "team":
            return feedback.entity.id
        team = self.owners.get(feedback.incident_id)
        if team is None:  # the only refusing breaker's (a closed one may be a week old and another team's)
            owners = [b.owner for b in self.board.on(feedback.entity) if b.state is not BreakerState.CLOSED]
            team = owners[0] if len(owners) == 1 else None
        return team
