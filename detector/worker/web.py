"""The worker's web server: the dashboard, JSON API, /healthz, /readyz and /metrics.

Registered as the Faust app's web server (``app.web_server``), on ``[web] host`` and
``kafka.web_port``. The same :func:`~detector.web.create_web_app` serves ``detector demo
--serve``; here its live view is fed by the worker's runtimes (events, alerts, rejects) and by
the breakers topic, and the page's buttons and labels go to Kafka: a breaker change is written
to the breakers topic (audited, as ``detector breaker`` does) and a label to the alerts topic,
where ``detector alerter`` acts on it. Each worker's view shows the partitions it owns.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import mode

from detector.alerting.alerter import publish_feedback
from detector.breaker_cli import close_breaker, open_breaker
from detector.enforce import BreakerFollower, BreakerTable
from detector.events import BreakerChange, IncidentFeedback
from detector.settings import Settings
from detector.web import BreakerRequest, Feed, answers_to, bound_port, create_web_app, serve
from detector.worker.snapshots import client_options

log = logging.getLogger("stormwatch.worker")

DEFAULT_TTL_SECONDS = 1800.0


class KafkaBreakerControl:
    """The page's open/close buttons: an audited change on the breakers topic."""

    def __init__(self, settings: Settings) -> None:
        self.kafka = settings.kafka

    async def __call__(self, request: BreakerRequest) -> Sequence[BreakerChange]:
        if request.action == "close":
            closed = await close_breaker(self.kafka, request.entity, request.reason, request.actor, owner=request.owner)
            return [closed] if closed is not None else []
        ttl = request.ttl_seconds if request.ttl_seconds is not None else DEFAULT_TTL_SECONDS
        change = await open_breaker(
            self.kafka,
            request.entity,
            request.reason,
            request.actor,
            ttl,
            owner=request.owner,
            incident_id=request.incident_id,
        )
        return [change]


class KafkaFeedback:
    """The page's labels: on the alerts topic, for ``detector alerter``."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    async def __call__(self, feedback: IncidentFeedback) -> None:
        await publish_feedback(self.settings, feedback)


class WorkerWeb(mode.Service):
    """Serves the dashboard of one worker and follows the breakers topic into its view."""

    def __init__(self, settings: Settings, feed: Feed, ready: Callable[[], bool], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.settings = settings
        self.feed = feed
        self.ready = ready
        self.runner: Any = None
        self.follower: BreakerFollower | None = None

    async def on_start(self) -> None:
        s, k = self.settings, self.settings.kafka
        self.follower = BreakerFollower(
            BreakerTable(),
            topic=k.breakers_topic,
            client_id=f"{k.group_id}-web-breakers",
            on_change=self.feed.observe_breaker,
            on_drop=self.feed.drop_breaker,
            **client_options(k),
        )
        await self.follower.start()
        token = s.web.api_token.get_secret_value() if s.web.api_token is not None else None
        app = create_web_app(
            self.feed.view,
            self.feed.metrics,
            breaker_control=KafkaBreakerControl(s),
            feedback_sink=KafkaFeedback(s),
            api_token=token,
            ready=self.ready,
            allowed_hosts=answers_to(s.web.host, s.web.allowed_hosts),
        )
        self.runner = await serve(app, s.web.host, k.web_port or 0)
        log.info("stormwatch: dashboard on http://%s:%d/", s.web.host, bound_port(self.runner))

    async def on_stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
        if self.follower is not None:
            await self.follower.stop()
