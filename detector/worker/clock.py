"""Event time for a stream that went quiet.

The engine runs on event time only: it judges a tick when an event past that tick arrives.
When traffic stops (a key's storm ends because the key was revoked, the night begins), no
event ever arrives to carry time forward, so due alerts would wait and open incidents would
never resolve. The worker is the shell and may read the wall clock: after ``after`` seconds
without an event it moves event time on from the last watermark at the wall clock's pace.
While events flow, it never interferes, so a busy worker and ``detector replay`` of the same
events give the same alerts.

>>> clock = IdleClock(after=3.0)
>>> clock.due(watermark=1000.0, wall=50.0) is None   # no event seen yet
True
>>> clock.saw_event(wall=50.0)
>>> clock.due(watermark=1000.0, wall=52.0) is None   # 2 s idle: still within the grace
True
>>> clock.due(watermark=1000.0, wall=57.5)           # 7.5 s idle: event time 7.5 s past the watermark
1007.5
"""

from __future__ import annotations

import math


class IdleClock:
    def __init__(self, after: float) -> None:
        self.after = after
        self._last_event_wall: float | None = None

    def saw_event(self, wall: float) -> None:
        self._last_event_wall = wall

    def due(self, watermark: float, wall: float) -> float | None:
        """The event time to advance the engine to, or None while events still flow."""
        if self._last_event_wall is None or not math.isfinite(watermark):
            return None
        idle = wall - self._last_event_wall
        if idle < self.after:
            return None
        return watermark + idle
