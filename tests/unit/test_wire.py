"""The fast decoder must accept exactly what the contract accepts, with the same values and reasons."""

from __future__ import annotations

import json
import math
from datetime import datetime, timedelta
from typing import Any

import msgspec
import orjson
import pytest
from pydantic import ValidationError

from detector.events import UsageEvent
from detector.replay import explain
from detector.wire import UsageRecord, decode_usage
from tests.conftest import MINIMAL_EVENT

BASE: dict[str, Any] = {
    **MINIMAL_EVENT,
    "timestamp": "2026-11-02T09:30:00.250Z",
    "user": "u1",
    "agent_id": "a1",
    "session_id": "s1",
    "cached_input_tokens": 100,
    "reasoning_tokens": 10,
    "cost_usd": 0.01,
    "latency_ms": 812.5,
    "http_status": 200,
    "retry_attempt": 1,
    "request_fingerprint": "f00d",
    "labels": {"feature": "chat"},
}

INTS = [0, -1, 7, 10_000, 10_001, 50_000_000, 50_000_001, 12.0, 12.5, "12", "x", True, False, None, 2**70, [], 1e3]
IDS = ["", "a", "x" * 256, "x" * 257, "é" * 256, "😀" * 256, "😀" * 257, " ", "\u0000", 5, True, None, ["a"]]
CONTROL = ["a\x1fb", "a\n", "\na", "\t", "a\x7f", "a\u0080", "é quipe"]  # a team name may hold none of 0-31, 127
FLOATS = [0, 0.0, -0.0, -1e-9, 5, 100_000, 100_000.01, 1e308, "1.5", True, None, [], "NaN"]
TIMESTAMPS = [
    "2026-11-02T09:30:00Z",
    "2026-11-02T09:30:00+05:30",
    "2026-11-02T09:30:00-00:00",
    "2026-11-02T09:30:00",
    "2026-11-02",
    "2026-11-02 09:30:00Z",
    "2026-11-02t09:30:00z",
    "2026-11-02T09:30:00.123456Z",
    "2026-11-02T09:30:00.1234567Z",
    "2026-11-02T09:30Z",
    "2026-11-02T24:00:00Z",
    "2026-02-30T00:00:00Z",
    "2026-11-02T09:30:60Z",
    "2026-11-02T09:30:00+24:00",
    "20261102T093000Z",
    1_762_075_800,
    1_762_075_800.5,
    "1762075800",
    "",
    None,
    True,
]
STATUSES = ["ok", "error", "rate_limited", "timeout", "OK", "unknown", "", 1, None]
LABELS = [{}, {"a": "b"}, {"a": 1}, {"": ""}, [], None, "a=b", {"a": None}]

FIELD_VALUES: dict[str, list[Any]] = {
    **{f: INTS for f in ("input_tokens", "output_tokens", "cached_input_tokens", "reasoning_tokens")},
    **{f: INTS for f in ("retry_attempt", "http_status")},
    **{f: IDS for f in ("event_id", "api_key_id", "provider", "model", "operation")},
    "team": IDS + CONTROL,
    **{f: IDS for f in ("user", "agent_id", "session_id", "trace_id")},
    **{f: IDS for f in ("error_type", "request_fingerprint", "tool_name")},
    **{f: FLOATS for f in ("cost_usd", "latency_ms")},
    "timestamp": TIMESTAMPS,
    "status": STATUSES,
    "labels": LABELS,
}


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode()  # unlike orjson, takes ints past 64 bits


def cases() -> list[tuple[str, bytes]]:
    out: list[tuple[str, bytes]] = [("base", dumps(BASE))]
    for name, values in FIELD_VALUES.items():
        for i, value in enumerate(values):
            out.append((f"{name}={i}", dumps({**BASE, name: value})))
        out.append((f"{name} absent", dumps({k: v for k, v in BASE.items() if k != name})))
    raw_base = orjson.dumps(BASE)  # compact, for the byte-level edits below
    out += [
        ("cached > input", orjson.dumps({**BASE, "cached_input_tokens": 1201})),
        ("reasoning > output", orjson.dumps({**BASE, "reasoning_tokens": 301})),
        ("unknown field", orjson.dumps({**BASE, "colour": "red", "nested": {"x": [1, 2]}})),
        ("empty", b""),
        ("blank", b"   \n"),
        ("null", b"null"),
        ("array", b"[]"),
        ("object", b"{}"),
        ("not json", b"not json"),
        ("truncated", raw_base[:-1]),
        ("trailing garbage", raw_base + b"x"),
        ("trailing newline", raw_base + b"\n"),
        ("bom", b"\xef\xbb\xbf" + raw_base),
        ("duplicate key", raw_base[:-1] + b',"team":"other"}'),
        ("invalid utf-8", raw_base.replace(b'"search"', b'"se\xffarch"')),
        ("lone surrogate", raw_base.replace(b'"search"', b'"se\\ud800arch"')),
        ("escaped", raw_base.replace(b'"search"', b'"se\\u0061rch\\n"')),
        ("NaN literal", raw_base.replace(b'"cost_usd":0.01', b'"cost_usd":NaN')),
        ("huge exponent", raw_base.replace(b'"cost_usd":0.01', b'"cost_usd":1e400')),
        ("negative zero int", raw_base.replace(b'"retry_attempt":1', b'"retry_attempt":-0')),
        ("int with exponent", raw_base.replace(b'"input_tokens":1200', b'"input_tokens":1.2e3')),
    ]
    return out


def judge(decode: Any, raw: bytes) -> tuple[str, Any]:
    try:
        return "ok", decode(raw)
    except ValidationError as error:
        return "rejected", explain(error)


def same_value(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a):
        return math.isnan(b)
    if isinstance(a, datetime) and isinstance(b, datetime):
        # msgspec rounds a seventh decimal of a second, pydantic cuts it (see detector.wire)
        return abs(a - b) <= timedelta(microseconds=1) and a.utcoffset() == b.utcoffset()
    return bool(a == b and type(a) is type(b))


@pytest.mark.parametrize(("name", "raw"), cases(), ids=[c[0] for c in cases()])
def test_decode_usage_agrees_with_the_contract(name: str, raw: bytes) -> None:
    want, expected = judge(UsageEvent.model_validate_json, raw)
    got, actual = judge(decode_usage, raw)
    assert got == want, f"{name}: contract says {want} ({expected!r}), decode_usage says {got} ({actual!r})"
    if want == "rejected":
        assert actual == expected
        return
    for field in UsageEvent.model_fields:
        a, e = getattr(actual, field), getattr(expected, field)
        assert same_value(a, e), f"{name}: {field} is {a!r}, the contract gives {e!r}"


def test_the_fast_path_takes_plain_events() -> None:
    """Else every event would silently pay for both decoders."""
    assert type(decode_usage(orjson.dumps(BASE))) is UsageRecord
    minimal = {k: v for k, v in BASE.items() if k in UsageEvent.model_json_schema()["required"]}
    assert type(decode_usage(orjson.dumps(minimal))) is UsageRecord


def test_record_states_the_same_fields_and_defaults_as_the_contract() -> None:
    fields = msgspec.structs.fields(UsageRecord)
    assert [f.name for f in fields] == list(UsageEvent.model_fields)
    for f in fields:
        contract = UsageEvent.model_fields[f.name]
        required = f.default is msgspec.NODEFAULT and f.default_factory is msgspec.NODEFAULT
        assert required == contract.is_required(), f.name
        if not required:
            assert f.default == contract.default, f.name
