"""What the dashboard may change, as two small protocols the shells implement.

* :class:`BreakerControl`: ``await control(request)`` opens or closes one breaker and returns the
  :class:`~detector.events.BreakerChange` records that made (none when nothing changed). The
  Kafka shell maps it onto its breaker board and the breakers topic, e.g.
  ``board.trip(entity, now, owner=..., reason=..., actor=..., incident_id=..., ttl=request.ttl_seconds)``
  or ``board.close(entity, now, owner=..., reason=..., actor=...)``, then publishes the changes. It raises
  :class:`BreakerRefused` to say no (HTTP 409 with its message).
* :class:`FeedbackSink`: ``await sink(feedback)`` records an owner's verdict on an incident.

The server feeds what they return to the view at once, so the page shows a click without
waiting for the topic's round trip (the view ignores the same version coming back later).

:class:`LocalBreakerControl` and :class:`LocalFeedback` need no Kafka: they apply changes to
the view directly, for the embedded demo and for tests.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from detector.events import BreakerChange, BreakerState, Entity, IncidentFeedback, utc_from_epoch
from detector.web.view import LiveView

BreakerAction = Literal["open", "close"]
DASHBOARD_ACTOR = "dashboard"


@dataclass(frozen=True, slots=True)
class BreakerRequest:
    """A person's request, from the page or the API, to open or close one breaker."""

    entity: Entity  # a team, api_key, agent or session
    action: BreakerAction
    reason: str
    actor: str  # who asked ("dashboard" unless the request named someone)
    ttl_seconds: float | None = None  # open: None = the shell's policy TTL, math.inf = until closed by hand
    incident_id: str | None = None
    owner: str | None = None  # owning team: the request's, else as the view knows it (None: an api_key not seen yet)


class BreakerRefused(Exception):
    """The shell will not make this change (the message says why); the API answers 409."""


class BreakerControl(Protocol):
    async def __call__(self, request: BreakerRequest) -> Sequence[BreakerChange]: ...


class FeedbackSink(Protocol):
    async def __call__(self, feedback: IncidentFeedback) -> None: ...


def _view_clock(view: LiveView) -> Callable[[], float]:
    """The view's event time, or the wall clock before the first event."""

    def now() -> float:
        wm = view.watermark
        return wm if math.isfinite(wm) else time.time()

    return now


class LocalBreakerControl:
    """Breakers kept in the view itself: a :class:`BreakerControl` for the embedded demo and tests.

    Versions rise as the Kafka shell's do (never below the whole seconds of the change time).
    ``clock`` defaults to the view's event time, so a replayed day shows sensible times.
    """

    def __init__(
        self, view: LiveView, clock: Callable[[], float] | None = None, default_ttl_seconds: float = 900.0
    ) -> None:
        self.view = view
        self.clock = clock or _view_clock(view)
        self.default_ttl_seconds = default_ttl_seconds
        self.requests: list[BreakerRequest] = []

    async def __call__(self, request: BreakerRequest) -> Sequence[BreakerChange]:
        self.requests.append(request)
        now = self.clock()
        previous = self.view.breaker(request.entity, request.owner or "")
        previous_state = previous.state if previous is not None else BreakerState.CLOSED
        if request.action == "close":
            if previous_state is BreakerState.CLOSED:
                return []
            state, expires = BreakerState.CLOSED, None
        else:
            ttl = request.ttl_seconds if request.ttl_seconds is not None else self.default_ttl_seconds
            state, expires = BreakerState.OPEN, (None if math.isinf(ttl) else now + ttl)
        version = max((previous.version if previous is not None else 0) + 1, int(now))
        change = BreakerChange(
            change_id=str(uuid.uuid4()),
            entity=request.entity,
            owner=request.owner or (previous.owner if previous is not None else "unknown"),
            state=state,
            previous_state=previous_state,
            version=version,
            changed_at=utc_from_epoch(now),
            expires_at=utc_from_epoch(expires) if expires is not None else None,
            reason=request.reason,
            incident_id=request.incident_id,
            actor=request.actor,
        )
        self.view.observe_breaker(change)
        return [change]


class LocalFeedback:
    """A :class:`FeedbackSink` that keeps what it is given (the server shows it on the incident)."""

    def __init__(self) -> None:
        self.received: list[IncidentFeedback] = []

    async def __call__(self, feedback: IncidentFeedback) -> None:
        self.received.append(feedback)
