"""Online baselines the detectors share: what "normal" is for one entity.

All are updated in event time, a bounded number of floats each, and picklable so a
worker restart keeps what it learned.

>>> level = GatedLevel(half_life=10.0, max_step=2.0)
>>> for _ in range(50):
...     level.learn(1.0)
>>> round(level.mean, 3)
1.0
>>> level.learn(1000.0)  # an outlier moves the level by at most max_step x
>>> round(level.mean, 3) <= 1.1
True
"""

from __future__ import annotations

import math

from river import stats

HOUR = 3600.0
DAY = 24 * HOUR
WEEK = 7 * DAY


def alpha_for_half_life(half_life: float) -> float:
    """Weight of a new observation so that an old one halves after ``half_life`` observations."""
    return float(1.0 - 0.5 ** (1.0 / half_life))


class GatedLevel:
    """An exponentially weighted mean that an anomaly cannot drag along.

    Each observation is clamped to ``[mean / max_step, mean * max_step]`` before it is
    learned, so a slow drift is followed but a spike or a fast ramp outruns the baseline
    (and so stays visible) instead of becoming the new normal. Starts as a plain running
    mean so the first observations count fully.
    """

    __slots__ = ("alpha", "max_step", "mean", "n")

    def __init__(self, half_life: float, max_step: float) -> None:
        self.alpha = alpha_for_half_life(half_life)
        self.max_step = max_step
        self.mean = 0.0
        self.n = 0

    def learn(self, x: float) -> None:
        self.n += 1
        if self.n > 1 and self.mean > 0:
            x = min(max(x, self.mean / self.max_step), self.mean * self.max_step)
        self.mean += max(self.alpha, 1.0 / self.n) * (x - self.mean)


class LogBaseline:
    """Mean and spread of log(x), for quantities that vary by orders of magnitude.

    Wraps river's exponentially weighted mean and variance. ``typical`` is the geometric
    mean; ``ratio(x)`` says how many times the typical value ``x`` is.
    """

    __slots__ = ("_mean", "_var", "n")

    def __init__(self, fading_factor: float) -> None:
        self._mean = stats.EWMean(fading_factor=fading_factor)
        self._var = stats.EWVar(fading_factor=fading_factor)
        self.n = 0

    def learn(self, x: float) -> None:
        if x <= 0:
            return
        lx = math.log(x)
        self._mean.update(lx)
        self._var.update(lx)
        self.n += 1

    @property
    def typical(self) -> float:
        return math.exp(self._mean.get()) if self.n else 0.0

    @property
    def log_std(self) -> float:
        return math.sqrt(max(self._var.get(), 0.0)) if self.n > 1 else 0.0

    def ratio(self, x: float) -> float:
        typical = self.typical
        return x / typical if typical > 0 else math.inf


class SeasonalProfile:
    """Typical value per hour of the day and per hour of the week.

    One slot per hour of day (24) and per hour of week (168), each an exponentially
    weighted mean over the days it was seen. The hour-of-week slot takes over once it has
    seen two weeks; before that the hour-of-day slot answers. ``expected`` returns None
    until the slot has seen ``min_minutes`` of data, so a detector knows it must not judge.
    """

    __slots__ = ("_alpha", "hod", "hod_n", "how", "how_n", "min_minutes")

    def __init__(self, half_life_days: float = 3.0, min_minutes: int = 30) -> None:
        self._alpha = alpha_for_half_life(half_life_days * 60)  # 60 one-minute updates per slot-day
        self.min_minutes = min_minutes
        self.hod = [0.0] * 24
        self.hod_n = [0] * 24
        self.how = [0.0] * 168
        self.how_n = [0] * 168

    @staticmethod
    def _slots(ts: float) -> tuple[int, int]:
        hour = int(ts // HOUR)
        # 1970-01-01 was a Thursday; shift so slot 0 is Monday 00:00 UTC.
        return hour % 24, (hour + 72) % 168

    def learn(self, ts: float, x: float) -> None:
        d, w = self._slots(ts)
        self.hod_n[d] += 1
        self.hod[d] += max(self._alpha, 1.0 / self.hod_n[d]) * (x - self.hod[d])
        self.how_n[w] += 1
        self.how[w] += max(self._alpha / 7, 1.0 / self.how_n[w]) * (x - self.how[w])

    def expected(self, ts: float) -> float | None:
        d, w = self._slots(ts)
        if self.how_n[w] >= 2 * 60:
            return self.how[w]
        if self.hod_n[d] >= self.min_minutes:
            return self.hod[d]
        return None


class SlotRing:
    """Fixed-width event-time slots in a ring: the last ``size`` x ``width`` seconds.

    Subclasses name their per-slot counters in ``FIELDS``; each is a list of floats. An event
    later than the current slot rolls the ring forward (zeroing skipped slots and handing
    each closed slot to ``on_close``); an event earlier than it counts in the current slot,
    so a little disorder never rewrites the past.
    """

    FIELDS: tuple[str, ...] = ()
    __slots__ = ("_arrays", "idx", "size", "slot", "width")

    def __init__(self, width: float, size: int, now: float) -> None:
        self.width = width
        self.size = size
        self.slot = int(now // width)
        self.idx = self.slot % size
        for name in self.FIELDS:
            setattr(self, name, [0.0] * size)
        self._arrays = tuple(getattr(self, name) for name in self.FIELDS)

    def roll(self, slot: int) -> None:
        """Advance to ``slot`` (no-op if not later than the current one)."""
        steps = slot - self.slot
        if steps <= 0:
            return
        size, idx, arrays = self.size, self.idx, self._arrays
        for i in range(min(steps, size)):
            self.on_close(self.slot + i, (idx + i) % size)
            j = (idx + i + 1) % size
            for values in arrays:
                values[j] = 0.0
        self.slot = slot
        self.idx = slot % self.size

    def on_close(self, slot: int, idx: int) -> None:
        """Called once for each slot as it closes, before the ring reuses it."""

    def window(self, name: str, slots: int) -> float:
        """Sum of the last ``slots`` slots (the current one included)."""
        values: list[float] = getattr(self, name)
        stop = self.idx + 1
        begin = stop - min(slots, self.size)
        if begin >= 0:
            return sum(values[begin:stop])
        return sum(values[begin:]) + sum(values[:stop])

    def closed_values(self, name: str, slots: int) -> list[float]:
        """The ``slots`` slots before the current one, which is still filling (oldest first)."""
        values: list[float] = getattr(self, name)
        idx = self.idx
        begin = idx - min(slots, self.size - 1)
        if begin >= 0:
            return values[begin:idx]
        return values[begin:] + values[:idx]

    def closed(self, name: str, slots: int) -> float:
        return sum(self.closed_values(name, slots))

    def closed_max(self, name: str, slots: int) -> float:
        return max(self.closed_values(name, slots))
