"""A series of the Numenta Anomaly Benchmark as one API key's spend.

NAB (MIT licence, Numenta) is a corpus of timestamped single-valued metrics with labelled
anomaly windows. :func:`nab_events` reads one series (``timestamp,value`` CSV) as what one key
spends: each value is the key's dollars per hour over its step, paid by one request every
``request_seconds`` (the level rules need 20 requests in 5 minutes before they judge), scaled
so that the series' median is ``median_usd_per_hour``. That puts the spike models of
``cost_spike`` on real series; :func:`nab_windows` gives the labelled windows in the same time.

A cost spike is a rise: dips, flat lines and changes of shape, which NAB labels too, are out of
its scope by design.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from collections.abc import Iterator
from datetime import UTC, datetime
from itertools import pairwise
from pathlib import Path
from typing import Any

WEEK = 7 * 86400.0
START = datetime(2026, 1, 5, tzinfo=UTC).timestamp()  # a Monday: series move by whole weeks, weekdays kept


def _epoch(stamp: str) -> float:
    return datetime.strptime(stamp[:19], "%Y-%m-%d %H:%M:%S").replace(tzinfo=UTC).timestamp()


def read_series(path: Path) -> list[tuple[float, float]]:
    """(epoch seconds, value) of a NAB CSV, in file order."""
    with path.open(newline="") as fh:
        return [(_epoch(row["timestamp"]), float(row["value"])) for row in csv.DictReader(fh)]


def shift_of(series: list[tuple[float, float]]) -> float:
    """Seconds added to the series' times: it starts in the week of :data:`START`, on the same weekday and hour."""
    return math.ceil((START - series[0][0]) / WEEK) * WEEK


def nab_events(
    path: Path, request_seconds: float = 10.0, median_usd_per_hour: float = 10.0, team: str = "nab"
) -> Iterator[dict[str, Any]]:
    """The series as usage events of key ``nab-<file name>``, in timestamp order (negative values count as 0)."""
    series = read_series(path)
    steps = [b[0] - a[0] for a, b in pairwise(series)]
    step = statistics.median(steps) if steps else 300.0
    values = [max(v, 0.0) for _, v in series]
    typical = statistics.median(values) or statistics.fmean(values) or 1.0
    scale = median_usd_per_hour / typical
    shift = shift_of(series)
    per_step = max(int(step // request_seconds), 1)
    key = f"nab-{path.stem}"
    n = 0
    for t, value in series:
        usd = max(value, 0.0) * scale * step / 3600 / per_step
        for k in range(per_step):
            n += 1
            yield {
                "event_id": f"{key}-{n}",
                "timestamp": t + shift + k * step / per_step,
                "team": team,
                "api_key_id": key,
                "provider": "openai",
                "model": "nab-series",
                "operation": "chat",
                "input_tokens": 1000,
                "output_tokens": 100,
                "status": "ok",
                "cost_usd": round(usd, 9),
            }


def nab_windows(labels: Path, corpus: Path, name: str) -> list[tuple[float, float]]:
    """The labelled anomaly windows of series ``name`` (``family/file.csv``), in :func:`nab_events`' time."""
    windows = json.loads(labels.read_text())[name]
    shift = shift_of(read_series(corpus / name))
    return [(_epoch(a) + shift, _epoch(b) + shift) for a, b in windows]
