"""Shared builders for tests: events with sensible defaults, in event time."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from detector.events import UsageEvent

T0 = 1_793_952_000.0  # 2026-11-06 08:00 UTC, a Friday morning

MINIMAL_EVENT: dict[str, Any] = {  # a usage event with only the required fields, as JSON has it
    "event_id": "e1",
    "timestamp": "2026-11-02T09:30:00+01:00",
    "team": "search",
    "api_key_id": "k1",
    "provider": "openai",
    "model": "gpt-4o",
    "operation": "chat",
    "input_tokens": 1200,
    "output_tokens": 300,
    "status": "ok",
}


def make_event(t: float, **fields: Any) -> UsageEvent:
    base: dict[str, Any] = {
        "event_id": f"e-{t:.3f}-{fields.get('session_id', '')}-{fields.get('retry_attempt', 0)}",
        "timestamp": t,
        "team": "search",
        "api_key_id": "key-1",
        "provider": "openai",
        "model": "gpt-4o-mini",
        "operation": "chat",
        "input_tokens": 1000,
        "output_tokens": 200,
        "status": "ok",
    }
    base.update(fields)
    return UsageEvent.model_validate(base)


def normal_hour(t0: float, key: str = "key-1") -> list[UsageEvent]:
    """A healthy key: one call every 2 s for an hour."""
    return [make_event(t0 + 2.0 * i, api_key_id=key) for i in range(1800)]


def retry_storm(start: float, n: int = 3000, key: str = "key-1") -> list[UsageEvent]:
    """An SDK retrying a 429 ten times a second."""
    return [
        make_event(
            start + 0.1 * i,
            api_key_id=key,
            status="rate_limited",
            http_status=429,
            retry_attempt=i % 40 + 1,
            output_tokens=0,
            cost_usd=0.0,
        )
        for i in range(n)
    ]


def steady(start: float, seconds: float, every: float, **fields: Any) -> Iterator[UsageEvent]:
    t = start
    while t < start + seconds:
        yield make_event(t, **fields)
        t += every


@pytest.fixture
def ev():  # type: ignore[no-untyped-def]
    return make_event
