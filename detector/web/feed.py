"""What a shell calls to feed the dashboard: one :class:`Feed` fans out to the view and the metrics.

A shell (the Kafka worker, the embedded replay) calls, for every message it handles:

* ``feed.observe_event(ev, cost_usd)`` for a valid event, with its cost as the engine computes
  it (:func:`event_cost`), after ``engine.process(ev)``;
* ``feed.observe_alert(alert)`` for every alert record the engine returned (and those of
  ``engine.advance``/``finish``), when it is published;
* ``feed.observe_reject(reason)`` for a message refused, with the one-line reason;
* ``feed.observe_breaker(change)`` for every breaker change it reads or makes;
* ``metrics.observe_latency(seconds)`` around its per-event work, if it measures it.

:func:`replay_into` is that loop for a file of events (as ``detector replay`` runs it), and
:func:`build_view_from_replay` builds a view of a whole file, for demos and tests.

>>> import io
>>> feed = Feed(LiveView(), Metrics())
>>> lines = [b'{"event_id":"e1","timestamp":"2026-11-02T09:30:00Z","team":"t","api_key_id":"k",'
...          b'"provider":"openai","model":"gpt-4o","operation":"chat","input_tokens":1000000,'
...          b'"output_tokens":0,"status":"ok"}', b'{"event_id": oops']
>>> result = replay_into(lines, Engine.default(), feed)
>>> result.events, result.rejected, feed.view.totals()["spend_usd"], feed.view.totals()["rejected"]
(1, 1, 2.5, 1)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

from detector.engine import Engine
from detector.events import Alert, BreakerChange, IncidentFeedback, Usage
from detector.pricing import PriceCatalog
from detector.replay import ReplayResult, open_events, replay
from detector.settings import Settings, load_settings
from detector.web.metrics import Metrics
from detector.web.view import LiveView


def event_cost(ev: Usage, catalog: PriceCatalog) -> float:
    """What the engine charges for ``ev``: its ``cost_usd``, else the catalog's price (0.0 when unknown)."""
    if ev.cost_usd is not None:
        return ev.cost_usd
    return catalog.cost(ev.model, ev.input_tokens, ev.output_tokens, ev.cached_input_tokens or 0)


class Feed:
    """The view and (optionally) the metrics behind one set of ``observe_*`` calls."""

    def __init__(self, view: LiveView, metrics: Metrics | None = None) -> None:
        self.view = view
        self.metrics = metrics

    def observe_event(self, ev: Usage, cost_usd: float) -> None:
        self.view.observe_event(ev, cost_usd)
        if self.metrics is not None:
            self.metrics.observe_event(ev, cost_usd)

    def observe_alert(self, alert: Alert) -> None:
        self.view.observe_alert(alert)
        if self.metrics is not None:
            self.metrics.observe_alert(alert)

    def observe_reject(self, reason: str) -> None:
        self.view.observe_reject(reason)
        if self.metrics is not None:
            self.metrics.observe_reject(reason)

    def observe_breaker(self, change: BreakerChange) -> None:
        self.view.observe_breaker(change)  # the metrics read breaker states from the view

    def drop_breaker(self, change: BreakerChange) -> None:
        self.view.drop_breaker(change)

    def observe_feedback(self, feedback: IncidentFeedback) -> None:
        self.view.observe_feedback(feedback)


def replay_into(
    lines: Iterable[bytes],
    engine: Engine,
    feed: Feed,
    on_alert: Callable[[Alert], None] | None = None,
    finish: bool = True,
) -> ReplayResult:
    """:func:`detector.replay.replay`, feeding ``feed`` with every event, cost, alert and reject."""

    def alert(a: Alert) -> None:
        feed.observe_alert(a)
        if on_alert is not None:
            on_alert(a)

    return replay(
        lines,
        engine,
        on_alert=alert,
        on_reject=lambda reject: feed.observe_reject(reject.reason),
        finish=finish,
        on_event=feed.observe_event,
    )


def build_view_from_replay(
    events_path: str | Path, settings: Settings | Path | None = None, metrics: bool = True
) -> tuple[Feed, list[Alert]]:
    """Replay a file of events (``.gz`` too) into a fresh engine and a fresh view; returns the feed and the alerts.

    ``settings`` may be a :class:`Settings` or the path of a TOML config (e.g. the simulator's
    ``stormwatch.toml`` with team budgets).
    """
    if not isinstance(settings, Settings):
        settings = load_settings(settings)
    view = LiveView()
    feed = Feed(view, Metrics(view) if metrics else None)
    alerts: list[Alert] = []
    with open_events(str(events_path)) as (lines, _raw):
        replay_into(lines, Engine.from_settings(settings), feed, on_alert=alerts.append)
    return feed, alerts
