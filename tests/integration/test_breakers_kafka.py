"""Breakers on a real broker: ``detector breaker`` → the topic → a BreakerFollower → the ASGI middleware.

Each test uses its own breakers topic. The CLI runs in-process (in a thread, as it runs its
own event loop); the middleware is called as an ASGI app with scope, receive and send.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from detector.cli import main as cli_main
from detector.enforce import BreakerFollower, BreakerMiddleware, BreakerTable, Message, Receive, Scope, Send
from detector.events import BreakerChange, BreakerState
from tests.integration.kafka_tools import read_all, topic_configs

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

ENTITY = "session:s-bad"
KEY = "session:search/s-bad"  # its key on the topic: a session is its team's


async def ok_app(scope: Scope, receive: Receive, send: Send) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


async def request(app: BreakerMiddleware, session: str) -> tuple[int, dict[bytes, bytes], bytes]:
    """One POST through the middleware as an ASGI server would make it: status, headers, body."""
    scope: Scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "method": "POST",
        "path": "/v1/chat/completions",
        "headers": [(b"x-session-id", session.encode()), (b"x-api-key-id", b"k-1"), (b"x-team", b"search")],
    }
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    await app(scope, receive, send)
    start, body = sent
    return start["status"], dict(start["headers"]), body["body"]


def state_is(state: BreakerState) -> Any:
    def check(table: BreakerTable) -> bool:
        change = table.get(KEY)
        return change is not None and change.state is state

    return check


@pytest.fixture
def breakers_topic(kafka_bootstrap: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A fresh breakers topic; the CLI finds broker and topic through STORMWATCH_KAFKA__* variables."""
    topic = f"it-breakers-{uuid.uuid4().hex[:8]}"
    monkeypatch.delenv("STORMWATCH_CONFIG", raising=False)
    monkeypatch.setenv("STORMWATCH_KAFKA__BOOTSTRAP_SERVERS", kafka_bootstrap)
    monkeypatch.setenv("STORMWATCH_KAFKA__BREAKERS_TOPIC", topic)
    monkeypatch.setenv("STORMWATCH_KAFKA__PARTITIONS", "3")
    yield topic


def cli(*args: str) -> int:
    return cli_main(["breaker", *args])


def test_cli_opens_a_session_breaker_the_gateway_refuses_it_and_closing_lets_it_pass(
    kafka_bootstrap: str, breakers_topic: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    table = BreakerTable()
    app = BreakerMiddleware(ok_app, table)
    follower = BreakerFollower(table, kafka_bootstrap, breakers_topic, poll_seconds=0.2)

    async def scenario() -> dict[str, float]:
        took: dict[str, float] = {}
        await follower.start()  # before the topic exists: the CLI creates it
        try:
            assert (await request(app, "s-bad"))[0] == 200
            start = time.monotonic()
            opened = await asyncio.to_thread(
                cli,
                "open",
                ENTITY,
                "--owner",
                "search",
                "--reason",
                "agent loop in s-bad",
                "--ttl",
                "30m",
                "--by",
                "ana",
            )
            assert opened == 0
            await follower.wait_until(state_is(BreakerState.OPEN), timeout=15)
            took["open"] = time.monotonic() - start
            async with asyncio.timeout(5):
                await follower.ready

            status, headers, body = await request(app, "s-bad")
            assert status == 429, body
            refusal = json.loads(body)
            assert refusal["error"] == "circuit_open" and refusal["entity"] == ENTITY
            assert refusal["reason"] == "agent loop in s-bad" and refusal["incident_id"] is None
            assert 1790 <= refusal["retry_after"] <= 1800
            assert headers[b"retry-after"] == str(refusal["retry_after"]).encode()
            assert (await request(app, "s-good"))[0] == 200  # other sessions of the same key and team pass

            capsys.readouterr()
            assert await asyncio.to_thread(cli, "list") == 0
            listed = capsys.readouterr().out
            assert ENTITY in listed and "open" in listed and "agent loop in s-bad" in listed and "ana" in listed

            # close through a config file this time (no STORMWATCH_KAFKA__* in the way)
            config = tmp_path / "stormwatch.toml"
            config.write_text(
                f'[kafka]\nbootstrap_servers = "{kafka_bootstrap}"\nbreakers_topic = "{breakers_topic}"\n'
            )
            with pytest.MonkeyPatch.context() as env:
                for name in ("BOOTSTRAP_SERVERS", "BREAKERS_TOPIC", "PARTITIONS"):
                    env.delenv(f"STORMWATCH_KAFKA__{name}")
                start = time.monotonic()
                closed = await asyncio.to_thread(
                    cli, "close", ENTITY, "--reason", "agent fixed", "--by", "bob", "--config", str(config)
                )
                assert closed == 0
                await follower.wait_until(state_is(BreakerState.CLOSED), timeout=15)
                took["close"] = time.monotonic() - start
            assert (await request(app, "s-bad"))[0] == 200

            capsys.readouterr()
            assert await asyncio.to_thread(cli, "list") == 0
            assert ENTITY not in capsys.readouterr().out
            assert await asyncio.to_thread(cli, "list", "--all") == 0
            listed = capsys.readouterr().out
            assert ENTITY in listed and "closed" in listed and "agent fixed" in listed
            assert await asyncio.to_thread(cli, "close", ENTITY, "--reason", "again", "--by", "bob") == 0  # no-op
        finally:
            await follower.stop()
        return took

    took = asyncio.run(scenario())
    print(f"CLI call to follower update: open {took['open']:.2f} s, close {took['close']:.2f} s")
    assert took["open"] < 10 and took["close"] < 10

    # The compacted topic holds the newest change; the audit topic holds both, with who and why.
    written = asyncio.run(read_all(kafka_bootstrap, breakers_topic))
    changes = [BreakerChange.model_validate_json(r.value) for r in written]
    assert [(c.state.value, c.actor) for c in changes] == [("open", "ana"), ("closed", "bob")]
    assert changes[1].version > changes[0].version and changes[1].previous_state is BreakerState.OPEN
    audit = asyncio.run(read_all(kafka_bootstrap, f"{breakers_topic}.audit"))
    records = [json.loads(r.value) for r in audit]
    assert [(a["action"], a["actor"], a["reason"]) for a in records] == [
        ("open", "ana", "agent loop in s-bad"),
        ("close", "bob", "agent fixed"),
    ]
    assert [BreakerChange.model_validate(a["change"]) for a in records] == changes
    assert all(r.key == KEY.encode() for r in audit) and all(a["at"] for a in records)

    configs = asyncio.run(topic_configs(kafka_bootstrap, [breakers_topic, f"{breakers_topic}.audit"]))
    assert configs[breakers_topic]["cleanup.policy"] == "compact"
    assert configs[f"{breakers_topic}.audit"]["cleanup.policy"] == "delete"
    assert configs[f"{breakers_topic}.audit"]["retention.ms"] == str(365 * 86400 * 1000)


def test_a_follower_started_later_catches_up_before_ready(kafka_bootstrap: str, breakers_topic: str) -> None:
    assert cli("open", "api_key:k-9", "--reason", "runaway batch", "--ttl", "none", "--by", "ana") == 0
    assert cli("open", ENTITY, "--owner", "search", "--reason", "loop", "--by", "ana") == 0
    assert cli("close", ENTITY, "--reason", "fixed", "--by", "bob") == 0

    async def scenario() -> BreakerTable:
        table = BreakerTable()
        async with BreakerFollower(table, kafka_bootstrap, breakers_topic) as follower, asyncio.timeout(15):
            await follower.ready
        return table

    table = asyncio.run(scenario())
    assert not table.allowed(api_key="k-9") and table.allowed(session="s-bad")
    k9 = table.get("api_key:k-9")
    assert k9 is not None and k9.expires_at is None and k9.reason == "runaway batch"
    s_bad = table.get(KEY)
    assert s_bad is not None and s_bad.state is BreakerState.CLOSED
    assert len(table) == 1


def test_the_cli_fails_cleanly_without_a_broker(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STORMWATCH_KAFKA__BOOTSTRAP_SERVERS", "127.0.0.1:1")
    assert cli("open", ENTITY, "--owner", "search", "--reason", "loop") == 1
