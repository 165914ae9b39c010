from __future__ import annotations

import math
import random

import pytest

from detector.models import DAY, GatedLevel, LogBaseline, SeasonalProfile, SlotRing


class Ring(SlotRing):
    FIELDS = ("a",)
    a: list[float]

    def __init__(self, width: float, size: int, now: float) -> None:
        super().__init__(width, size, now)
        self.closed_slots: list[int] = []

    def on_close(self, slot: int, idx: int) -> None:
        self.closed_slots.append(slot)


def test_ring_sums_match_a_plain_history_including_gaps() -> None:
    rng = random.Random(1)
    ring, history, t = Ring(1.0, 7, 0.0), {}, 0
    for _ in range(400):
        t += rng.choice([0, 0, 1, 1, 2, 9])  # gaps longer than the ring, too
        ring.roll(t)
        x = rng.random()
        ring.a[ring.idx] += x
        history[t] = history.get(t, 0.0) + x
        for k in range(1, 10):
            closed = sum(history.get(t - j, 0.0) for j in range(1, min(k, 6) + 1))
            window = sum(history.get(t - j, 0.0) for j in range(min(k, 7)))
            assert ring.closed("a", k) == pytest.approx(closed)
            assert ring.window("a", k) == pytest.approx(window)


def test_ring_hands_every_slot_to_on_close_once_up_to_its_size() -> None:
    ring = Ring(10.0, 4, 0.0)
    ring.roll(3)
    ring.roll(100)  # a long gap closes at most ``size`` slots
    assert ring.closed_slots == [0, 1, 2, 3, 4, 5, 6]


def test_gated_level_follows_drift_but_not_a_spike() -> None:
    level = GatedLevel(half_life=20, max_step=1.3)
    for i in range(200):
        level.learn(10.0 * 1.002**i)  # slow growth
    assert level.mean == pytest.approx(10.0 * 1.002**200, rel=0.1)
    before = level.mean
    for _ in range(5):
        level.learn(before * 50)
    assert level.mean < before * 1.5


def test_log_baseline_ratio_and_spread() -> None:
    base = LogBaseline(fading_factor=0.05)
    rng = random.Random(2)
    for _ in range(2000):
        base.learn(math.exp(rng.gauss(math.log(0.01), 0.3)))
    assert base.typical == pytest.approx(0.01, rel=0.1)
    assert base.log_std == pytest.approx(0.3, rel=0.25)
    assert base.ratio(0.1) == pytest.approx(10, rel=0.15)


def test_seasonal_profile_learns_the_hour_and_says_when_it_does_not_know() -> None:
    season = SeasonalProfile(min_minutes=30)
    assert season.expected(0.0) is None
    for minute in range(2 * 24 * 60):
        t = minute * 60.0
        season.learn(t, 5.0 if int(t // 3600) % 24 == 2 else 1.0)
    assert season.expected(2 * DAY + 2.5 * 3600) == pytest.approx(5.0)
    assert season.expected(2 * DAY + 12 * 3600) == pytest.approx(1.0)
