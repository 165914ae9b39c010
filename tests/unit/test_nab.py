"""The spike models on the Numenta Anomaly Benchmark: NAB series as what one API key spends (see tests/data/nab)."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from detector.engine import Engine
from detector.events import Alert
from detector.replay import replay
from detector.simulate.nab import nab_events, nab_windows, read_series

NAB = Path(__file__).resolve().parents[1] / "data" / "nab"
LABELS = NAB / "labels" / "combined_windows.json"


def incidents(name: str) -> list[Alert]:
    out: list[Alert] = []
    result = replay((orjson.dumps(ev) for ev in nab_events(NAB / name)), Engine.default(), on_alert=out.append)
    assert result.rejected == 0 and result.events == 30 * len(read_series(NAB / name))  # a request every 10 s
    return [a for a in out if a.status.value == "firing"]


@pytest.mark.parametrize(
    "name",
    [
        "artificialNoAnomaly/art_daily_perfect_square_wave.csv",  # spend that jumps 4x twice a day, every day
        "artificialNoAnomaly/art_noisy.csv",
        "artificialWithAnomaly/art_daily_jumpsdown.csv",  # NAB's anomaly is a fall: no cost spike
        "artificialWithAnomaly/art_daily_nojump.csv",  # a daily peak that does not come
    ],
)
def test_two_weeks_of_a_series_without_a_rise_page_nothing(name: str) -> None:
    assert incidents(name) == []


def test_a_daily_peak_that_jumps_up_is_one_incident_inside_its_labelled_window() -> None:
    name = "artificialWithAnomaly/art_daily_jumpsup.csv"
    (window,) = nab_windows(LABELS, NAB, name)
    (incident,) = incidents(name)  # and nothing else in the two weeks
    assert window[0] <= incident.detected_at.timestamp() <= window[1]
    assert incident.kind.value == "cost_spike" and incident.evidence.ratio >= 5
    assert str(incident.entity) == "api_key:nab-art_daily_jumpsup"


def test_series_keep_their_weekday_and_hour() -> None:
    events = list(nab_events(NAB / "artificialNoAnomaly/art_noisy.csv"))
    first = read_series(NAB / "artificialNoAnomaly/art_noisy.csv")[0][0]
    shift = events[0]["timestamp"] - first
    assert shift % (7 * 86400) == 0 and events[0]["timestamp"] >= 1_767_571_200  # 2026-01-05, a Monday
    assert [e["timestamp"] - events[0]["timestamp"] for e in events[:3]] == [0.0, 10.0, 20.0]
