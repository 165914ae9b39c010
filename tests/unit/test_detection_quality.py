"""The whole offline loop on simulated fleet traffic: simulate, replay, evaluate.

One day of warm-up then one day with injected incidents of every kind and their benign
look-alikes. This is the same measurement as ``detector scorecard``, on one seed, so a change
that breaks a detector or floods the fleet with alerts fails here.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from detector.cli import read_labels, run_replay
from detector.evaluate import Scorecard, score
from detector.settings import load_settings
from detector.simulate import SimulationSpec, write_simulation


@pytest.fixture(scope="module")
def card(tmp_path_factory: pytest.TempPathFactory) -> Scorecard:
    out: Path = tmp_path_factory.mktemp("sim")
    spec = SimulationSpec(seed=21, days=1.0, warmup_hours=24.0)
    paths = write_simulation(spec, out)
    result, _, alerts = run_replay(str(paths["events"]), load_settings(paths["config"]), None, None, None)
    assert result.rejected == 0
    return score(read_labels(paths["labels"]), [a.model_dump(mode="json") for a in alerts], days=2.0)


@pytest.mark.parametrize("kind", ["cost_spike", "retry_storm", "agent_loop", "budget_burn"])
def test_every_injected_incident_is_found(card: Scorecard, kind: str) -> None:
    assert card.kinds[kind].labels > 0
    assert card.kinds[kind].recall == 1.0, card.missed


def test_few_false_incidents_and_benign_look_alikes_stay_quiet(card: Scorecard) -> None:
    assert len(card.false_incidents) <= 2, card.false_incidents


def test_latency_targets(card: Scorecard) -> None:
    storms, loops, spikes = (card.kinds[k].median_latency_s for k in ("retry_storm", "agent_loop", "cost_spike"))
    assert storms is not None and storms <= 30
    assert loops is not None and loops <= 90  # one seed, few loops: a little slack on the 60 s target
    assert spikes is not None and spikes <= 180
