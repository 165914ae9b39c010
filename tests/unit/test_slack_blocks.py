"""``message_for``: what a Slack message says about an alert, and that Slack would take it."""

from __future__ import annotations

import json
from typing import Any

from detector.alerting.slack import NO_ACTION, SlackMessage, message_for
from detector.engine import Engine
from detector.events import Alert
from tests.conftest import T0, normal_hour, retry_storm


def make_alert(**over: Any) -> Alert:
    """A retry storm on api_key:k1 of team search, firing; ``over`` replaces top-level fields."""
    base: dict[str, Any] = {
        "alert_id": "a-0",
        "incident_id": "inc-42",
        "sequence": 0,
        "kind": "cost_spike",
        "status": "firing",
        "severity": "critical",
        "entity": {"type": "api_key", "id": "k1"},
        "owner": "search",
        "detected_at": "2026-11-06T03:02:10Z",
        "started_at": "2026-11-06T03:01:40Z",
        "evidence": {
            "metric": "usd_per_minute",
            "baseline": 1.672,
            "observed": 20.575,
            "ratio": 12.31,
            "window_seconds": 180,
        },
        "explanation": {
            "summary": "api key k1 now spends $1,234.50/h, 12.3x its usual $100/h; model o3 carries 81%.",
            "top_contributors": [
                {"entity": {"type": "model", "id": "o3"}, "cost_usd": 49.9, "share": 0.81},
                {"entity": {"type": "user", "id": "u-7"}, "cost_usd": 11.7, "share": 0.19},
            ],
        },
        "cost_rate_usd_per_hour": 1234.5,
        "excess_cost_usd": 18.2,
        "recommended_action": "Check what changed for api key k1 (model o3); if not meant, open its breaker.",
        "detector": {"name": "cost_spike", "version": "1.0"},
    }
    base.update(over)
    return Alert.model_validate(base)


def all_text(msg: SlackMessage) -> str:
    """Every piece of text in the blocks, in order, one per line."""
    out: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("text"), str):
                out.append(node["text"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(msg.blocks)
    return "\n".join(out)


def block_problems(msg: SlackMessage) -> list[str]:
    """Block Kit limits the message breaks (what Slack answers with invalid_blocks)."""
    problems = []
    if len(msg.blocks) > 50:
        problems.append(f"{len(msg.blocks)} blocks")
    for i, block in enumerate(msg.blocks):
        text = block.get("text", {}).get("text", "")
        if block["type"] == "header" and (len(text) > 150 or block["text"]["type"] != "plain_text"):
            problems.append(f"header {i}: {len(text)}")
        if block["type"] == "section" and len(text) > 3000:
            problems.append(f"section {i}: {len(text)}")
        for f in block.get("fields", []):
            if len(f["text"]) > 2000:
                problems.append(f"field in {i}: {len(f['text'])}")
        if block["type"] == "context" and not 1 <= len(block["elements"]) <= 10:
            problems.append(f"context {i}: {len(block['elements'])} elements")
        for e in block.get("elements", []):
            if len(e["text"]) > 3000:
                problems.append(f"context element in {i}: {len(e['text'])}")
    return problems


def test_header_is_short_and_says_status_kind_and_entity() -> None:
    msg = message_for(make_alert(), action=None)
    assert msg.blocks[0] == {
        "type": "header",
        "text": {"type": "plain_text", "text": "🔴 FIRING · Cost spike · api_key:k1", "emoji": True},
    }


def test_what_happened_who_owns_it_and_how_bad() -> None:
    text = all_text(message_for(make_alert(), action=None))
    assert "*Severity*\ncritical" in text
    assert "*Owner*\nteam search" in text
    assert "*Entity*\n`api_key:k1`" in text
    assert "*Spend now*\n$1,234.50/h" in text
    assert "*Excess so far*\n$18.20 above baseline" in text
    assert "*api key k1 now spends $1,234.50/h, 12.3x its usual $100/h; model o3 carries 81%.*" in text


def test_baseline_against_now_in_the_metric_s_own_units() -> None:
    text = all_text(message_for(make_alert(), action=None))
    assert "*Baseline → now* (per minute, last 3 min): $1.67 → *$20.57* (*12.3x*)" in text
    storm = make_alert(
        kind="retry_storm",
        evidence={
            "metric": "attempts_per_minute",
            "baseline": 2.245,
            "observed": 36.0,
            "ratio": 16.04,
            "window_seconds": 20,
        },
    )
    assert "*Baseline → now* (attempts/min, last 20 s): 2.25 → *36* (*16.0x*)" in all_text(
        message_for(storm, action=None)
    )


def test_a_metric_without_a_baseline_shows_no_ratio() -> None:
    cycle = make_alert(
        kind="agent_loop",
        evidence={"metric": "cycle_period", "baseline": 0.0, "observed": 3.0, "ratio": 0.0, "window_seconds": 60},
    )
    msg = message_for(cycle, action=None)
    assert "requests in the repeating cycle, last 60 s): *3* (no baseline to compare)" in all_text(msg)
    assert "0.0x" not in all_text(msg) + msg.text


def test_top_contributors_with_their_dollars_and_share() -> None:
    text = all_text(message_for(make_alert(), action=None))
    assert "*Top contributors* (spend in the window)\n• model `o3` $49.90 (81%)\n• user `u-7` $11.70 (19%)" in text
    bare = make_alert(explanation={"summary": "x", "top_contributors": []})
    assert "Top contributors" not in all_text(message_for(bare, action=None))


def test_recommended_action_and_what_was_done() -> None:
    text = all_text(message_for(make_alert(), action="Breaker opened on api_key:k1 until 14:05 UTC"))
    assert "*Recommended:* Check what changed for api key k1 (model o3); if not meant, open its breaker." in text
    assert "*Done:* Breaker opened on api_key:k1 until 14:05 UTC" in text
    assert f"*Done:* {NO_ACTION}" in all_text(message_for(make_alert(), action=None))
    assert NO_ACTION == "Notify only: no breaker tripped."


def test_started_and_detected_times_read_in_the_reader_s_zone_with_utc_fallback() -> None:
    text = all_text(message_for(make_alert(), action=None))
    started = int(make_alert().started_at.timestamp())
    assert f"Started <!date^{started}^{{date_short_pretty}} {{time_secs}}|Fri 06 Nov 03:01:40 UTC>" in text
    assert "detected <!date^" in text and "|Fri 06 Nov 03:02:10 UTC>" in text
    assert "resolved" not in text.split("Started", 1)[1].split("\n", 1)[0]
    resolved = make_alert(status="resolved", sequence=2, resolved_at="2026-11-06T03:30:00Z")
    assert "resolved <!date^" in all_text(message_for(resolved, action=None))


def test_label_hint_names_the_command_and_the_endpoint() -> None:
    msg = message_for(make_alert(), action=None)
    assert msg.blocks[-1]["type"] == "context"
    assert msg.blocks[-1]["elements"][-1]["text"] == (
        "Label it: `detector feedback inc-42 real|false_alarm|planned` or `POST /api/incidents/inc-42/feedback`"
    )
    without = message_for(make_alert(), action=None, label_hint=False)
    assert "detector feedback" not in all_text(without)
    assert "feedback" not in json.dumps(without.blocks)


def test_fallback_text_carries_the_essentials() -> None:
    msg = message_for(make_alert(), action=None)
    assert msg.text.startswith("[FIRING] critical cost spike on api_key:k1 (team search): $1,234.50/h, 12.3x normal.")
    assert msg.to_kwargs() == {"text": msg.text, "blocks": msg.blocks}


def test_resolved_and_updated_show_in_the_header() -> None:
    resolved = make_alert(status="resolved", sequence=2, resolved_at="2026-11-06T03:30:00Z")
    assert message_for(resolved, action=None).blocks[0]["text"]["text"] == "✅ RESOLVED · Cost spike · api_key:k1"
    updated = make_alert(status="updated", sequence=1, severity="warning")
    assert message_for(updated, action=None).blocks[0]["text"]["text"] == "🟠 UPDATED · Cost spike · api_key:k1"


def test_user_supplied_strings_are_escaped_everywhere() -> None:
    nasty = make_alert(
        entity={"type": "agent", "id": "<!channel>&co"},
        owner="r&d <team>",
        explanation={
            "summary": "agent <@U123> looping & costing > $5",
            "top_contributors": [{"entity": {"type": "user", "id": "<!here>"}, "cost_usd": 1.0, "share": 1.0}],
        },
        recommended_action="Stop <https://evil.example|this>",
        related_incidents=["<!everyone>"],
    )
    msg = message_for(nasty, action="Breaker <opened> & closed")
    mrkdwn = [b for b in all_text(msg).split("\n") if b] + [msg.text]
    joined = "\n".join(mrkdwn[1:])  # the header is plain_text: Slack shows it literally
    for raw in ("<!channel>", "<@U123>", "<!here>", "<https://evil", "<!everyone>", "<opened>", "r&d", "<team>"):
        assert raw not in joined
    assert "`agent:&lt;!channel&gt;&amp;co`" in joined
    assert "team r&amp;d &lt;team&gt;" in joined
    assert "agent &lt;@U123&gt; looping &amp; costing &gt; $5" in joined
    assert "*Done:* Breaker &lt;opened&gt; &amp; closed" in joined
    # Slack markup of our own stays intact.
    assert "<!date^" in joined


def test_huge_inputs_stay_within_block_kit_limits() -> None:
    long_id = "k" * 256
    many = [
        {"entity": {"type": "session", "id": f"{i}-" + "&" * 200}, "cost_usd": 1.0, "share": 0.01} for i in range(40)
    ]
    huge = make_alert(
        entity={"type": "session", "id": long_id},
        owner="o" * 256,
        explanation={"summary": "<&>" * 4000, "top_contributors": many},
        recommended_action="x" * 10_000,
        related_incidents=[f"inc-{i}" for i in range(500)],
    )
    msg = message_for(huge, action="y" * 10_000)
    assert block_problems(msg) == []
    assert len(msg.text) <= 3000
    # Cut with an ellipsis, never in the middle of an escaped entity.
    summary = msg.blocks[1]["text"]["text"]
    assert summary.endswith("…*")
    assert not any(summary[:-2].endswith(p) for p in ("&", "&a", "&am", "&amp", "&l", "&lt", "&g", "&gt"))
    assert "and 490 more" in all_text(msg)
    assert all_text(msg).count("• session") == 10


def test_small_and_large_numbers_read_well() -> None:
    cheap = make_alert(
        cost_rate_usd_per_hour=0.3861,
        excess_cost_usd=0.002,
        evidence={
            "metric": "usd_per_request",
            "baseline": 0.003046,
            "observed": 0.021789,
            "ratio": 7.16,
            "window_seconds": 5400,
        },
    )
    text = all_text(message_for(cheap, action=None))
    assert "*Spend now*\n$0.39/h" in text
    assert "*Excess so far*\n$0.002 above baseline" in text
    assert "(per request, last 1.5 h): $0.00305 → *$0.0218* (*7.2x*)" in text
    big = make_alert(
        evidence={
            "metric": "usd_per_minute",
            "baseline": 10.0,
            "observed": 15_000.0,
            "ratio": 1500.0,
            "window_seconds": 60,
        }
    )
    assert "$10.00 → *$15,000.00* (*1,500x*)" in all_text(message_for(big, action=None))


def test_real_engine_alerts_render_within_limits() -> None:
    """Records from the engine itself (a retry storm: firing, then resolved) all make valid messages."""
    events = normal_hour(T0) + retry_storm(T0 + 3600) + normal_hour(T0 + 3900)[:600]
    engine = Engine.default()
    alerts = [a for ev in events for a in engine.process(ev)]
    assert alerts[0].status.value == "firing" and alerts[-1].status.value == "resolved"
    for alert in alerts:
        msg = message_for(alert, action=None)
        assert block_problems(msg) == []
        assert msg.blocks[0]["text"]["text"].endswith("Retry storm · api_key:key-1")
        assert f"detector feedback {alert.incident_id} real|false_alarm|planned" in all_text(msg)
        assert "attempts/min" in all_text(msg)
