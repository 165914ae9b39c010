"""One typed settings object, from a TOML file and ``STORMWATCH_*`` environment variables.

Environment variables win over the file (``STORMWATCH_TEAMS__SEARCH__MONTHLY_BUDGET_USD=5000``).
A bad value is refused at start, naming the field:

>>> Settings.model_validate({"detectors": {"retry_storm": {"rate_ratio": "lots"}}})
Traceback (most recent call last):
...
pydantic_core._pydantic_core.ValidationError: 1 validation error for Settings
detectors.retry_storm.rate_ratio
  Input should be a valid number, unable to parse string as a number [type=float_parsing, ...
...
"""

from __future__ import annotations

import inspect
import tomllib
from pathlib import Path
from typing import Annotated, Any, get_type_hints

import yaml  # type: ignore[import-untyped]
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, create_model, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from detector.alerting.policy import AlertingSettings
from detector.detectors.agent_loop import AgentLoop
from detector.detectors.budget_burn import BudgetBurn
from detector.detectors.cost_spike import CostSpike
from detector.detectors.retry_storm import RetryStorm
from detector.pricing import ModelPrices
from detector.worker.config import KafkaSettings

TUNABLE = {cls.name: cls for cls in (CostSpike, RetryStorm, AgentLoop, BudgetBurn)}
_NOT_TUNABLE = {"self", "budgets", "spent_to_date"}  # budgets come from [teams.*]


def _params_model(cls: type) -> type[BaseModel]:
    """A pydantic model of a detector's constructor arguments: one source of truth for both.

    Every number is a ratio, an amount, a duration or a count, so it must be finite and above zero
    (``min_*`` floors may be zero): a negative threshold or a zero interval is refused at start.
    """
    hints = get_type_hints(cls.__init__)  # type: ignore[misc]
    fields: dict[str, Any] = {}
    for name, p in inspect.signature(cls.__init__).parameters.items():  # type: ignore[misc]
        if name in _NOT_TUNABLE:
            continue
        kind = hints[name]
        if kind in (int, float):
            bound = {"ge": 0} if name.startswith("min_") else {"gt": 0}
            kind = Annotated[kind, Field(allow_inf_nan=False, **bound)]  # type: ignore[call-overload]
        fields[name] = (kind, p.default)
    return create_model(f"{cls.__name__}Params", __config__=ConfigDict(extra="forbid"), **fields)


PARAMS = {name: _params_model(cls) for name, cls in TUNABLE.items()}
DetectorParams: type[BaseModel] = create_model(
    "DetectorParams",
    __config__=ConfigDict(extra="forbid"),
    **{name: (model, Field(default_factory=model)) for name, model in PARAMS.items()},  # type: ignore[call-overload]
)


class TeamSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    monthly_budget_usd: float | None = Field(default=None, gt=0, description="Enables budget_burn for the team.")
    spent_to_date_usd: float = Field(default=0.0, ge=0, description="Month-to-date spend before Stormwatch started.")
    slack_channel: str | None = Field(default=None, description="Slack channel id (C...) of the team's alerts.")
    oncall: str | None = Field(default=None, description="Slack user id (U...) mentioned on critical alerts.")
    webhooks: list[str] = Field(
        default_factory=list, description="Names of [alerting.webhooks] receivers told of the team's breakers."
    )


class WebSettings(BaseModel):
    """``[web]``: the dashboard, JSON API and /metrics (``detector demo --serve``, ``replay --serve``, the worker)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = Field(default="127.0.0.1", description="Listen address; loopback unless you put a proxy in front.")
    port: int = Field(default=8080, ge=0, le=65535, description="Listen port (0: any free port).")
    allowed_hosts: list[str] = Field(
        default_factory=list,
        description="Host names the server answers to, a guard against DNS rebinding; others get 421. "
        'Empty: localhost, 127.0.0.1 and ::1 when listening on loopback, any otherwise; ["*"]: any.',
    )
    api_token: SecretStr | None = Field(
        default=None,
        description="Bearer token for changes (breakers, feedback); unset: the API is read-only. "
        "Set STORMWATCH_WEB__API_TOKEN rather than the file.",
    )


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="STORMWATCH_", env_nested_delimiter="__", extra="forbid", frozen=True)

    teams: dict[str, TeamSettings] = Field(default_factory=dict, description="Per-team budgets, keyed by team.")
    pricing: dict[str, ModelPrices] = Field(
        default_factory=dict, description="Price overrides and additions, USD per 1M tokens, by model-name prefix."
    )
    detectors: DetectorParams = Field(
        default_factory=DetectorParams,
        description="Per-detector parameters, named as the detector's constructor arguments.",
    )
    tick_seconds: float = Field(default=5.0, gt=0, description="Event-time step at which detectors are judged.")
    kafka: KafkaSettings = Field(
        default_factory=KafkaSettings, description="Broker, topics and pacing of `detector worker`."
    )
    web: WebSettings = Field(default_factory=WebSettings, description="Dashboard, API and metrics server.")
    alerting: AlertingSettings = Field(
        default_factory=AlertingSettings, description="Routing, rules, Slack, kill-switch webhooks and breakers."
    )

    @model_validator(mode="after")
    def _webhooks_known(self) -> Settings:
        for team, t in self.teams.items():
            for name in t.webhooks:
                if name not in self.alerting.webhooks:
                    known = ", ".join(sorted(self.alerting.webhooks)) or "none"
                    raise ValueError(f"teams.{team}.webhooks: no [alerting.webhooks.{name}] (known: {known})")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The config file arrives as init values; the environment overrides it.
        return env_settings, init_settings

    def detector_params(self, name: str) -> dict[str, Any]:
        """The parameters set for detector ``name`` (only those set; the rest keep their defaults)."""
        params: BaseModel = getattr(self.detectors, name)
        return params.model_dump(exclude_unset=True)

    def budgets(self) -> dict[str, float]:
        return {t: s.monthly_budget_usd for t, s in self.teams.items() if s.monthly_budget_usd is not None}


class ConfigError(ValueError):
    """Settings that cannot be used: an unreadable file, or fields (all of them named) with wrong values."""


def load_settings(path: Path | None = None) -> Settings:
    """Settings from a TOML or YAML file (optional) overlaid by the environment.

    >>> import os
    >>> os.environ["STORMWATCH_WEB__PORT"] = "99999"
    >>> load_settings()
    Traceback (most recent call last):
    ...
    detector.settings.ConfigError: settings (STORMWATCH_* variables): 1 wrong field
      web.port: Input should be less than or equal to 65535 (got 99999)
    >>> del os.environ["STORMWATCH_WEB__PORT"]
    """
    where = f"{path} and STORMWATCH_* variables" if path is not None else "STORMWATCH_* variables"
    data: dict[str, Any] = {}
    if path is not None:
        try:
            if path.suffix in (".yaml", ".yml"):
                data = yaml.safe_load(path.read_text()) or {}
            else:
                with path.open("rb") as fh:
                    data = tomllib.load(fh)
        except OSError as e:
            raise ConfigError(f"config file {path}: {e.strerror or e}") from None
        except (tomllib.TOMLDecodeError, yaml.YAMLError) as e:
            raise ConfigError(f"config file {path} does not parse: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path}: expected tables of settings, found {type(data).__name__}")
    try:
        return Settings(**data)
    except ValidationError as e:
        raise ConfigError(f"settings ({where}): {_wrong_fields(e)}") from None


def _wrong_fields(error: ValidationError) -> str:
    lines = []
    for item in error.errors(include_url=False):
        field = ".".join(str(part) for part in item["loc"])
        # Our own validators' messages name their fields already ("Value error, " adds nothing).
        message = str(item["ctx"]["error"]) if item["type"] == "value_error" else item["msg"]
        given = item.get("input")
        secret = any(word in field.lower() for word in ("token", "password", "secret", "signing"))
        shown = ""
        if isinstance(given, int | float | bool | str) and not secret:  # a secret's value is never echoed
            shown = f" (got {str(given)[:60]})"
        lines.append(f"  {field}: {message}{shown}" if field else f"  {message}")
    count = len(lines)
    return f"{count} wrong field{'s' if count > 1 else ''}\n" + "\n".join(lines)
