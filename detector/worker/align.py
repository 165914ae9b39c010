"""Event-time alignment for the by-team stage: merge the usage partitions' streams in time order.

A by-team partition takes events from every usage partition (a team's keys are spread over
them), and the usage partitions do not move in step: while a backlog drains, one may be an hour
of event time ahead of another. An engine fed in arrival order would see the slower partitions'
events as late, and judge a team's spend by whichever partition came first. So the by-team
partition holds events back, the way a stream processor aligns watermarks after a shuffle:

* each usage partition (a *source*) says how far it has got in event time, its **watermark**
  (the newest event time its engine has seen): after a batch, at most every
  :data:`MARK_EVERY_SECONDS`, on a bodiless *mark* sent to every by-team partition after the
  batch's packs, so a partition knows a source has moved on even when none of its teams have
  events there; and on each pack, as it stood before the pack's batch;
* events wait here, ordered by event time, until every *live* source's watermark has passed
  them; then they go to the engine oldest first;
* a source that has said nothing for ``idle_after`` seconds of wall clock (no traffic, a dead
  worker not yet replaced) stops holding the others back, and so does one never heard from
  ``idle_after`` seconds after the first was; its events, when they come, are simply late. A
  source the same worker reads and knows to be behind (records left to fetch) is never taken
  for silent, however long its batches take (:meth:`Aligner.alive`);
* at most ``max_held`` events wait: past that the oldest go regardless, so memory stays bounded
  whatever a stalled source does (counted in ``forced``).

Live traffic arrives in step, so alignment costs team judgements a fraction of a second. The
aligner is pure (the caller passes the wall clock) and goes into the partition's snapshot with
the engine: held events are state, not lost in a crash.

>>> a = Aligner(sources=2, idle_after=3.0)
>>> a.add(100.0, "a@100"); a.add(160.0, "a@160"); a.heard(0, 160.0, wall=0.1)
>>> a.release(wall=0.2)  # source 1 not heard yet: wait for it
[]
>>> a.add(90.0, "b@90"); a.add(130.0, "b@130"); a.heard(1, 130.0, wall=0.3)
>>> a.release(wall=0.4)
['b@90', 'a@100', 'b@130']
>>> a.release(wall=3.4)  # both silent for 3 s: nothing holds the rest back
['a@160']
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Hashable, Iterable, Mapping, Set
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Generic, TypeVar

T = TypeVar("T")
P = TypeVar("P", bound=Hashable)

MARK_EVERY_SECONDS = 0.05
MAX_HELD = 20_000
_TIME = itemgetter(0)


@dataclass
class Source:
    watermark: float = -math.inf
    heard_at: float = -math.inf  # wall clock (monotonic) of the last pack or mark


@dataclass
class Aligner(Generic[T]):
    """Holds events of several sources until every live source has passed their event time."""

    sources: int  # how many sources there are (usage partitions), as the latest pack or mark said
    idle_after: float
    started: float = math.inf  # wall clock when it first heard of a source (or was restored)
    max_held: int = MAX_HELD
    seen: dict[int, Source] = field(default_factory=dict)
    # (event time, event); sorted when released. Each source adds a sorted run, and Timsort merges
    # runs in about linear time: cheaper than a heap's push and pop per event.
    held: list[tuple[float, T]] = field(default_factory=list)
    forced: int = 0  # events let go before their time because too many were held

    def add(self, ts: float, item: T) -> None:
        """Hold one event (its source's watermark comes with :meth:`heard`)."""
        self.held.append((ts, item))

    def add_all(self, items: Iterable[tuple[float, T]]) -> None:
        """Hold ``(event time, event)`` pairs (a pack's)."""
        self.held.extend(items)

    def heard(self, source: int, watermark: float, wall: float, sources: int | None = None) -> None:
        """``source`` has got to ``watermark`` in event time (with a pack, or a mark)."""
        s = self.seen.get(source)
        if s is None:
            if not self.seen and self.started == math.inf:
                self.started = wall  # the others get their grace from now
            s = self.seen[source] = Source()
        if watermark > s.watermark:
            s.watermark = watermark
        s.heard_at = wall
        if sources is not None:
            self.sources = sources

    def alive(self, source: int, wall: float) -> None:
        """``source`` is known to have records still to send (its worker reads it, behind): not silent.

        Its watermark stays: what it has passed is only known from its packs and marks, which may
        still be on their way.
        """
        s = self.seen.get(source)
        if s is not None and wall > s.heard_at:
            s.heard_at = wall

    def low(self, wall: float) -> float:
        """The event time every live source has passed; +inf when none holds the others back."""
        low = math.inf
        cutoff = wall - self.idle_after
        for s in self.seen.values():
            if s.heard_at > cutoff and s.watermark < low:
                low = s.watermark
        if len(self.seen) < self.sources and self.started > cutoff:
            return -math.inf  # a source not heard from yet, and still in its grace time
        return low

    def release(self, wall: float) -> list[T]:
        """The events now due, oldest first."""
        held = self.held
        if not held:
            return []
        low = self.low(wall)
        held.sort(key=_TIME)  # stable: events of one time keep their order of arrival
        cut = bisect_right(held, low, key=_TIME)
        over = len(held) - cut - self.max_held
        if over > 0:
            self.forced += over
            cut += over
        out = [item for _, item in held[:cut]]
        del held[:cut]
        return out

    def restarted(self, wall: float) -> None:
        """After a restore in another process: wall times are that process's; give every source its grace again."""
        self.started = wall
        for s in self.seen.values():
            s.heard_at = wall

    def __len__(self) -> int:
        return len(self.held)


def to_pause(held: int, low: float, marks: Mapping[P, float], paused: Set[P], max_held: int) -> set[P]:
    """Which of a worker's usage partitions should wait at the broker, so the by-team stage can catch up.

    ``held``: events the worker's by-team partitions hold; ``low``: the event time every live
    usage partition has passed; ``marks``: the event time each of the worker's usage partitions
    has reached; ``paused``: those paused now. Pausing starts when more than half of ``max_held``
    is held and ends when an eighth is; meanwhile the partitions ahead of the slowest wait. The
    by-team stage learns of this worker's progress a batch late, so "ahead of ``low``" alone could
    take in the very partition it waits for: the worker's slowest always goes on. While a source
    is still unheard in its grace time (``low`` is -inf) everything is held, so the same applies:
    the partitions ahead of the worker's slowest wait, rather than fill the aligner past its bound.

    >>> marks = {"a": 120.0, "b": 104.0, "c": 150.0}
    >>> sorted(to_pause(held=15_000, low=100.0, marks=marks, paused=set(), max_held=20_000))
    ['a', 'c']
    >>> sorted(to_pause(held=3_000, low=100.0, marks={"a": 120.0, "b": 104.0}, paused={"a"}, max_held=20_000))
    ['a']
    >>> to_pause(held=2_000, low=100.0, marks={"a": 120.0, "b": 104.0}, paused={"a"}, max_held=20_000)
    set()
    >>> sorted(to_pause(held=15_000, low=-math.inf, marks={"a": 120.0, "b": -math.inf}, paused=set(), max_held=20_000))
    ['a']
    """
    if low == math.inf or held <= max_held // 8:
        return set()
    if held <= max_held // 2 and not paused:
        return set()
    floor = max(low, min(marks.values(), default=math.inf))
    return {p for p, mark in marks.items() if mark > floor}
