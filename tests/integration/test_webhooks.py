"""Kill-switch webhooks against real HTTP receivers on 127.0.0.1: down, up, refusing, and a sender restart.

Receivers count deliveries by ``webhook-id`` and verify every request with their own secret.
The sender runs with a small ``base_delay`` so retries take milliseconds.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from aiohttp import web

from detector.alerting.outbox import Delivery, Outbox
from detector.alerting.webhooks import WebhookEndpoint, WebhookSender, generate_secret, verify
from detector.events import BreakerChange
from tests.integration.http_recorder import HttpRecorder, Recorded, free_port

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

WAIT = 15.0  # seconds any single awaited condition may take
REFUSED = "ClientConnectorError: Cannot connect to host 127.0.0.1"


def make_changes(entities: int, versions: int) -> list[BreakerChange]:
    """Changes by version, then entity: each entity's breaker flips open, closed, open, ..."""
    states = ["closed", "open"]
    return [
        BreakerChange.model_validate(
            {
                "change_id": f"chg-k{e}-v{v}",
                "entity": {"type": "api_key", "id": f"k{e}"},
                "owner": "search",
                "state": states[v % 2],
                "previous_state": states[(v + 1) % 2],
                "version": v,
                "changed_at": 1_793_952_000 + 60 * v,
                "reason": "retry storm" if v % 2 else "quiet again",
                "actor": "stormwatch",
            }
        )
        for v in range(1, versions + 1)
        for e in range(entities)
    ]


class Attempts:
    """``on_attempt`` for a sender: keeps (delivery_id, error) and lets a test await a condition on them."""

    def __init__(self) -> None:
        self.log: list[tuple[str, str | None]] = []
        self._changed = asyncio.Event()

    def __call__(self, delivery: Delivery, error: str | None) -> None:
        self.log.append((delivery.delivery_id, error))
        self._changed.set()

    async def until(self, predicate: Callable[[list[tuple[str, str | None]]], bool]) -> None:
        async with asyncio.timeout(WAIT):
            while not predicate(self.log):
                self._changed.clear()
                await self._changed.wait()


class Running:
    """A sender's ``run`` loop as a task, stopped gracefully (its current pass completes)."""

    def __init__(self, sender: WebhookSender) -> None:
        self.sender = sender
        self.stop = asyncio.Event()
        self.task = asyncio.create_task(sender.run(self.stop))

    async def halt(self) -> None:
        self.stop.set()
        async with asyncio.timeout(WAIT):
            await self.task
        await self.sender.aclose()


def check_requests(requests: list[Recorded], secret: str, changes: list[BreakerChange]) -> None:
    """Each change arrived exactly once, verified, with its own data, and each entity's changes in order."""
    by_id = {c.change_id: c for c in changes}
    ok = [r for r in requests if r.status < 300]
    counts = Counter(r.headers["webhook-id"] for r in ok)
    expected = Counter(list(by_id))
    assert counts == expected, f"missing {set(by_id) - set(counts)}, repeated {counts - expected}"
    versions: dict[str, list[int]] = {}
    for r in ok:
        payload = verify(secret, r.headers, r.body)
        change = BreakerChange.model_validate(payload["data"])
        assert change == by_id[r.headers["webhook-id"]]
        assert payload["type"] == f"breaker.{change.state.value}"
        assert r.headers["content-type"] == "application/json"
        versions.setdefault(change.entity.id, []).append(change.version)
    assert all(v == sorted(v) for v in versions.values()), versions


def test_receiver_down_then_up_with_a_sender_restart_delivers_everything_once(tmp_path: Path) -> None:
    port = free_port()
    secret = generate_secret()
    endpoint = WebhookEndpoint(name="gw", url=f"http://127.0.0.1:{port}/breakers", secret=secret, timeout_seconds=5)
    changes = make_changes(entities=3, versions=4)
    first, late = changes[:9], changes[9:]  # versions 1-3 now, version 4 after the second restart
    path = tmp_path / "outbox.db"

    def start(attempts: Attempts) -> tuple[Outbox, Running]:
        box = Outbox(path, base_delay=0.02, max_delay=0.2, max_attempts=10_000)
        return box, Running(WebhookSender(box, [endpoint], on_attempt=attempts))

    async def scenario() -> None:
        # Receiver down: every entity's first change is refused a few times.
        attempts = Attempts()
        box, running = start(attempts)
        assert all(running.sender.enqueue(c, endpoint) for c in first)
        await attempts.until(lambda log: len(log) >= 9)
        assert all((error or "").startswith(REFUSED) for _, error in attempts.log), attempts.log
        assert {delivery_id for delivery_id, _ in attempts.log} == {f"chg-k{e}-v1:gw" for e in range(3)}

        # Restart while down: the new sender picks the pending deliveries up from the file.
        await running.halt()
        box.close()
        box, running = start(Attempts())
        assert box.pending_count() == 9
        assert not running.sender.enqueue(first[0], endpoint)  # known across the restart

        # Receiver up; restart again once some (not all) are delivered.
        async with HttpRecorder(port) as receiver:
            await receiver.wait_for(lambda requests: len(requests) >= 4, WAIT)
            await running.halt()
            box.close()
            delivered_before = len(receiver.requests)
            box, running = start(Attempts())
            assert 0 < box.pending_count() == 9 - delivered_before  # a restart mid-way, nothing half-done

            for c in [*first, *late]:  # what was sent before the restart is not sent again
                running.sender.enqueue(c, endpoint)
            await receiver.wait_for(lambda requests: len(requests) >= len(changes), WAIT)
            await running.halt()
            assert box.pending_count() == 0 and box.dead_letters() == []
            box.close()
        check_requests(receiver.requests, secret, changes)

    asyncio.run(scenario())


def test_retry_after_is_honoured_and_an_idle_sender_wakes_on_new_work(tmp_path: Path) -> None:
    secret = generate_secret()

    def respond(_request: Recorded, index: int) -> web.Response:
        if index == 0:
            return web.Response(status=503, headers={"Retry-After": "1"}, text="overloaded")
        return web.Response(status=204)

    async def scenario() -> None:
        async with HttpRecorder(respond=respond) as receiver:
            endpoint = WebhookEndpoint(name="gw", url=receiver.url, secret=secret)
            box = Outbox(tmp_path / "outbox.db", base_delay=0.01, max_delay=0.05)
            attempts = Attempts()
            running = Running(WebhookSender(box, [endpoint], on_attempt=attempts))
            changes = make_changes(entities=1, versions=2)
            running.sender.enqueue(changes[0], endpoint)
            first, second = await receiver.wait_for(lambda requests: len(requests) >= 2, WAIT)
            gap = second.at - first.at
            assert 1.0 <= gap < 3.0, gap  # not before the receiver asked, and soon after
            assert first.headers["webhook-id"] == second.headers["webhook-id"] == "chg-k0-v1"
            assert int(second.headers["webhook-timestamp"]) >= int(first.headers["webhook-timestamp"]) + 1
            await attempts.until(lambda log: len(log) == 2)
            assert attempts.log[0][1] == "HTTP 503 Service Unavailable: overloaded"
            assert attempts.log[1] == ("chg-k0-v1:gw", None)
            assert box.next_due_in("webhook") is None  # nothing left: the sender now waits for new work...
            async with asyncio.timeout(WAIT):
                await running.sender.idle.wait()

            running.sender.enqueue(changes[1], endpoint)  # ...and is woken by it, not by a timer
            await receiver.wait_for(lambda requests: len(requests) >= 3, 5.0)
            await running.halt()
            box.close()
            check_requests(receiver.requests, secret, changes)

    asyncio.run(scenario())


def test_an_endpoint_that_never_comes_up_ends_in_the_dead_letters(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    def refuse(_request: Recorded, _index: int) -> web.Response:
        return web.Response(status=500, text="gateway config broken")

    async def scenario() -> None:
        async with HttpRecorder() as healthy, HttpRecorder(respond=refuse) as broken:
            secret = generate_secret()
            never = WebhookEndpoint(name="never", url=f"http://127.0.0.1:{free_port()}/", secret=secret)
            refusing = WebhookEndpoint(name="refusing", url=broken.url, secret=secret)
            fine = WebhookEndpoint(name="fine", url=healthy.url, secret=secret)
            box = Outbox(tmp_path / "outbox.db", max_attempts=3, base_delay=0.01, max_delay=0.05)
            attempts = Attempts()
            sender = WebhookSender(box, on_attempt=attempts)
            changes = make_changes(entities=1, versions=2)
            for change in changes:
                for endpoint in (never, refusing, fine):
                    sender.enqueue(change, endpoint)
            running = Running(sender)
            await attempts.until(lambda _log: box.pending_count() == 0)
            await running.halt()

            dead = {d.delivery_id: (d.attempts, reason) for d, reason in box.dead_letters("webhook")}
            assert set(dead) == {f"{c.change_id}:{name}" for c in changes for name in ("never", "refusing")}
            for delivery_id, (attempts_made, reason) in dead.items():
                assert attempts_made == 3
                if delivery_id.endswith(":never"):
                    assert reason.startswith(REFUSED), reason
                else:
                    assert reason == "HTTP 500 Internal Server Error: gateway config broken"
            assert len(broken.requests) == 6  # 3 attempts for each of 2 changes: a dead letter unblocks the next
            check_requests(healthy.requests, secret, changes)  # one dead receiver does not hold up another
            box.close()

    with caplog.at_level(logging.WARNING, logger="detector.alerting.webhooks"):
        asyncio.run(scenario())
    dead_logs = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(dead_logs) == 4
    assert all("dead-lettered after 3 attempts" in m for m in dead_logs)
    assert sum("gateway config broken" in m for m in dead_logs) == 2
    assert sum("ClientConnectorError" in m for m in dead_logs) == 2


def test_a_stored_delivery_for_a_removed_endpoint_is_dead_lettered_not_sent(tmp_path: Path) -> None:
    """Secrets live only in configuration, so after a restart without the endpoint there is nobody to sign for."""
    secret = generate_secret()
    path = tmp_path / "outbox.db"

    async def scenario() -> None:
        async with HttpRecorder() as receiver:
            old = WebhookEndpoint(name="old-gw", url=receiver.url, secret=secret)
            box = Outbox(path)
            sender = WebhookSender(box, [old])
            [change] = make_changes(entities=1, versions=1)
            assert sender.enqueue(change, old)
            with pytest.raises(ValueError, match="already named"):
                sender.enqueue(change, WebhookEndpoint(name="old-gw", url="http://elsewhere.example", secret=secret))
            box.close()
            assert secret not in path.read_bytes().decode(errors="replace")

            box = Outbox(path)
            async with WebhookSender(box, []) as restarted:
                assert await restarted.deliver_due() == 0
            [(dead, reason)] = box.dead_letters()
            assert (dead.delivery_id, reason) == ("chg-k0-v1:old-gw", "webhook endpoint 'old-gw' is not configured")
            assert receiver.requests == []
            box.close()

    asyncio.run(scenario())
