from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
from pydantic import ValidationError

from detector import schemas
from detector.events import CONTRACTS, UsageEvent
from tests.conftest import MINIMAL_EVENT

ROOT = Path(__file__).resolve().parents[2]

GOOD = MINIMAL_EVENT


def test_checked_in_schemas_match_the_models() -> None:
    assert schemas.drift(ROOT / "schemas") == []


def test_drift_is_detected(tmp_path: Path) -> None:
    schemas.write(tmp_path)
    (tmp_path / "alert.v1.json").write_text("{}")
    assert schemas.drift(tmp_path) == ["alert.v1.json"]


def test_every_contract_has_a_schema_with_its_id() -> None:
    assert set(CONTRACTS) < set(schemas.FILES)
    for name in schemas.FILES:
        schema = json.loads((ROOT / "schemas" / name).read_text())
        assert schema["$id"].endswith(name)


def test_timestamp_offsets_are_honoured_and_unknown_fields_ignored() -> None:
    ev = UsageEvent.model_validate({**GOOD, "colour": "blue"})
    assert ev.timestamp.timestamp() == datetime(2026, 11, 2, 8, 30, tzinfo=UTC).timestamp()
    assert not hasattr(ev, "colour")


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"timestamp": "2026-11-02T09:30:00"}, "timestamp"),  # no offset: ambiguous
        ({"input_tokens": -1}, "input_tokens"),
        ({"output_tokens": 10**9}, "output_tokens"),
        ({"status": "exploded"}, "status"),
        ({"team": ""}, "team"),
        ({"cached_input_tokens": 5000}, "cached_input_tokens"),
        ({"reasoning_tokens": 301}, "reasoning_tokens"),
        ({"cost_usd": -0.5}, "cost_usd"),
    ],
)
def test_bad_events_are_refused_naming_the_field(change: dict[str, object], field: str) -> None:
    with pytest.raises(ValidationError) as info:
        UsageEvent.model_validate({**GOOD, **change})
    assert field in str(info.value)


def test_required_fields_are_required() -> None:
    for name in (
        "event_id",
        "timestamp",
        "team",
        "api_key_id",
        "provider",
        "model",
        "operation",
        "input_tokens",
        "output_tokens",
        "status",
    ):
        with pytest.raises(ValidationError):
            UsageEvent.model_validate({k: v for k, v in GOOD.items() if k != name})
