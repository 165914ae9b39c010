"""The detectors on real LLM traffic: the Azure LLM inference trace 2023 (CC-BY 4.0, see tests/data).

The simulator only samples the trace's sizes and burstiness; here the engine gets the trace's
own requests, every arrival and token count as recorded, so its bursts are the real ones.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import orjson
import pytest

from detector.engine import Engine
from detector.events import Alert
from detector.replay import replay
from detector.simulate.azure_trace import DATA_FILE, HOUR_SECONDS, derive_token_quantiles, trace_events

TRACE = Path(__file__).resolve().parents[1] / "data" / "azure-llm-2023"
START = datetime(2026, 11, 2, tzinfo=UTC).timestamp()  # a Monday
LEARN_HOURS = 24  # cost_spike learns a day before it judges
BLOWUP_HOUR = LEARN_HOURS + 3  # the code service's prompts grow 5x from here on
HOURS = BLOWUP_HOUR + 2


@pytest.fixture(scope="module")
def alerts() -> list[Alert]:
    """29 hours of the trace's hour (~820,000 requests); from hour 27 the code key's prompts are 5x."""
    blowup = START + BLOWUP_HOUR * HOUR_SECONDS
    lines = []
    for ev in trace_events(TRACE, START, HOURS):
        if ev["api_key_id"] == "key-code" and ev["timestamp"] >= blowup:
            ev["input_tokens"] *= 5
        lines.append(orjson.dumps(ev))
    out: list[Alert] = []
    result = replay(lines, Engine.default(), on_alert=out.append)
    assert result.rejected == 0 and result.events == len(lines) > 800_000
    return out


def test_the_traces_own_bursts_raise_no_alarm(alerts: list[Alert]) -> None:
    # Per minute the code service ranges from 1 to 585 requests (median 158) and 4k to 1.26M
    # tokens: five judged hours of that, and nothing pages.
    blowup = START + BLOWUP_HOUR * HOUR_SECONDS
    before = [a for a in alerts if a.detected_at.timestamp() < blowup]
    assert before == []
    assert {str(a.entity) for a in alerts} <= {"api_key:key-code", "team:platform"}  # conversation stays quiet


def test_a_prompt_blowup_on_real_traffic_is_caught_within_two_minutes(alerts: list[Alert]) -> None:
    blowup = START + BLOWUP_HOUR * HOUR_SECONDS
    first = alerts[0]
    assert (first.kind.value, first.status.value, str(first.entity)) == ("cost_spike", "firing", "api_key:key-code")
    assert 0 < first.detected_at.timestamp() - blowup <= 120
    assert first.owner == "platform" and first.evidence.ratio == pytest.approx(5.0, rel=0.1)
    assert len({a.incident_id for a in alerts}) == 1  # one incident, updated as it worsens: no flood
    assert "prompt blow-up" in " ".join(a.explanation.summary for a in alerts)


def test_the_trace_is_laid_end_to_end_in_timestamp_order() -> None:
    events = list(trace_events(TRACE, START, 2))
    assert len(events) == 2 * (8_819 + 19_366)  # rows of the two CSVs
    stamps = [ev["timestamp"] for ev in events]
    assert stamps == sorted(stamps) and stamps[0] >= START and stamps[-1] < START + 2 * HOUR_SECONDS
    second = [ev for ev in events if ev["timestamp"] >= START + HOUR_SECONDS]
    first = events[: len(second)]
    assert [(e["api_key_id"], e["input_tokens"]) for e in first] == [
        (e["api_key_id"], e["input_tokens"]) for e in second
    ]
    assert len({ev["event_id"] for ev in events}) == len(events)
    # The code service starts 77 s after the conversation one, as in the trace.
    code = next(ev for ev in events if ev["api_key_id"] == "key-code")
    assert code["timestamp"] - START == pytest.approx(77.3, abs=0.1) and code["input_tokens"] == 4808


def test_the_shipped_statistics_are_the_traces() -> None:
    shipped = json.loads((Path(__file__).resolve().parents[2] / "detector" / "data" / DATA_FILE).read_text())
    assert derive_token_quantiles(TRACE) == shipped
