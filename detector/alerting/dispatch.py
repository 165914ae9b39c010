"""Carry out the :class:`~detector.alerting.policy.Responder`'s decisions: Slack, webhooks, breakers.

One :class:`Dispatcher` per shell. ``detector replay --notify`` and ``--dry-run`` use it on the
alerts of a replay (event time: each alert's ``detected_at``); ``detector alerter`` uses it on
the alerts topic. Slack messages and webhook deliveries go into the durable outbox first (keyed
by alert id and change id, so handling an alert twice sends nothing twice) and are sent by the
senders' loops; breaker changes go to ``publish_breaker`` (the breakers topic, in the alerter).
In a dry run nothing is stored or sent: each action is printed instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

from detector.alerting.outbox import Outbox
from detector.alerting.policy import Decision, Responder
from detector.alerting.slack import CHANNEL, SlackSender, header_for
from detector.alerting.webhooks import WebhookEndpoint, WebhookSender
from detector.breakers import change_key, format_duration
from detector.events import Alert, AlertStatus, BreakerChange, IncidentFeedback
from detector.settings import Settings

log = logging.getLogger("stormwatch.alerting")

PublishBreaker = Callable[[BreakerChange], Awaitable[None]]


def describe_change(change: BreakerChange) -> str:
    until = ""
    if change.expires_at is not None:
        until = f" for {format_duration((change.expires_at - change.changed_at).total_seconds())}"
    return f"breaker {change_key(change)}: {change.previous_state.value} -> {change.state.value}{until}"


class Dispatcher:
    """Decisions in, outbox entries, breaker changes and (dry run) printed lines out."""

    def __init__(
        self,
        settings: Settings,
        *,
        dry_run: bool | None = None,
        publish_breaker: PublishBreaker | None = None,
        echo: Callable[[str], None] = print,
        outbox_path: str | Path | None = None,
        responder: Responder | None = None,
        on_change: Callable[[BreakerChange], None] | None = None,
    ) -> None:
        a = settings.alerting
        self.settings = settings
        self.dry_run = a.dry_run if dry_run is None else dry_run
        self.responder = responder or Responder(settings)
        self.publish_breaker = publish_breaker
        self.echo = echo
        self.on_change = on_change  # sees every breaker change, dry run or not (a live view)
        self.endpoints = {
            name: WebhookEndpoint(name=name, url=w.url, secret=w.secret, timeout_seconds=w.timeout_seconds)
            for name, w in a.webhooks.items()
        }
        self.outbox: Outbox | None = None
        self.slack: SlackSender | None = None
        self.webhooks: WebhookSender | None = None
        if not self.dry_run:
            path = str(outbox_path or a.outbox_path)
            self.outbox = Outbox(path)
            if a.slack.token is not None:
                self.slack = SlackSender(
                    self.outbox, state_path=path, token=a.slack.token.get_secret_value(), base_url=a.slack.base_url
                )
            self.webhooks = WebhookSender(self.outbox, self.endpoints.values())
        self.counts: Counter[str] = Counter()  # what was decided, for summary() (the alerter runs for months)

    async def handle(self, alert: Alert, now: float) -> Decision:
        """Decide on one alert record at ``now`` (epoch seconds) and carry it out."""
        await self.advance(now)
        decision = self.responder.decide(alert, now)
        self.counts.update(alerts=1, silenced=int(decision.silenced), breaker_changes=len(decision.changes))
        route = decision.route
        if decision.silenced:
            self.echo(f"silenced  {header_for(alert)} (an owner's label)")
            if alert.status is AlertStatus.RESOLVED and self._in_slack(alert, route.slack_channel):
                # Not a page: it closes the thread the incident began before it was labelled, whose
                # header would otherwise say FIRING for good.
                assert self.slack is not None and route.slack_channel is not None
                self.slack.enqueue(alert, route.slack_channel, decision.action_text)
            return decision
        if route.slack_channel is None:
            self.echo(f"no Slack channel for team {route.team}: {header_for(alert)}")
        elif self.dry_run:
            self.echo(f"would post to Slack {route.slack_channel}: {header_for(alert)} | {decision.action_text}")
        elif self.slack is not None:
            self.slack.enqueue(alert, route.slack_channel, decision.action_text)
        await self._breaker_changes(decision.changes, route.webhooks)
        return decision

    def _in_slack(self, alert: Alert, channel: str | None) -> bool:
        return (
            self.slack is not None and channel is not None and self.slack.outbox.has_group(CHANNEL, alert.incident_id)
        )

    async def advance(self, now: float) -> list[BreakerChange]:
        """Breakers that expire or close by time; their changes are carried out like the others."""
        changes = self.responder.advance(now)
        await self._breaker_changes(changes, None)
        return changes

    async def feedback(self, feedback: IncidentFeedback, now: float) -> list[BreakerChange]:
        changes = self.responder.apply_feedback(feedback, now)
        await self._breaker_changes(changes, None)
        return changes

    async def _breaker_changes(self, changes: Iterable[BreakerChange], webhooks: Iterable[str] | None) -> None:
        for change in changes:
            if self.on_change is not None:
                self.on_change(change)
            names = tuple(webhooks) if webhooks is not None else self.responder.route(change.owner).webhooks
            if self.dry_run:
                targets = ", ".join(f"{n} ({self.endpoints[n].url})" for n in names) or "no webhook"
                self.echo(f"would publish {describe_change(change)}; webhooks: {targets}")
                continue
            # The outbox first: once published, the change is adopted from the topic after a crash and
            # never made again, so a webhook not yet stored by then would be lost.
            if self.webhooks is not None:
                for name in names:
                    self.webhooks.enqueue(change, self.endpoints[name])
            if self.publish_breaker is not None:
                await self.publish_breaker(change)

    def relay(self, change: BreakerChange) -> None:
        """A change made elsewhere (``detector breaker`` by hand) to the owner's kill-switch webhooks.

        Gateways that follow the breakers topic have it already; those told by webhook hear it here.
        """
        if self.on_change is not None:
            self.on_change(change)
        names = self.responder.route(change.owner).webhooks
        if self.dry_run:
            self.echo(f"would relay {describe_change(change)} (by {change.actor}) to webhooks: {', '.join(names)}")
        elif self.webhooks is not None:
            for name in names:
                self.webhooks.enqueue(change, self.endpoints[name])

    def prune(self, now: float, keep_seconds: float) -> int:
        """Forget deliveries finished and Slack threads quiet for ``keep_seconds``; returns the rows let go."""
        pruned = 0
        if self.outbox is not None:
            pruned += self.outbox.prune(now - keep_seconds)
        if self.slack is not None:
            pruned += self.slack.prune(keep_seconds)
        return pruned

    async def run_senders(self, stop: asyncio.Event) -> None:
        """The Slack and webhook delivery loops, until ``stop``."""
        loops = [s.run(stop) for s in (self.slack, self.webhooks) if s is not None]
        await asyncio.gather(*loops)

    async def drain(self, timeout: float) -> int:
        """Send what is due until the outbox is empty or ``timeout`` runs out; returns what is left."""
        if self.outbox is None:
            return 0
        stop = asyncio.Event()
        runner = asyncio.ensure_future(self.run_senders(stop))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            while self.outbox.pending_count() and loop.time() < deadline and not runner.done():
                await asyncio.sleep(0.05)  # the senders wake on their own; this only watches the count
        finally:
            stop.set()
            with contextlib.suppress(asyncio.CancelledError):
                await runner
        return self.outbox.pending_count()

    async def close(self) -> None:
        if self.slack is not None:
            await self.slack.close()
        if self.webhooks is not None:
            await self.webhooks.aclose()
        if self.outbox is not None:
            self.outbox.close()

    def summary(self) -> dict[str, Any]:
        c = self.counts
        return {
            "alerts": c["alerts"],
            "silenced": c["silenced"],
            "breaker_changes": c["breaker_changes"],
            "dead_letters": len(self.outbox.dead_letters()) if self.outbox is not None else 0,
        }
