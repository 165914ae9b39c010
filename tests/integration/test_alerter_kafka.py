"""The alerter on a real broker, with a person at ``detector breaker`` while it runs.

A breaker the policy opened and a person closed by hand must stay closed: the alerter follows the
breakers topic, so its old expiry does not turn it half-open (which, versioned by that expiry,
would have beaten the close at every gateway). The owner's kill-switch webhook hears the close.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest

from detector.alerting.alerter import TICK_SECONDS, Alerter
from detector.breakers import POLICY_ACTOR
from detector.cli import main as cli_main
from detector.enforce import BreakerFollower, BreakerTable
from detector.events import BreakerState, Entity
from detector.settings import Settings
from tests.integration.http_recorder import HttpRecorder, Recorded
from tests.integration.kafka_tools import Topics, cli_settings, produce, topic_configs
from tests.unit.test_alerting_policy import make_alert

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

KEY = "api_key:k-hand"
TTL = 4.0  # seconds the policy keeps the breaker open


def states(requests: list[Recorded]) -> list[tuple[str, str]]:
    return [(b["data"]["state"], b["data"]["actor"]) for b in (json.loads(r.body) for r in requests)]


def test_a_breaker_closed_by_hand_stays_closed_past_the_policy_expiry(
    kafka_bootstrap: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    topics = Topics.fresh("byhand")
    cli_settings(monkeypatch, kafka_bootstrap, breakers_topic=topics.breakers)

    async def scenario(receiver: HttpRecorder) -> tuple[BreakerTable, list[Recorded]]:
        settings = Settings.model_validate(
            {
                "kafka": topics.kafka(kafka_bootstrap, tmp_path / "faust-data"),
                "teams": {"search": {"webhooks": ["gateway"]}},
                "alerting": {
                    "rules": [{"kind": "retry_storm", "action": "trip", "breaker_ttl": TTL}],
                    "outbox_path": str(tmp_path / "outbox.sqlite"),
                    "webhooks": {"gateway": {"url": receiver.url, "secret": "whsec_" + "a" * 32}},
                },
            }
        )
        alerter = Alerter(settings)
        await alerter.start()
        stop = asyncio.Event()
        running = asyncio.ensure_future(alerter.run(stop))
        table = BreakerTable()
        try:
            async with BreakerFollower(table, kafka_bootstrap, topics.breakers, poll_seconds=0.2) as gateway:
                alert = make_alert(entity=Entity(type="api_key", id="k-hand"), at=time.time())
                await produce(
                    kafka_bootstrap, topics.alerts, [(alert.incident_id.encode(), alert.model_dump_json().encode())]
                )
                await gateway.wait_until(lambda t: (b := t.get(KEY)) is not None and b.state is BreakerState.OPEN, 30)
                opened = time.monotonic()
                args = ["breaker", "close", KEY, "--reason", "fixed the client", "--by", "ana"]
                assert await asyncio.to_thread(cli_main, args) == 0
                await receiver.wait_for(lambda rs: ("closed", "ana") in states(rs), timeout=30)
                # The policy's expiry passes, and the alerter ticks after it.
                await asyncio.sleep(max(0.0, opened + TTL + 3 * TICK_SECONDS - time.monotonic()))
                return table, list(receiver.requests)
        finally:
            stop.set()
            await running
            await alerter.stop()

    async def run() -> tuple[BreakerTable, list[Recorded]]:
        async with HttpRecorder() as receiver:
            return await scenario(receiver)

    table, requests = asyncio.run(run())
    configs = asyncio.run(topic_configs(kafka_bootstrap, [topics.alerts, topics.breakers]))
    assert configs[topics.alerts]["retention.ms"] == str(7 * 86400 * 1000), "as the worker makes it"
    assert configs[topics.breakers]["cleanup.policy"] == "compact"
    final = table.get(KEY)
    assert final is not None and (final.state, final.actor) == (BreakerState.CLOSED, "ana"), final
    assert states(requests) == [("open", POLICY_ACTOR), ("closed", "ana")], "the close is relayed, nothing after it"
