"""``detector replay --notify`` end to end: a simulated fleet, a fake Slack and a webhook gateway on 127.0.0.1.

The simulator writes a day of traffic with one retry storm and one agent loop, and a config with each
team's Slack channel and trip rules for both kinds. The test adds a kill-switch receiver (an HTTP
recorder with a fresh ``whsec_`` secret) that every team refers to, points Slack at the fake, and runs
the real command line in a thread while both servers listen in the test's event loop. The command
returns only when its outbox is drained, so what the servers recorded by then is all it sent.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import re
import tomllib
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from detector.alerting.outbox import Outbox
from detector.alerting.policy import Responder
from detector.alerting.slack import header_for
from detector.alerting.webhooks import generate_secret, verify
from detector.breakers import change_key, entity_key, format_duration
from detector.cli import main
from detector.events import Alert, BreakerChange, BreakerState
from detector.settings import load_settings
from detector.simulate import SimulationSpec, write_simulation
from tests.integration.fake_slack import FakeSlack
from tests.integration.http_recorder import HttpRecorder

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

# One retry storm and one agent loop in a day after 4 h of warm-up, at a fifth of the default rates:
# ~100k events, simulated and replayed in a few seconds.
SPEC = SimulationSpec(
    seed=5,
    days=1.0,
    warmup_hours=4.0,
    scale=0.2,
    incidents_per_day={"retry_storm": 1, "agent_loop": 1},
    benign_per_day=0,
)
TRIP_TTL = {"retry_storm": 15 * 60.0, "agent_loop": 30 * 60.0}  # the simulator's rules
WAIT = 120.0  # the whole scenario, seconds


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_simulation(SPEC, tmp_path_factory.mktemp("fleet"))


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The config file alone decides; wide lines so a dry run's output is not wrapped."""
    for name in list(os.environ):
        if name.startswith("STORMWATCH_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("COLUMNS", "400")


def write_config(fleet: dict[str, Path], out: Path, *, slack: FakeSlack, webhook_url: str, secret: str) -> Path:
    """The simulator's config, plus a webhook every team refers to, the fake Slack and an outbox in ``out``."""
    text = fleet["config"].read_text()
    generated = tomllib.loads(text)
    teams = generated["teams"]
    assert teams and all(t["slack_channel"] == f"C-{name.upper()}" for name, t in teams.items())
    assert [(r["kind"], r["action"]) for r in generated["alerting"]["rules"]] == [
        ("retry_storm", "trip"),
        ("agent_loop", "trip"),
        ("*", "notify"),
    ]
    text, n = re.subn(r"^(slack_channel = .*)$", r'\1\nwebhooks = ["gateway"]', text, flags=re.MULTILINE)
    assert n == len(teams)
    assert text.count("[alerting]\n") == 1
    text = text.replace("[alerting]\n", f'[alerting]\noutbox_path = "{out / "outbox.sqlite"}"\n')
    text += f"""
[alerting.slack]
token = "{slack.token}"
base_url = "{slack.base_url}"

[alerting.webhooks.gateway]
url = "{webhook_url}"
secret = "{secret}"
timeout_seconds = 5
"""
    path = out / "stormwatch.toml"
    path.write_text(text)
    return path


def read_alerts(path: Path) -> list[Alert]:
    return [Alert.model_validate_json(line) for line in path.read_bytes().splitlines() if line.strip()]


def expected_changes(config: Path, alerts: list[Alert]) -> list[BreakerChange]:
    """What the policy decides over the replay's alerts in event time (the Dispatcher's order: advance, decide)."""
    responder = Responder(load_settings(config))
    changes: list[BreakerChange] = []
    for alert in alerts:
        now = alert.detected_at.timestamp()
        changes += responder.advance(now)
        changes += responder.decide(alert, now).changes
    return changes


def replay_args(fleet: dict[str, Path], config: Path, out: Path, mode: str) -> list[str]:
    return [
        "replay",
        str(fleet["events"]),
        "--config",
        str(config),
        mode,
        "--quiet",
        "--alerts-out",
        str(out / "alerts.jsonl"),
        "--rejects-out",
        str(out / "rejects.jsonl"),
    ]


def test_replay_notify_threads_each_incident_and_signs_each_breaker_change_once_across_restarts(
    fleet: dict[str, Path], tmp_path: Path
) -> None:
    secret = generate_secret()

    async def scenario() -> None:
        async with FakeSlack() as slack, HttpRecorder() as gateway:
            config = write_config(fleet, tmp_path, slack=slack, webhook_url=f"{gateway.url}/breakers", secret=secret)
            argv = replay_args(fleet, config, tmp_path, "--notify")
            assert await asyncio.to_thread(main, argv) == 0
            alerts = read_alerts(tmp_path / "alerts.jsonl")
            check_slack(slack, alerts)
            check_webhooks(gateway, secret, alerts, expected_changes(config, alerts))

            # The same command again, same outbox file (a restart re-processing everything): nothing new goes out.
            slack_seen, gateway_seen = len(slack.requests), len(gateway.requests)
            assert await asyncio.to_thread(main, argv) == 0
            assert read_alerts(tmp_path / "alerts.jsonl") == alerts  # the same alerts were handled again
            assert len(slack.requests) == slack_seen
            assert len(gateway.requests) == gateway_seen

        box = Outbox(tmp_path / "outbox.sqlite")
        try:
            assert box.pending_count() == 0 and box.dead_letters() == []
        finally:
            box.close()

    asyncio.run(asyncio.wait_for(scenario(), WAIT))


def check_slack(slack: FakeSlack, alerts: list[Alert]) -> None:
    """One top-level message per incident in its team's channel; every later record a reply in its thread."""
    incidents: dict[str, list[Alert]] = defaultdict(list)
    for alert in alerts:
        incidents[alert.incident_id].append(alert)
    kinds = Counter(records[0].kind.value for records in incidents.values())
    assert kinds == {"retry_storm": 1, "agent_loop": 1}, kinds  # the simulated fleet's two incidents
    assert all(len(records) >= 2 for records in incidents.values())  # so there is a thread to check

    posts = slack.calls("chat.postMessage")
    assert all(c.status == 200 and c.answer["ok"] for c in posts), [c.answer for c in posts]
    posted_ids = Counter(c.body["metadata"]["event_payload"]["alert_id"] for c in posts)
    assert posted_ids == Counter(a.alert_id for a in alerts)  # each record exactly once
    assert len(slack.top_level()) == len(incidents)

    for incident_id, records in incidents.items():
        channel = f"C-{records[0].owner.upper()}"
        mine = [c for c in posts if c.body["metadata"]["event_payload"]["incident_id"] == incident_id]
        assert [c.body["metadata"]["event_payload"]["alert_id"] for c in mine] == [a.alert_id for a in records]
        root, *replies = mine
        assert root.body["channel"] == channel and root.body.get("thread_ts") is None
        assert records[0].status.value == "firing"
        assert json.dumps(root.body["blocks"]).count(f"Breaker opened on {records[0].entity}") == 1
        for reply in replies:
            assert reply.body["channel"] == channel and reply.body["thread_ts"] == root.answer["ts"]
        parent = slack.messages[(channel, root.answer["ts"])]
        assert parent.blocks[0]["text"]["text"] == header_for(records[-1])  # edited to where it stands now
        assert parent.edits == len(replies)
    assert len(slack.calls("chat.update", ok=True)) == len(alerts) - len(incidents)


def check_webhooks(gateway: HttpRecorder, secret: str, alerts: list[Alert], expected: list[BreakerChange]) -> None:
    """Each breaker change reached the gateway exactly once, signed, in order per entity; each starts with open."""
    assert all(r.method == "POST" and r.path == "/breakers" and r.status == 200 for r in gateway.requests)
    received = [verify(secret, r.headers, r.body) for r in gateway.requests]  # raises on a bad signature
    changes = [BreakerChange.model_validate(p["data"]) for p in received]
    assert all(p["type"] == f"breaker.{c.state.value}" for p, c in zip(received, changes, strict=True))
    assert [r.headers["webhook-id"] for r in gateway.requests] == [c.change_id for c in changes]
    ids = Counter(c.change_id for c in changes)
    assert ids == Counter(c.change_id for c in expected), "each change exactly once, none missing, none extra"
    assert {c.change_id: c for c in changes} == {c.change_id: c for c in expected}

    by_entity: dict[str, list[BreakerChange]] = defaultdict(list)
    for c in changes:
        by_entity[change_key(c)].append(c)
    firing = {a.incident_id: a for a in alerts if a.status.value == "firing"}
    tripped = {entity_key(a.entity, a.owner) for a in firing.values() if a.kind.value in TRIP_TTL}
    assert set(by_entity) == tripped and len(tripped) == 2
    for key, seq in by_entity.items():
        first = seq[0]
        assert (first.previous_state, first.state) == (BreakerState.CLOSED, BreakerState.OPEN), key
        cause = firing[first.incident_id or ""]
        assert entity_key(cause.entity, cause.owner) == key and first.owner == cause.owner
        assert first.changed_at == cause.detected_at
        assert first.expires_at is not None
        assert (first.expires_at - first.changed_at).total_seconds() == TRIP_TTL[cause.kind.value]
        assert [c.version for c in seq] == sorted({c.version for c in seq})  # in order, no repeats
        assert all(b.previous_state == a.state for a, b in itertools.pairwise(seq))
    # Time moved on past the earlier incident's TTL and probe period: its breaker went half-open, then closed.
    states = sorted([c.state.value for c in seq] for seq in by_entity.values())
    assert ["open", "half_open", "closed"] in states, states


def test_replay_dry_run_prints_what_it_would_send_and_sends_nothing(
    fleet: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    secret = generate_secret()

    async def scenario() -> tuple[str, list[Alert]]:
        async with FakeSlack() as slack, HttpRecorder() as gateway:
            url = f"{gateway.url}/breakers"
            config = write_config(fleet, tmp_path, slack=slack, webhook_url=url, secret=secret)
            capsys.readouterr()
            assert await asyncio.to_thread(main, replay_args(fleet, config, tmp_path, "--dry-run")) == 0
            err = capsys.readouterr().err
            assert slack.requests == [] and gateway.requests == []
            alerts = read_alerts(tmp_path / "alerts.jsonl")
            for change in expected_changes(config, alerts):
                until = ""
                if change.expires_at is not None:
                    until = f" for {format_duration((change.expires_at - change.changed_at).total_seconds())}"
                line = (
                    f"would publish breaker {change_key(change)}: {change.previous_state.value} -> "
                    f"{change.state.value}{until}; webhooks: gateway ({url})"
                )
                assert err.count(line) == 1, (line, err)
            return err, alerts

    err, alerts = asyncio.run(asyncio.wait_for(scenario(), WAIT))
    lines = err.splitlines()
    expected = Counter(f"would post to Slack C-{a.owner.upper()}: {header_for(a)} | " for a in alerts)
    for post, n in expected.items():
        assert sum(line.startswith(post) for line in lines) == n, (post, err)
    assert sum(line.startswith("would post to Slack ") for line in lines) == len(alerts)
    assert sum(" -> open for " in line for line in lines) == 2  # one trip per tripped entity
    assert not (tmp_path / "outbox.sqlite").exists()  # nothing stored either
