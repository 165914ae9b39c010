"""``[kafka]`` settings of ``detector worker``: broker, topics, group, security, worker pacing.

Read like every other setting: from the ``[kafka]`` table of the TOML file, overridden by
``STORMWATCH_KAFKA__<FIELD>`` variables (``STORMWATCH_KAFKA__BOOTSTRAP_SERVERS=k1:9092,k2:9092``).

>>> k = KafkaSettings(bootstrap_servers="k1:9092, kafka://k2:9093")
>>> k.broker_urls(), k.usage_topic, k.group_id
(['kafka://k1:9092', 'kafka://k2:9093'], 'llm.usage', 'stormwatch')
>>> KafkaSettings(security_protocol="SASL_SSL")
Traceback (most recent call last):
...
pydantic_core._pydantic_core.ValidationError: 1 validation error for KafkaSettings
  Value error, security_protocol SASL_SSL needs sasl_mechanism, sasl_username and sasl_password ...
...
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

TopicName = str


class KafkaSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    bootstrap_servers: str = Field(
        default="localhost:9092",
        min_length=1,
        description="Comma-separated host:port list (a kafka:// prefix is accepted).",
    )
    group_id: str = Field(
        default="stormwatch", min_length=1, description="Consumer group, also the Faust app id; workers share it."
    )
    usage_topic: TopicName = Field(default="llm.usage", min_length=1, description="Usage events in (JSON).")
    alerts_topic: TopicName = Field(
        default="llm.alerts", min_length=1, description="Alert records out, keyed by incident_id."
    )
    breakers_topic: TopicName = Field(
        default="llm.breakers",
        min_length=1,
        description="Circuit-breaker changes (compacted), written by `detector alerter` and `detector breaker`.",
    )
    state_topic: TopicName = Field(
        default="stormwatch.state",
        min_length=1,
        description="Engine snapshots (compacted), one record per usage partition, key '<usage_topic>:<partition>'.",
    )
    repartition_by_team: bool = Field(
        default=True,
        description="Forward each valid usage event to team_topic, keyed by team, where the team-level "
        "judgements (budget_burn, team cost spikes) run: a team spread over many usage partitions is "
        "judged as a whole. Off: each usage partition judges its share of a team (fine when producers "
        "key by team).",
    )
    team_topic: TopicName | None = Field(
        default=None, description="The by-team repartition topic (default: '<usage_topic>.by-team')."
    )
    dlq_topic: TopicName = Field(
        default="llm.usage.dlq", min_length=1, description="Rejected usage messages, original bytes, reason in headers."
    )
    partitions: int = Field(default=8, ge=1, description="Partitions of topics the worker creates when missing.")
    replication_factor: int = Field(default=1, ge=1, description="Replication of topics the worker creates.")
    alerts_retention_days: float = Field(default=7.0, gt=0, description="retention.ms of the alerts topic.")
    dlq_retention_days: float = Field(default=14.0, gt=0, description="retention.ms of the dead-letter topic.")
    auto_offset_reset: Literal["earliest", "latest"] = Field(
        default="earliest", description="Where a new consumer group starts reading the usage topic."
    )

    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_cafile: Path | None = Field(default=None, description="CA bundle to verify the brokers (default: system CAs).")
    ssl_certfile: Path | None = Field(default=None, description="Client certificate, for mutual TLS.")
    ssl_keyfile: Path | None = Field(default=None, description="Key of the client certificate.")

    data_dir: Path | None = Field(
        default=None, description="Faust's data directory (default: ./<group_id>-data); no state is kept there yet."
    )
    web_port: int | None = Field(
        default=None,
        ge=1,
        le=65535,
        description="The worker's dashboard, JSON API, /healthz, /readyz and /metrics on [web] host:PORT "
        "(served as the Faust app's web server); unset: none.",
    )
    idle_advance_after_seconds: float = Field(
        default=3.0,
        gt=0,
        description="After this much wall-clock time without events, event time advances with the wall clock "
        "so that due alerts (and resolutions) still come out when traffic stops.",
    )
    align_wait_seconds: float = Field(
        default=3.0,
        gt=0,
        description="By-team stage: how long (wall clock) a silent usage partition may hold back the events of "
        "the others, which wait to be judged in event-time order (see detector.worker.align).",
    )
    align_max_held_events: int = Field(
        default=20_000,
        ge=0,
        description="By-team stage: at most this many events wait per partition; past it the oldest go on, late.",
    )
    session_timeout_seconds: float = Field(
        default=60.0,
        ge=6.0,
        description="Consumer-group session timeout: how long a dead worker keeps its partitions before the "
        "others take them over (the broker's group.min.session.timeout.ms is 6 s by default).",
    )
    snapshot_every_seconds: float = Field(
        default=10.0,
        gt=0,
        description="Wall-clock period of engine snapshots to the state topic (also written on graceful shutdown "
        "and when partitions are revoked). A crash re-processes at most this much traffic.",
    )
    snapshot_max_bytes: int = Field(
        default=64 * 1024 * 1024,
        ge=1024 * 1024,
        description="max.message.bytes of the state topic and the producer's max request size: "
        "the largest compressed snapshot of one partition's engine.",
    )
    summary_every_seconds: float = Field(default=60.0, gt=0, description="Period of the one-line summary log.")

    @model_validator(mode="after")
    def _security_complete(self) -> KafkaSettings:
        if self.security_protocol.startswith("SASL_") and not (
            self.sasl_mechanism and self.sasl_username and self.sasl_password
        ):
            raise ValueError(
                f"security_protocol {self.security_protocol} needs sasl_mechanism, sasl_username and sasl_password"
            )
        if (self.ssl_certfile is None) != (self.ssl_keyfile is None):
            raise ValueError("ssl_certfile and ssl_keyfile go together")
        return self

    @property
    def by_team_topic(self) -> str:
        return self.team_topic or f"{self.usage_topic}.by-team"

    def hosts(self) -> list[str]:
        """The bootstrap servers as aiokafka takes them: host:port, one per server."""
        return [h.strip().removeprefix("kafka://") for h in self.bootstrap_servers.split(",") if h.strip()]

    def broker_urls(self) -> list[str]:
        """Faust broker URLs, one per bootstrap server."""
        return [f"kafka://{h}" for h in self.hosts()]
