"""``SlackSender`` against a fake Slack Web API on 127.0.0.1: threads, rate limits, outages, restarts.

Every test drives a real sender (slack-sdk's ``AsyncWebClient`` over HTTP) and a real outbox file, and
looks at what the fake Slack received. Waits are on the fake's request log, never on the clock, except
where the clock is the point (Retry-After, an outage that lasts a while).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from slack_sdk.errors import SlackApiError

from detector.alerting.outbox import Outbox
from detector.alerting.slack import CHANNEL, SlackSender
from detector.events import Alert
from tests.integration.fake_slack import FakeSlack

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

CH = "C0ALERTS"


def make_alert(incident: str, sequence: int, status: str, **over: Any) -> Alert:
    """One lifecycle record of a retry storm on api_key:k-<incident>."""
    minute = 10 + sequence
    base: dict[str, Any] = {
        "alert_id": f"{incident}-{sequence}",
        "incident_id": incident,
        "sequence": sequence,
        "kind": "retry_storm",
        "status": status,
        "severity": "critical",
        "entity": {"type": "api_key", "id": f"k-{incident}"},
        "owner": "search",
        "detected_at": f"2026-11-06T03:{minute}:00Z",
        "started_at": "2026-11-06T03:09:40Z",
        "resolved_at": f"2026-11-06T03:{minute}:00Z" if status == "resolved" else None,
        "evidence": {
            "metric": "attempts_per_minute",
            "baseline": 3.0,
            "observed": 30.0 + 10 * sequence,
            "ratio": 10.0 + 3 * sequence,
            "window_seconds": 20,
        },
        "explanation": {"summary": f"api key k-{incident} is retrying failing calls (record {sequence})."},
        "cost_rate_usd_per_hour": 100.0 * (sequence + 1),
        "excess_cost_usd": 5.0 * (sequence + 1),
        "recommended_action": "Fix the client's retry policy.",
        "detector": {"name": "retry_storm", "version": "1.0"},
    }
    base.update(over)
    return Alert.model_validate(base)


def lifecycle(incident: str) -> list[Alert]:
    return [
        make_alert(incident, 0, "firing"),
        make_alert(incident, 1, "updated"),
        make_alert(incident, 2, "resolved"),
    ]


def new_sender(slack: FakeSlack, path: Path, *, token: str | None = None, **outbox_args: Any) -> SlackSender:
    """A sender and its outbox on ``path``, with short backoffs so failures retry within the test."""
    outbox = Outbox(path, **{"base_delay": 0.05, "max_delay": 0.3, **outbox_args})
    return SlackSender(
        outbox,
        state_path=path,
        token=token or slack.token,
        base_url=slack.base_url,
        pause_base=0.05,
        pause_max=0.3,
        idle_check=None,  # only enqueue or a due time may wake it
    )


@asynccontextmanager
async def running(sender: SlackSender) -> AsyncIterator[None]:
    """``sender.run`` in the background; stopped (and must stop promptly) when the block ends."""
    stop = asyncio.Event()
    task = asyncio.create_task(sender.run(stop))
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)


async def close(sender: SlackSender) -> None:
    await sender.close()
    sender.outbox.close()


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(scenario(), 45))


def header(blocks: list[dict[str, Any]]) -> str:
    text: str = blocks[0]["text"]["text"]
    return text


def posted_ok(slack: FakeSlack) -> int:
    return len(slack.calls("chat.postMessage", ok=True))


def posts_ok(n: int) -> Callable[[FakeSlack], bool]:
    return lambda slack: posted_ok(slack) == n


def updated_ok(slack: FakeSlack) -> int:
    return len(slack.calls("chat.update", ok=True))


def test_an_incident_is_one_message_with_its_updates_in_the_thread(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with FakeSlack() as slack:
            sender = new_sender(slack, tmp_path / "outbox.db")
            for alert in lifecycle("inc-a"):
                assert sender.enqueue(alert, CH, "Breaker opened on api_key:k-inc-a until 03:25 UTC")
            async with running(sender):
                await slack.wait_for(lambda s: posted_ok(s) == 3 and updated_ok(s) == 2)

            [root] = slack.top_level()
            assert header(root.blocks) == "✅ RESOLVED · Retry storm · api_key:k-inc-a"  # the parent, edited
            assert root.edits == 2
            replies = slack.replies(root.ts)
            assert [header(m.blocks) for m in replies] == [
                "🔴 UPDATED · Retry storm · api_key:k-inc-a",
                "✅ RESOLVED · Retry storm · api_key:k-inc-a",
            ]
            posts = slack.calls("chat.postMessage")
            assert [c.body.get("thread_ts") for c in posts] == [None, root.ts, root.ts]
            assert header(posts[0].body["blocks"]) == "🔴 FIRING · Retry storm · api_key:k-inc-a"
            assert "$100.00/h" in posts[0].body["text"] and "10.0x normal" in posts[0].body["text"]
            updates = slack.calls("chat.update")
            assert [(c.body["channel"], c.body["ts"]) for c in updates] == [(CH, root.ts), (CH, root.ts)]
            assert [header(c.body["blocks"]) for c in updates] == [
                "🔴 UPDATED · Retry storm · api_key:k-inc-a",
                "✅ RESOLVED · Retry storm · api_key:k-inc-a",
            ]
            assert all(c.headers["Authorization"] == f"Bearer {slack.token}" for c in slack.requests)
            assert len(slack.requests) == 5  # nothing else, nothing twice
            assert sender.outbox.pending_count(CHANNEL) == 0
            assert sender.outbox.result("inc-a-0") == {"channel": CH, "ts": root.ts, "thread_ts": None}
            assert sender.outbox.result("inc-a-2") == {
                "channel": CH,
                "ts": replies[1].ts,
                "thread_ts": root.ts,
                "parent_updated": True,
            }
            assert not sender.enqueue(lifecycle("inc-a")[0], CH, None)  # the same record again: ignored
            await close(sender)

    run(scenario)


def test_a_429_holds_the_delivery_and_the_channel_for_retry_after(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with FakeSlack() as slack:
            slack.fail_next(1, status=429, retry_after=1, methods={"chat.postMessage"})
            sender = new_sender(slack, tmp_path / "outbox.db")
            sender.enqueue(make_alert("inc-a", 0, "firing"), CH, None)
            sender.enqueue(make_alert("inc-b", 0, "firing"), CH, None)
            async with running(sender):
                await slack.wait_for(lambda s: posted_ok(s) == 2)

            limited, *later = slack.calls("chat.postMessage")
            assert limited.status == 429 and limited.body["metadata"]["event_payload"]["incident_id"] == "inc-a"
            assert len(later) == 2 and all(c.status == 200 for c in later)
            # The retry, and the other incident's first try, waited for Retry-After.
            assert all(c.at - limited.at >= 1.0 for c in later), [c.at - limited.at for c in later]
            assert sorted(m.text.split(" on ")[1].split(" ")[0] for m in slack.top_level()) == [
                "api_key:k-inc-a",
                "api_key:k-inc-b",
            ]
            assert sender.outbox.pending_count(CHANNEL) == 0 and sender.outbox.dead_letters() == []
            await close(sender)

    run(scenario)


def test_slack_down_for_a_while_then_up_loses_nothing_and_posts_nothing_twice(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> None:
        async with FakeSlack() as slack:
            await slack.down()
            # Two attempts: an outage must not dead-letter anything, however long it lasts.
            sender = new_sender(slack, tmp_path / "outbox.db", max_attempts=2)
            for incident in ("inc-a", "inc-b"):
                for alert in lifecycle(incident)[:2]:
                    sender.enqueue(alert, CH, None)
            async with running(sender):
                await asyncio.sleep(1.5)  # the outage
                unavailable = [r for r in caplog.records if "slack unavailable" in r.getMessage()]
                assert len(unavailable) >= 3  # it kept trying, paced by the channel's backoff
                assert sender.outbox.dead_letters() == []
                assert sender.outbox.pending_count(CHANNEL) == 4
                await slack.up()
                await slack.wait_for(lambda s: posted_ok(s) == 4 and updated_ok(s) == 2)

            assert len(slack.requests) == 6
            roots = slack.top_level()
            assert len(roots) == 2
            for root in roots:
                [reply] = slack.replies(root.ts)
                assert header(reply.blocks).startswith("🔴 UPDATED") and root.edits == 1
                assert header(root.blocks).split(" · ")[-1] == header(reply.blocks).split(" · ")[-1]
            assert sender.outbox.pending_count(CHANNEL) == 0 and sender.outbox.dead_letters() == []
            await close(sender)

    with caplog.at_level(logging.WARNING, logger="stormwatch.slack"):
        run(scenario)


def test_a_500_on_the_parent_update_does_not_post_the_reply_twice(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with FakeSlack() as slack:
            slack.fail_next(1, status=500, methods={"chat.update"})
            sender = new_sender(slack, tmp_path / "outbox.db")
            for alert in lifecycle("inc-a")[:2]:
                sender.enqueue(alert, CH, None)
            async with running(sender):
                await slack.wait_for(lambda s: updated_ok(s) == 1)

            assert [c.status for c in slack.calls("chat.update")] == [500, 200]
            assert posted_ok(slack) == 2 and len(slack.calls("chat.postMessage")) == 2
            [root] = slack.top_level()
            assert len(slack.replies(root.ts)) == 1 and header(root.blocks).startswith("🔴 UPDATED")
            await close(sender)

    run(scenario)


@pytest.mark.parametrize("lost", ["firing", "updated"])
def test_a_post_whose_answer_is_lost_is_found_and_not_posted_twice(tmp_path: Path, lost: str) -> None:
    """Slack took the message but the answer came after the timeout: the retry finds it by its metadata."""

    async def scenario() -> None:
        async with FakeSlack() as slack:
            path = tmp_path / "outbox.db"
            sender = SlackSender(
                Outbox(path, base_delay=0.05, max_delay=0.3),
                state_path=path,
                token=slack.token,
                base_url=slack.base_url,
                request_timeout=1,
                pause_base=0.05,
                pause_max=0.3,
                idle_check=None,
            )
            firing, updated, resolved = lifecycle("inc-a")
            if lost == "firing":
                slack.answer_late("chat.postMessage", 2.0)
            for alert in (firing, updated, resolved):
                sender.enqueue(alert, CH, None)
            async with running(sender):
                if lost == "updated":
                    await slack.wait_for(lambda s: posted_ok(s) == 1)
                    slack.answer_late("chat.postMessage", 2.0)
                await slack.wait_for(lambda s: updated_ok(s) == 2)

            [root] = slack.top_level()
            assert len(slack.replies(root.ts)) == 2, "the updated and resolved records, once each"
            assert header(root.blocks).startswith("✅ RESOLVED"), "the header follows the status"
            looked = "conversations.history" if lost == "firing" else "conversations.replies"
            assert len(slack.calls(looked, ok=True)) == 1
            await close(sender)

    run(scenario)


def test_a_restarted_sender_threads_under_the_message_it_posted_before(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    firing, updated, resolved = lifecycle("inc-a")

    async def scenario() -> None:
        async with FakeSlack() as slack:
            first = new_sender(slack, path)
            first.enqueue(firing, CH, "Breaker opened on api_key:k-inc-a")
            async with running(first):
                await slack.wait_for(lambda s: posted_ok(s) == 1)
            await close(first)
            [root] = slack.top_level()

            second = new_sender(slack, path)
            assert not second.enqueue(firing, CH, None)  # re-processed after the restart: known, not sent
            assert second.enqueue(updated, CH, None)
            assert second.enqueue(resolved, CH, None)
            async with running(second):
                await slack.wait_for(lambda s: posted_ok(s) == 3 and updated_ok(s) == 2)

            assert len(slack.calls("chat.postMessage")) == 3
            assert slack.top_level() == [root]
            assert [c.body.get("thread_ts") for c in slack.calls("chat.postMessage")] == [None, root.ts, root.ts]
            assert header(root.blocks) == "✅ RESOLVED · Retry storm · api_key:k-inc-a"
            await close(second)

    run(scenario)


def test_permanent_refusals_are_dead_lettered_with_the_reason_and_the_rest_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> None:
        async with FakeSlack(refused_channels={"C0GONE"}) as slack:
            sender = new_sender(slack, tmp_path / "outbox.db")
            sender.enqueue(make_alert("inc-a", 0, "firing"), "C0GONE", None)
            sender.enqueue(make_alert("inc-b", 0, "firing"), CH, None)
            async with running(sender):
                await slack.wait_for(lambda s: posted_ok(s) == 1 and len(s.calls("chat.postMessage")) == 2)
            [(dead, reason)] = sender.outbox.dead_letters(CHANNEL)
            assert (dead.delivery_id, reason) == ("inc-a-0", "slack: channel_not_found")
            assert len(slack.calls("chat.postMessage")) == 2  # refused once, not retried
            await close(sender)

            bad = new_sender(slack, tmp_path / "bad-token.db", token="xoxb-revoked")
            with pytest.raises(SlackApiError) as refused:
                await bad.verify()
            assert refused.value.response["error"] == "invalid_auth"
            bad.enqueue(make_alert("inc-c", 0, "firing"), CH, None)
            assert await bad.deliver_due() == 0
            assert [(d.delivery_id, r) for d, r in bad.outbox.dead_letters()] == [("inc-c-0", "slack: invalid_auth")]
            await close(bad)

            good = new_sender(slack, tmp_path / "good.db")
            assert (await good.verify())["team_id"] == "T0000TEST"
            await close(good)

    with caplog.at_level(logging.ERROR, logger="stormwatch.slack"):
        run(scenario)
    refusals = [r.getMessage() for r in caplog.records if "for good" in r.getMessage()]
    assert len(refusals) == 2
    assert "channel_not_found" in refusals[0] and "invalid_auth" in refusals[1]


def test_an_idle_sender_wakes_on_enqueue(tmp_path: Path) -> None:
    """With nothing due and no idle re-check, only the enqueue can wake it: no polling."""

    async def scenario() -> None:
        async with FakeSlack() as slack:
            sender = new_sender(slack, tmp_path / "outbox.db")
            for n, incident in enumerate(["inc-a", "inc-b"], start=1):
                async with running(sender):
                    for _ in range(3):
                        await asyncio.sleep(0)  # let it reach its wait with an empty outbox
                    assert sender.outbox.next_due_in(CHANNEL) is None
                    alert = make_alert(incident, 0, "firing")
                    if n == 1:
                        assert sender.enqueue(alert, CH, None)
                    else:  # from another thread (a worker's executor, say)
                        assert await asyncio.to_thread(sender.enqueue, alert, CH, None)
                    await slack.wait_for(posts_ok(n), timeout=5)
            await close(sender)

    run(scenario)
