"""Settings as an operator meets them: `detector config`, wrong fields named, and the config file's JSON Schema."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest
import yaml
from jsonschema import Draft202012Validator

from detector.cli import main
from detector.simulate.simulation import SimulationSpec, plan
from detector.simulate.writer import config_toml

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = json.loads((ROOT / "schemas" / "config.v1.json").read_text())


def _schema_errors(data: dict[str, object]) -> list[str]:
    validator = Draft202012Validator(SCHEMA)
    return sorted(".".join(map(str, e.absolute_path)) for e in validator.iter_errors(data))


def test_the_configs_we_ship_and_write_validate_against_the_config_schema() -> None:
    Draft202012Validator.check_schema(SCHEMA)
    k8s = next(
        d
        for d in yaml.safe_load_all((ROOT / "deploy" / "k8s" / "stormwatch.yaml").read_text())
        if d["kind"] == "ConfigMap"
    )
    simulated = config_toml(plan(SimulationSpec(seed=3, days=0.05, warmup_hours=0.0)))
    durations = {"alerting": {"breakers": {"max_ttl": "4h"}, "rules": [{"kind": "*", "breaker_ttl": "15m"}]}}
    for data in (tomllib.loads(k8s["data"]["stormwatch.toml"]), tomllib.loads(simulated), durations):
        assert _schema_errors(data) == []


def test_the_config_schema_refuses_what_the_settings_refuse() -> None:
    wrong = {"web": {"port": 99999, "hots": "x"}, "detectors": {"retry_storm": {"rate_ratoi": 3}}, "tick_seconds": 0}
    assert _schema_errors(wrong) == ["detectors.retry_storm", "tick_seconds", "web", "web.port"]


def test_config_prints_the_settings_in_effect_with_secrets_masked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "stormwatch.toml"
    path.write_text('[teams.search]\nmonthly_budget_usd = 3000\n\n[alerting.slack]\ntoken = "xoxb-very-secret"\n')
    monkeypatch.setenv("STORMWATCH_KAFKA__BOOTSTRAP_SERVERS", "broker:9093")
    assert main(["config", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    shown = json.loads(out)
    assert shown["teams"]["search"]["monthly_budget_usd"] == 3000
    assert shown["kafka"]["bootstrap_servers"] == "broker:9093"  # the environment over the file
    assert shown["detectors"]["retry_storm"]["rate_ratio"] == 3.0  # defaults shown too
    assert shown["alerting"]["slack"]["token"] == "**********" and "very-secret" not in out


def test_a_wrong_config_names_every_bad_field_exits_2_and_never_echoes_a_secret(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "stormwatch.toml"
    path.write_text("[web]\nport = 99999\napi_token = 12345678\n\n[detectors.retry_storm]\nrate_ratoi = 3\n")
    assert main(["replay", "-", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    head, *fields = err.splitlines()
    assert head == f"detector: settings ({path} and STORMWATCH_* variables): 3 wrong fields"
    assert sorted(fields) == [
        "  detectors.retry_storm.rate_ratoi: Extra inputs are not permitted (got 3)",
        "  web.api_token: Input should be a valid string",  # 12345678 not shown
        "  web.port: Input should be less than or equal to 65535 (got 99999)",
    ]
    (tmp_path / "broken.toml").write_text("x = [\n")
    assert main(["config", "--config", str(tmp_path / "broken.toml")]) == 2
    assert "broken.toml does not parse" in capsys.readouterr().err
    assert main(["worker", "--config", str(tmp_path / "missing.toml")]) == 2
    assert "missing.toml: No such file or directory" in capsys.readouterr().err
