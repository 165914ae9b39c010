"""The messages Stormwatch reads and writes.

Every model here is a public contract: its JSON Schema is generated into ``schemas/`` by
``detector schemas --write`` and a test fails when the two drift apart.

>>> ev = UsageEvent.model_validate_json(
...     b'{"event_id":"e1","timestamp":"2026-11-02T09:30:00Z","team":"search","api_key_id":"k1",'
...     b'"provider":"openai","model":"gpt-4o","operation":"chat","input_tokens":1200,'
...     b'"output_tokens":300,"status":"ok","colour":"ignored"}')
>>> ev.team, ev.input_tokens, ev.retry_attempt
('search', 1200, 0)
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Literal, Protocol

from pydantic import AfterValidator, AwareDatetime, BaseModel, ConfigDict, Field, model_validator

SCHEMA_BASE = "https://stormwatch.dev/schemas"

# Sanity bounds: a value past these is a broken producer, not an expensive request.
MAX_TOKENS = 50_000_000
MAX_COST_USD = 100_000.0
MAX_RETRY_ATTEMPT = 10_000


def check_token_subsets(
    input_tokens: int, output_tokens: int, cached_input_tokens: int | None, reasoning_tokens: int | None
) -> None:
    """The contract's cross-field rule: cached and reasoning tokens are parts of input and output."""
    if cached_input_tokens is not None and cached_input_tokens > input_tokens:
        raise ValueError("cached_input_tokens exceeds input_tokens")
    if reasoning_tokens is not None and reasoning_tokens > output_tokens:
        raise ValueError("reasoning_tokens exceeds output_tokens")


def _to_utc(value: datetime) -> datetime:
    return value.astimezone(UTC)


UtcDatetime = Annotated[AwareDatetime, AfterValidator(_to_utc)]
Id = Annotated[str, Field(min_length=1, max_length=256)]
# A team's name keys the state of its users, agents and sessions ("<team>\x1f<id>"): no control characters.
TEAM_PATTERN = r"^[^\x00-\x1f\x7f]+$"
TeamName = Annotated[str, Field(min_length=1, max_length=256, pattern=TEAM_PATTERN)]
Tokens = Annotated[int, Field(ge=0, le=MAX_TOKENS)]


class Status(StrEnum):
    OK = "ok"
    ERROR = "error"
    RATE_LIMITED = "rate_limited"
    TIMEOUT = "timeout"


class UsageEvent(BaseModel):
    """One LLM request or tool call, as a gateway or SDK reports it.

    Unknown fields are ignored so producers can add their own without breaking us.
    """

    model_config = ConfigDict(
        extra="ignore",
        frozen=True,
        title="Token-usage event v1",
        json_schema_extra={"$id": f"{SCHEMA_BASE}/usage-event.v1.json"},
    )

    event_id: Id = Field(description="Unique id of this request; used to drop duplicates downstream.")
    timestamp: AwareDatetime = Field(description="When the request finished, RFC 3339 with an offset (Z for UTC).")
    team: TeamName = Field(description="Owning team; alerts are routed to it. No control characters.")
    api_key_id: Id = Field(description="Id (never the secret) of the API key that made the call.")
    provider: Id = Field(description="openai, anthropic, google, azure, bedrock, ...")
    model: Id = Field(description="Model name as billed, e.g. gpt-4o-2024-08-06.")
    operation: Id = Field(description="chat, completion, embedding, tool, ...")
    input_tokens: Tokens = Field(description="Prompt tokens billed, including cached ones.")
    output_tokens: Tokens = Field(description="Completion tokens billed, including reasoning ones.")
    status: Status

    user: Id | None = None
    agent_id: Id | None = None
    session_id: Id | None = None
    trace_id: Id | None = None
    cached_input_tokens: Tokens | None = Field(default=None, description="Subset of input_tokens.")
    reasoning_tokens: Tokens | None = Field(default=None, description="Subset of output_tokens.")
    cost_usd: float | None = Field(
        default=None, ge=0, le=MAX_COST_USD, description="When absent, computed from the price catalog."
    )
    latency_ms: float | None = Field(default=None, ge=0)
    http_status: int | None = Field(default=None, ge=100, le=599)
    error_type: str | None = Field(default=None, max_length=256)
    retry_attempt: int = Field(default=0, ge=0, le=MAX_RETRY_ATTEMPT, description="0 = first try.")
    request_fingerprint: str | None = Field(
        default=None,
        max_length=256,
        description="Hash of the new part of the request; equal values in one session are repeats.",
    )
    tool_name: str | None = Field(default=None, max_length=256)
    labels: dict[str, str] | None = Field(default=None, description="Free tags such as feature or project.")

    @model_validator(mode="after")
    def _subsets(self) -> UsageEvent:
        check_token_subsets(self.input_tokens, self.output_tokens, self.cached_input_tokens, self.reasoning_tokens)
        return self


class Usage(Protocol):
    """What the engine reads of an event: a :class:`UsageEvent`, or the faster-decoded
    :class:`detector.wire.UsageRecord` of the same contract."""

    @property
    def event_id(self) -> str: ...
    @property
    def timestamp(self) -> datetime: ...
    @property
    def team(self) -> str: ...
    @property
    def api_key_id(self) -> str: ...
    @property
    def provider(self) -> str: ...
    @property
    def model(self) -> str: ...
    @property
    def operation(self) -> str: ...
    @property
    def input_tokens(self) -> int: ...
    @property
    def output_tokens(self) -> int: ...
    @property
    def status(self) -> Status: ...
    @property
    def user(self) -> str | None: ...
    @property
    def agent_id(self) -> str | None: ...
    @property
    def session_id(self) -> str | None: ...
    @property
    def cached_input_tokens(self) -> int | None: ...
    @property
    def cost_usd(self) -> float | None: ...
    @property
    def retry_attempt(self) -> int: ...
    @property
    def request_fingerprint(self) -> str | None: ...
    @property
    def tool_name(self) -> str | None: ...


class AlertKind(StrEnum):
    COST_SPIKE = "cost_spike"
    BUDGET_BURN = "budget_burn"
    RETRY_STORM = "retry_storm"
    AGENT_LOOP = "agent_loop"


class AlertStatus(StrEnum):
    FIRING = "firing"
    UPDATED = "updated"
    RESOLVED = "resolved"


class Severity(StrEnum):
    INFO = "info"
    WARNING = "warning"
    CRITICAL = "critical"

    @property
    def rank(self) -> int:
        return _SEVERITY_RANK[self]


_SEVERITY_RANK = {Severity.INFO: 0, Severity.WARNING: 1, Severity.CRITICAL: 2}

EntityType = Literal["team", "api_key", "user", "agent", "session", "model"]


class Entity(BaseModel):
    model_config = ConfigDict(frozen=True)

    type: EntityType
    id: Id

    def __str__(self) -> str:
        return f"{self.type}:{self.id}"


def _finite(x: float) -> float:
    """JSON has no inf or NaN (they would go out as null, against the schema): a ratio over a zero baseline is huge."""
    if math.isnan(x):
        return 0.0
    return x if math.isfinite(x) else math.copysign(HUGE, x)


HUGE = 1e12  # what an infinite ratio is written as
Finite = Annotated[float, AfterValidator(_finite)]


class Evidence(BaseModel):
    """Baseline against observation, in the detector's own metric."""

    model_config = ConfigDict(frozen=True)

    metric: str = Field(description="What was measured, e.g. spend_usd_per_hour or attempts_per_minute.")
    baseline: Finite = Field(description="What was normal for this entity at this time.")
    observed: Finite = Field(description="What happened in the detection window.")
    ratio: Finite = Field(description="observed / baseline (1e12 where the baseline is zero).")
    window_seconds: Finite
    details: dict[str, Finite] = Field(default_factory=dict, description="Further numbers behind the call.")


class Contributor(BaseModel):
    model_config = ConfigDict(frozen=True)

    entity: Entity
    cost_usd: float = Field(description="Spend of this contributor in the detection window.")
    share: float = Field(ge=0, le=1, description="Fraction of the window's spend.")


class Explanation(BaseModel):
    model_config = ConfigDict(frozen=True)

    summary: str = Field(description="One plain sentence a person can act on.")
    top_contributors: list[Contributor] = Field(default_factory=list)


class DetectorRef(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str
    version: str


class Alert(BaseModel):
    """One lifecycle record of an incident: firing, then updated when it worsens, then resolved."""

    model_config = ConfigDict(
        frozen=True,
        title="Alert v1",
        json_schema_extra={"$id": f"{SCHEMA_BASE}/alert.v1.json"},
    )

    alert_id: str = Field(description="Unique per record; derived from incident_id and sequence.")
    incident_id: str = Field(description="Stable for the life of one incident.")
    sequence: int = Field(ge=0, description="0 for firing, then 1, 2, ... for each later record.")
    kind: AlertKind
    status: AlertStatus
    severity: Severity
    entity: Entity
    owner: str = Field(description="Team that owns the entity and receives the alert.")
    detected_at: UtcDatetime = Field(description="Event time at which this record was produced.")
    started_at: UtcDatetime = Field(description="Event time at which the anomaly began.")
    resolved_at: UtcDatetime | None = None
    evidence: Evidence
    explanation: Explanation
    cost_rate_usd_per_hour: float = Field(description="Current spend rate of the entity.")
    excess_cost_usd: float = Field(ge=0, description="Spend above baseline since started_at.")
    recommended_action: str
    detector: DetectorRef
    related_incidents: list[str] = Field(
        default_factory=list, description="Open incidents of other kinds or entities with the same cause."
    )


class IncidentLabel(BaseModel):
    """Ground truth for one injected incident, written by ``detector simulate``."""

    model_config = ConfigDict(
        frozen=True,
        title="Incident label v1",
        json_schema_extra={"$id": f"{SCHEMA_BASE}/incident-label.v1.json"},
    )

    label_id: str
    kind: AlertKind | Literal["benign"] = Field(description="benign marks a look-alike that must stay quiet.")
    scenario: str = Field(description="e.g. premium_model_switch, nightly_batch, provider_429_blip.")
    entity: Entity
    team: str
    start: UtcDatetime
    end: UtcDatetime


class BreakerState(StrEnum):
    CLOSED = "closed"  # traffic flows
    OPEN = "open"  # traffic refused until expires_at
    HALF_OPEN = "half_open"  # a probe is allowed; the entity's behaviour decides


BreakerEntityType = Literal["team", "api_key", "agent", "session"]


class BreakerChange(BaseModel):
    """One change of a circuit breaker: the value on the compacted breakers topic and the kill-switch webhook body.

    The topic's key is ``<entity type>:<entity id>`` for a team or an API key and
    ``<entity type>:<owner>/<entity id>`` for an agent or a session (teams name those, so each
    team's is its own breaker; ``%`` and ``/`` in the owner are written ``%25`` and ``%2F``): the
    newest change per key is that breaker's current state.
    """

    model_config = ConfigDict(
        frozen=True,
        title="Breaker change v1",
        json_schema_extra={"$id": f"{SCHEMA_BASE}/breaker-change.v1.json"},
    )

    change_id: str = Field(description="Unique per change; the webhook-id, so receivers can drop repeats.")
    entity: Entity = Field(description="What the breaker guards: a team, api_key, agent or session.")
    owner: str = Field(description="Team that owns the entity; an agent's or a session's breaker is this team's alone.")
    state: BreakerState = Field(description="State after this change.")
    previous_state: BreakerState
    version: int = Field(ge=1, description="Counts the changes of this entity's breaker; a higher one wins.")
    changed_at: UtcDatetime
    expires_at: UtcDatetime | None = Field(
        default=None, description="When an open breaker turns half-open by itself (None: until closed by hand)."
    )
    reason: str = Field(description="Why, in one sentence a person can act on.")
    incident_id: str | None = Field(default=None, description="The incident that tripped it, if any.")
    actor: str = Field(description="'stormwatch' for policy, else the person or system that changed it.")


class FeedbackLabel(StrEnum):
    REAL = "real"
    FALSE_ALARM = "false_alarm"
    PLANNED = "planned"


class IncidentFeedback(BaseModel):
    """An owner's verdict on an incident; a false alarm or planned activity silences its pattern for a while."""

    model_config = ConfigDict(
        frozen=True,
        title="Incident feedback v1",
        json_schema_extra={"$id": f"{SCHEMA_BASE}/incident-feedback.v1.json"},
    )

    feedback_id: str
    incident_id: str
    kind: AlertKind
    entity: Entity
    team: str | None = Field(
        default=None,
        description="The incident's team (alert owner): agents, users and sessions are per team. Labels "
        "without it are matched to the incident's team by the alerter.",
    )
    label: FeedbackLabel
    actor: str = Field(description="Who labelled it.")
    labelled_at: UtcDatetime
    silence_seconds: float = Field(
        default=0, ge=0, description="How long the same pattern on this entity stays quiet (false_alarm, planned)."
    )
    note: str = ""


def utc_from_epoch(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


CONTRACTS: dict[str, type[BaseModel]] = {
    "usage-event.v1.json": UsageEvent,
    "alert.v1.json": Alert,
    "incident-label.v1.json": IncidentLabel,
    "breaker-change.v1.json": BreakerChange,
    "incident-feedback.v1.json": IncidentFeedback,
}
