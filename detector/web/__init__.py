"""See it: a live dashboard, a JSON API, Prometheus metrics, served by either shell.

* :mod:`~detector.web.view`: :class:`LiveView`, the bounded in-memory read model the page shows;
* :mod:`~detector.web.metrics`: :class:`Metrics`, ``stormwatch_*`` metrics on their own registry;
* :mod:`~detector.web.feed`: :class:`Feed`, the one object a shell calls (``observe_event``,
  ``observe_alert``, ``observe_reject``, ``observe_breaker``), and a replay loop that feeds it;
* :mod:`~detector.web.control`: the :class:`BreakerControl` and :class:`FeedbackSink` protocols a
  shell implements for the page's buttons, and in-memory ones for the embedded demo;
* :mod:`~detector.web.server`: :func:`create_web_app` (aiohttp), :func:`serve`, :class:`BackgroundServer`.

Wiring a shell, in short::

    view = LiveView()
    feed = Feed(view, Metrics(view))
    app = create_web_app(view, feed.metrics, breaker_control=..., feedback_sink=..., api_token=..., ready=...)
    runner = await serve(app, "127.0.0.1", 8080)
    ...  # per event: alerts = engine.process(ev); feed.observe_event(ev, event_cost(ev, engine.catalog)); ...
"""

from detector.web.control import (
    BreakerControl,
    BreakerRefused,
    BreakerRequest,
    FeedbackSink,
    LocalBreakerControl,
    LocalFeedback,
)
from detector.web.feed import Feed, build_view_from_replay, event_cost, replay_into
from detector.web.metrics import Metrics
from detector.web.server import BackgroundServer, answers_to, bound_port, create_web_app, serve, url_host
from detector.web.view import LiveView, ViewLimits

__all__ = [
    "BackgroundServer",
    "BreakerControl",
    "BreakerRefused",
    "BreakerRequest",
    "Feed",
    "FeedbackSink",
    "LiveView",
    "LocalBreakerControl",
    "LocalFeedback",
    "Metrics",
    "ViewLimits",
    "answers_to",
    "bound_port",
    "build_view_from_replay",
    "create_web_app",
    "event_cost",
    "replay_into",
    "serve",
    "url_host",
]
