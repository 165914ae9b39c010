"""Alerts to Slack: one message per incident, its later records as replies in the thread.

Two halves. :func:`message_for` turns one alert record into a Block Kit message a person can act on at
3 a.m.; it is pure and knows nothing of Slack's API. :class:`SlackSender` gets those messages out through
the durable :class:`~detector.alerting.outbox.Outbox`: a record is put in the outbox once (its ``alert_id``
is the delivery id, the incident is the group, so one incident's records go out in order), and delivered
with ``chat.postMessage`` when Slack answers. The first record of an incident opens a top-level message;
``updated`` and ``resolved`` records are replies in its thread, and the parent is edited (``chat.update``)
so its header shows where the incident stands. Which Slack message belongs to which record and incident is
kept in a small table beside the outbox's, in the same SQLite file, so a restarted sender threads under the
message it posted before and never posts a record twice.

>>> from detector.events import Alert
>>> alert = Alert.model_validate({
...     "alert_id": "a-0", "incident_id": "inc-1", "sequence": 0, "kind": "retry_storm", "status": "firing",
...     "severity": "critical", "entity": {"type": "api_key", "id": "k1"}, "owner": "search",
...     "detected_at": "2026-11-06T03:02:10Z", "started_at": "2026-11-06T03:01:50Z",
...     "evidence": {"metric": "attempts_per_minute", "baseline": 3.0, "observed": 36.9, "ratio": 12.3,
...                  "window_seconds": 20},
...     "explanation": {"summary": "k1 retries failing calls."},
...     "cost_rate_usd_per_hour": 1234.5, "excess_cost_usd": 18.2,
...     "recommended_action": "Fix the client's retry policy.", "detector": {"name": "retry_storm", "version": "1.0"}})
>>> msg = message_for(alert, action="Breaker opened on api_key:k1 until 03:17 UTC")
>>> msg.blocks[0]["text"]["text"]
'🔴 FIRING · Retry storm · api_key:k1'
>>> msg.text
'[FIRING] critical retry storm on api_key:k1 (team search): $1,234.50/h, 12.3x normal. k1 retries failing calls.'
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_client import AsyncWebClient

from detector.alerting.outbox import Delivery, Outbox
from detector.events import Alert, AlertKind, AlertStatus, Severity

log = logging.getLogger("stormwatch.slack")

CHANNEL = "slack"
"""The outbox channel Slack deliveries live on."""

# Block Kit limits (https://docs.slack.dev/reference/block-kit/blocks).
MAX_BLOCKS = 50
MAX_SECTION_TEXT = 3000
MAX_FIELD_TEXT = 2000
MAX_HEADER_TEXT = 150
MAX_CONTEXT_ELEMENTS = 10
MAX_FALLBACK_TEXT = 3000  # Slack allows 40,000; a notification preview needs far less.
MAX_CONTRIBUTORS = 10
MAX_RELATED = 10


# -- the message ------------------------------------------------------------------------------


@dataclass(frozen=True)
class SlackMessage:
    """What ``chat.postMessage``/``chat.update`` take: a plain fallback ``text`` (notifications, screen
    readers) and the Block Kit ``blocks``."""

    text: str
    blocks: list[dict[str, Any]] = field(default_factory=list)

    def to_kwargs(self) -> dict[str, Any]:
        return {"text": self.text, "blocks": self.blocks}


_KIND_TITLE = {
    AlertKind.RETRY_STORM: "Retry storm",
    AlertKind.AGENT_LOOP: "Agent loop",
    AlertKind.COST_SPIKE: "Cost spike",
    AlertKind.BUDGET_BURN: "Budget burn",
}
_SEVERITY_ICON = {Severity.CRITICAL: "🔴", Severity.WARNING: "🟠", Severity.INFO: "🔵"}
_RESOLVED_ICON = "✅"

# metric -> (how a person says it, whether its values are dollars)
_METRICS: dict[str, tuple[str, bool]] = {
    "attempts_per_minute": ("attempts/min", False),
    "usd_per_request": ("per request", True),
    "usd_per_minute": ("per minute", True),
    "spend_usd_per_hour": ("per hour", True),
    "cycle_period": ("requests in the repeating cycle", False),
    "steady_steps": ("steps without progress", False),
    "session_steps": ("steps in the session", False),
    "burn_rate_1h": ("budget burn rate, last hour (1 = sustainable)", False),
    "burn_rate_6h": ("budget burn rate, last 6 h (1 = sustainable)", False),
}

NO_ACTION = "Notify only: no breaker tripped."


def escape(text: str) -> str:
    """Slack's three control characters, so user-supplied text can neither link, mention nor break markup.

    >>> escape("<!channel> & <@U1>")
    '&lt;!channel&gt; &amp; &lt;@U1&gt;'
    """
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def clip(text: str, limit: int) -> str:
    """At most ``limit`` characters, ending in … when cut; never cuts an ``&amp;``-style entity in half.

    >>> clip("a &amp; b", 5)
    'a …'
    """
    if len(text) <= limit:
        return text
    cut = text[: max(limit - 1, 0)]
    amp = cut.rfind("&")
    if amp != -1 and ";" not in cut[amp:] and len(cut) - amp <= len("&amp;"):
        cut = cut[:amp]
    return cut + "…"


def usd(x: float, digits: int = 2) -> str:
    """Dollars as read at 3 a.m.: cents from $0.01 up, else ``digits`` significant digits.

    >>> usd(1234.5), usd(3.2), usd(0.4213), usd(0.002345), usd(0.002), usd(0)
    ('$1,234.50', '$3.20', '$0.42', '$0.0023', '$0.002', '$0.00')
    >>> usd(0.021789, digits=3), usd(0.003046, digits=3), usd(12.5, digits=3)
    ('$0.0218', '$0.00305', '$12.50')
    """
    if not math.isfinite(x):
        return "n/a"
    sign, x = ("-", -x) if x < 0 else ("", x)
    if x == 0 or x >= 1 or (x >= 0.01 and digits <= 2):
        return f"{sign}${x:,.2f}"
    places = max(2, digits - 1 - math.floor(math.log10(x)))
    text = f"{x:.{places}f}".rstrip("0")
    return f"{sign}${text}" if len(text.split(".")[1]) >= 2 else f"{sign}${x:.2f}"


def ratio(x: float) -> str:
    """A ratio to baseline: 12.3x.

    >>> ratio(12.34), ratio(2.0), ratio(1234.0)
    ('12.3x', '2.0x', '1,234x')
    """
    if not math.isfinite(x):
        return "n/a"
    return f"{x:,.0f}x" if x >= 100 else f"{x:.1f}x"


def number(x: float) -> str:
    """A measured value, no more digits than it needs.

    >>> number(2.245), number(36.0), number(12345.678), number(0.00042)
    ('2.25', '36', '12,346', '0.00042')
    """
    if not math.isfinite(x):
        return "n/a"
    if x == int(x) and abs(x) < 1e15:
        return f"{int(x):,}"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    if abs(x) >= 0.01:
        return f"{x:.2f}".rstrip("0").rstrip(".")
    return f"{x:.2g}"


def duration(seconds: float) -> str:
    """A window length.

    >>> duration(20), duration(180), duration(5400), duration(21600), duration(90000)
    ('20 s', '3 min', '1.5 h', '6 h', '1 d 1 h')
    """
    if not math.isfinite(seconds) or seconds < 0:
        return "n/a"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    if seconds < 86400:
        return f"{seconds / 3600:.1f}".rstrip("0").rstrip(".") + " h"
    days, rest = divmod(seconds, 86400)
    return f"{days:.0f} d" + (f" {rest / 3600:.0f} h" if rest >= 1800 else "")


def _when(at: datetime) -> str:
    """A time Slack shows in the reader's own zone, with UTC as the fallback text."""
    fallback = at.strftime("%a %d %b %H:%M:%S UTC")
    return f"<!date^{int(at.timestamp())}^{{date_short_pretty}} {{time_secs}}|{fallback}>"


def _utc(at: datetime) -> str:
    return at.strftime("%a %H:%M:%S UTC")


def _user(text: str, limit: int) -> str:
    """User-supplied text (ids, summaries, actions): escaped, then clipped to ``limit``."""
    return clip(escape(text), limit)


def _label_hint(incident_id: str) -> str:
    iid = _user(incident_id, 300)
    return f"Label it: `detector feedback {iid} real|false_alarm|planned` or `POST /api/incidents/{iid}/feedback`"


def header_for(alert: Alert) -> str:
    """The header line: icon, status, kind and entity, within Slack's 150 characters."""
    icon = _RESOLVED_ICON if alert.status is AlertStatus.RESOLVED else _SEVERITY_ICON[alert.severity]
    text = f"{icon} {alert.status.value.upper()} · {_KIND_TITLE[alert.kind]} · {alert.entity}"
    return clip(text, MAX_HEADER_TEXT)


def _baseline_line(alert: Alert) -> str:
    ev = alert.evidence
    label, dollars = _METRICS.get(ev.metric, (ev.metric.replace("_", " "), False))

    def fmt(x: float) -> str:
        return usd(x, digits=3) if dollars else number(x)

    has_baseline = ev.baseline > 0 and ev.ratio > 0 and math.isfinite(ev.ratio)
    if has_baseline:
        change = f"{fmt(ev.baseline)} → *{fmt(ev.observed)}* (*{ratio(ev.ratio)}*)"
    else:
        change = f"*{fmt(ev.observed)}* (no baseline to compare)"
    return f"*Baseline → now* ({escape(label)}, last {duration(ev.window_seconds)}): {change}"


def _contributors_line(alert: Alert) -> str | None:
    rows = alert.explanation.top_contributors[:MAX_CONTRIBUTORS]
    if not rows:
        return None
    lines = [f"• {c.entity.type} `{_user(c.entity.id, 150)}` {usd(c.cost_usd)} ({c.share:.0%})" for c in rows]
    return "*Top contributors* (spend in the window)\n" + "\n".join(lines)


def message_for(alert: Alert, *, action: str | None, label_hint: bool = True) -> SlackMessage:
    """The Slack message for one alert record.

    ``action`` says what Stormwatch did about it (e.g. ``"Breaker opened on api_key:k1 until 14:05 UTC"``);
    ``None`` means it only notifies. ``label_hint`` adds how to label the incident (real, false alarm,
    planned). Every user-supplied string is escaped; every block stays within Block Kit's limits.
    """
    status = alert.status.value.upper()
    kind = _KIND_TITLE[alert.kind]
    summary = _user(alert.explanation.summary, 2500)
    entity = _user(str(alert.entity), 400)
    owner = _user(alert.owner, 400)
    blocks: list[dict[str, Any]] = [
        {"type": "header", "text": {"type": "plain_text", "text": header_for(alert), "emoji": True}},
        _section(f"*{summary}*" if summary else f"*{kind} on {entity}*"),
        {
            "type": "section",
            "fields": [
                _mrkdwn(f"*Severity*\n{alert.severity.value}", MAX_FIELD_TEXT),
                _mrkdwn(f"*Owner*\nteam {owner}", MAX_FIELD_TEXT),
                _mrkdwn(f"*What*\n{kind}", MAX_FIELD_TEXT),
                _mrkdwn(f"*Entity*\n`{entity}`", MAX_FIELD_TEXT),
                _mrkdwn(f"*Spend now*\n{usd(alert.cost_rate_usd_per_hour)}/h", MAX_FIELD_TEXT),
                _mrkdwn(f"*Excess so far*\n{usd(alert.excess_cost_usd)} above baseline", MAX_FIELD_TEXT),
            ],
        },
        _section(_baseline_line(alert)),
    ]
    contributors = _contributors_line(alert)
    if contributors:
        blocks.append(_section(contributors))
    blocks.append(_section(f"*Recommended:* {_user(alert.recommended_action, 2500)}"))
    blocks.append(_section(f"*Done:* {_user(action, 2500) if action else NO_ACTION}"))
    times = f"Started {_when(alert.started_at)} · detected {_when(alert.detected_at)}"
    if alert.resolved_at is not None:
        times += f" · resolved {_when(alert.resolved_at)}"
    context: list[dict[str, Any]] = [_mrkdwn(times, MAX_SECTION_TEXT)]
    if alert.related_incidents:
        related = ", ".join(f"`{_user(i, 100)}`" for i in alert.related_incidents[:MAX_RELATED])
        more = len(alert.related_incidents) - MAX_RELATED
        context.append(_mrkdwn(f"Related: {related}" + (f" and {more} more" if more > 0 else ""), MAX_SECTION_TEXT))
    blocks.append({"type": "context", "elements": context})
    footer = [
        _mrkdwn(
            f"incident `{_user(alert.incident_id, 300)}` · record {alert.sequence} ({alert.status.value}) · "
            f"detector {_user(alert.detector.name, 100)} {_user(alert.detector.version, 50)}",
            MAX_SECTION_TEXT,
        )
    ]
    if label_hint:
        footer.append(_mrkdwn(_label_hint(alert.incident_id), MAX_SECTION_TEXT))
    blocks.append({"type": "context", "elements": footer[:MAX_CONTEXT_ELEMENTS]})

    rate = f"{usd(alert.cost_rate_usd_per_hour)}/h"
    if alert.evidence.baseline > 0 and alert.evidence.ratio > 0:
        rate += f", {ratio(alert.evidence.ratio)} normal"
    text = f"[{status}] {alert.severity.value} {kind.lower()} on {entity} (team {owner}): {rate}. {summary}"
    return SlackMessage(text=clip(text, MAX_FALLBACK_TEXT), blocks=blocks[:MAX_BLOCKS])


def _mrkdwn(text: str, limit: int) -> dict[str, Any]:
    return {"type": "mrkdwn", "text": clip(text, limit)}


def _section(text: str) -> dict[str, Any]:
    return {"type": "section", "text": _mrkdwn(text, MAX_SECTION_TEXT)}


# -- the sender -------------------------------------------------------------------------------

# ok=false errors that say "Slack had a problem", not "this message can never go": retried.
TRANSIENT_ERRORS = frozenset({"ratelimited", "internal_error", "fatal_error", "service_unavailable", "request_timeout"})
# chat.update errors after which the parent simply stays as it was (the reply in the thread went out).
FIND_SLACK_SECONDS = 120.0  # a lost post is looked for from this long before its first attempt (clock skew)
_PARENT_GONE = frozenset({"message_not_found", "cant_update_message", "edit_window_closed", "is_inactive"})

_THREADS_SCHEMA = """
CREATE TABLE IF NOT EXISTS slack_messages (
    alert_id    TEXT PRIMARY KEY,   -- the record (and outbox delivery) this message was posted for
    incident_id TEXT NOT NULL,
    target      TEXT NOT NULL,      -- the channel as the delivery named it
    channel     TEXT NOT NULL,      -- the channel id Slack answered with (chat.update needs it)
    ts          TEXT NOT NULL,
    thread_ts   TEXT,               -- NULL: this message is the incident's top-level message
    posted_at   REAL NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS slack_roots ON slack_messages (incident_id, target) WHERE thread_ts IS NULL;
CREATE TABLE IF NOT EXISTS slack_attempts (
    alert_id    TEXT PRIMARY KEY,   -- a chat.postMessage sent for this record whose answer was not recorded
    thread_ts   TEXT,               -- the thread it went to (NULL: top level)
    started_at  REAL NOT NULL       -- epoch seconds of the first such attempt
);
CREATE INDEX IF NOT EXISTS slack_by_incident ON slack_messages (incident_id, posted_at);
"""


@dataclass(frozen=True)
class Posted:
    """A message Slack accepted."""

    channel: str
    ts: str
    thread_ts: str | None


class SlackThreads:
    """Which Slack message was posted for which record, and so which thread an incident lives in.

    A table of its own beside the outbox's, in the same SQLite file, so it survives a restart with it.
    """

    def __init__(self, path: str | Path) -> None:
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA busy_timeout=5000")
        if str(path) != ":memory:":
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_THREADS_SCHEMA)

    def posted(self, alert_id: str) -> Posted | None:
        """The message already posted for this record, if any."""
        row = self._db.execute(
            "SELECT channel, ts, thread_ts FROM slack_messages WHERE alert_id = ?", (alert_id,)
        ).fetchone()
        return Posted(*row) if row else None

    def root(self, incident_id: str, target: str) -> Posted | None:
        """The incident's top-level message in this channel, if one was posted."""
        row = self._db.execute(
            "SELECT channel, ts, thread_ts FROM slack_messages WHERE incident_id = ? AND target = ?"
            " AND thread_ts IS NULL",
            (incident_id, target),
        ).fetchone()
        return Posted(*row) if row else None

    def record(self, alert_id: str, incident_id: str, target: str, posted: Posted, at: float) -> None:
        # Autocommit: message first, then the attempt note. A crash between leaves a note that
        # posted() makes moot (the message is found before the note is looked at).
        self._db.execute(
            "INSERT OR IGNORE INTO slack_messages VALUES (?, ?, ?, ?, ?, ?, ?)",
            (alert_id, incident_id, target, posted.channel, posted.ts, posted.thread_ts, at),
        )
        self.forget_attempt(alert_id)

    def attempting(self, alert_id: str, thread_ts: str | None, at: float) -> None:
        """Note a post about to go out, before it does: if its answer is lost, the next try looks first."""
        self._db.execute("INSERT OR IGNORE INTO slack_attempts VALUES (?, ?, ?)", (alert_id, thread_ts, at))

    def forget_attempt(self, alert_id: str) -> None:
        self._db.execute("DELETE FROM slack_attempts WHERE alert_id = ?", (alert_id,))

    def attempt(self, alert_id: str) -> tuple[str | None, float] | None:
        """(thread, first time) of a post sent for this record whose answer was never recorded."""
        row = self._db.execute(
            "SELECT thread_ts, started_at FROM slack_attempts WHERE alert_id = ?", (alert_id,)
        ).fetchone()
        return (row[0], float(row[1])) if row else None

    def prune(self, before: float) -> int:
        """Forget incidents whose last message was posted before ``before`` (epoch seconds)."""
        cursor = self._db.execute(
            "DELETE FROM slack_messages WHERE incident_id IN"
            " (SELECT incident_id FROM slack_messages GROUP BY incident_id HAVING MAX(posted_at) < ?)",
            (before,),
        )
        stale = self._db.execute("DELETE FROM slack_attempts WHERE started_at < ?", (before,))
        return cursor.rowcount + stale.rowcount

    def close(self) -> None:
        self._db.close()


class _Transient(Exception):
    """Slack cannot take anything now (unreachable, 5xx, rate limited): the cause is Slack, not this message."""

    def __init__(self, reason: str, *, retry_after: float | None = None, maybe_done: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after
        # Slack may have carried the call out (no answer, or a 5xx a proxy may give after forwarding it).
        self.maybe_done = maybe_done


class _Permanent(Exception):
    """Slack refused it for good (no such channel, bad token, bad blocks): no retry can fix it."""


def _retry_after(response: Any) -> float:
    headers = getattr(response, "headers", None) or {}
    value = next((v for k, v in headers.items() if str(k).lower() == "retry-after"), None)
    try:
        return max(float(value), 0.0) if value is not None else 1.0
    except ValueError:
        return 1.0


def _classify(exc: SlackApiError) -> _Transient | _Permanent:
    response = exc.response
    status = int(getattr(response, "status_code", 0) or 0)
    data = getattr(response, "data", None)
    code = str(data.get("error", "")) if isinstance(data, dict) else ""
    if status == 429 or code == "ratelimited":
        return _Transient(f"HTTP {status} ratelimited", retry_after=_retry_after(response))
    if status >= 500 or code in TRANSIENT_ERRORS:
        return _Transient(f"HTTP {status} {code}".rstrip(), maybe_done=status >= 500)
    return _Permanent(code or f"HTTP {status}")


class SlackSender:
    """Delivers the Slack deliveries of an :class:`Outbox`: one thread per incident, updates as replies.

    ``enqueue`` stores a record durably (nothing is sent yet); ``deliver_due`` makes one pass over what is
    due; ``run`` keeps delivering until ``stop`` is set, sleeping until the next delivery is due or a new one
    is enqueued. Rate limits (429 + Retry-After) hold the delivery and the whole channel back at least that
    long; Slack down or answering 5xx pauses the channel with a growing backoff while the failed delivery
    backs off in the outbox. An outage never dead-letters a message: only Slack saying no for good does
    (``channel_not_found``, ``invalid_auth``, ...), with the reason, logged.

    ``state_path`` is where the incident -> thread table lives; give the outbox's own file.
    """

    def __init__(
        self,
        outbox: Outbox,
        *,
        state_path: str | Path,
        token: str | None = None,
        base_url: str = AsyncWebClient.BASE_URL,
        client: AsyncWebClient | None = None,
        label_hint: bool = True,
        batch: int = 50,
        request_timeout: int = 15,
        pause_base: float = 1.0,
        pause_max: float = 60.0,
        idle_check: float | None = 60.0,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.outbox = outbox
        self.threads = SlackThreads(state_path)
        # No retry handlers of slack-sdk's own: every retry goes through the outbox, so none is lost.
        self.client = client or AsyncWebClient(
            token=token, base_url=base_url, timeout=request_timeout, retry_handlers=[]
        )
        self.label_hint = label_hint
        self.batch = batch
        self.pause_base = pause_base
        self.pause_max = pause_max
        self.idle_check = idle_check  # re-check the outbox this often when idle (another process may fill it)
        self._rng = rng or random.Random()
        self._clock = clock
        self._paused_until = 0.0
        self._outages = 0  # consecutive outage failures; sets the channel pause
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- putting in ------------------------------------------------------------------------

    def enqueue(self, alert: Alert, channel_id: str, action: str | None = None) -> bool:
        """Store ``alert`` for ``channel_id``; False when this record was enqueued before (nothing changes).

        ``action`` is what was done about it, shown in the message (None: notify only).
        """
        payload = {"alert": alert.model_dump(mode="json"), "action": action}
        added = self.outbox.put(alert.alert_id, CHANNEL, channel_id, payload, group=alert.incident_id)
        if added:
            self._notify()
        return added

    def _notify(self) -> None:
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if self._loop is not None and running is not self._loop:
            self._loop.call_soon_threadsafe(self._wake.set)
        else:
            self._wake.set()

    # -- sending -----------------------------------------------------------------------------

    async def verify(self) -> dict[str, Any]:
        """``auth.test``: who the token is; raises ``SlackApiError`` (e.g. ``invalid_auth``) when it is bad."""
        response = await self.client.auth_test()
        return dict(response.data) if isinstance(response.data, dict) else {}

    @property
    def paused_for(self) -> float:
        """Seconds the channel still waits after a rate limit or an outage (0 when it may send)."""
        return max(0.0, self._paused_until - self._clock())

    async def deliver_due(self) -> int:
        """One pass over the due deliveries; returns how many were delivered.

        Stops early when Slack rate-limits or is unreachable: the rest wait for the channel's pause.
        """
        delivered = 0
        if self.paused_for > 0:
            return 0
        for delivery in self.outbox.due(CHANNEL, limit=self.batch):
            if self.paused_for > 0:
                break
            if await self._attempt(delivery):
                delivered += 1
        return delivered

    async def run(self, stop: asyncio.Event) -> None:
        """Deliver until ``stop`` is set: after each pass, sleep until something is due or enqueued."""
        self._loop = asyncio.get_running_loop()
        stopping = asyncio.ensure_future(stop.wait())
        try:
            while not stop.is_set():
                self._wake.clear()
                try:
                    await self.deliver_due()
                except Exception:  # the outbox's file, a bug: keep the loop alive, try again after a pause
                    log.exception("slack delivery pass failed")
                    self._pause_for_outage()
                waking = asyncio.ensure_future(self._wake.wait())
                try:
                    await asyncio.wait(
                        {stopping, waking}, timeout=self._sleep_for(), return_when=asyncio.FIRST_COMPLETED
                    )
                finally:
                    waking.cancel()
        finally:
            stopping.cancel()
            self._loop = None

    def _sleep_for(self) -> float | None:
        due_in = self.outbox.next_due_in(CHANNEL)
        if due_in is None:
            return self.idle_check
        return max(due_in, self.paused_for)

    async def close(self) -> None:
        """Close the thread table (the outbox is the caller's)."""
        self.threads.close()

    def prune(self, older_than: float = 30 * 86400.0) -> int:
        """Forget the threads of incidents quiet for ``older_than`` seconds; later records start a new one."""
        return self.threads.prune(time.time() - older_than)

    async def _attempt(self, delivery: Delivery) -> bool:
        try:
            result = await self._send(delivery)
        except _Transient as exc:
            self._on_transient(delivery, exc)
            return False
        except _Permanent as exc:
            log.error(
                "slack refused delivery %s (incident %s, channel %s) for good: %s; dead-lettered",
                delivery.delivery_id,
                delivery.group,
                delivery.target,
                exc,
            )
            self.outbox.give_up(delivery.delivery_id, f"slack: {exc}")
            return False
        except Exception as exc:  # unexpected: retried through the outbox, dead-lettered after max_attempts
            log.exception("slack delivery %s failed unexpectedly", delivery.delivery_id)
            if not self.outbox.failed(delivery.delivery_id, f"{type(exc).__name__}: {exc}"):
                log.error("slack delivery %s dead-lettered after %s", delivery.delivery_id, exc)
            return False
        self.outbox.delivered(delivery.delivery_id, result)
        self._outages = 0
        return True

    def _on_transient(self, delivery: Delivery, exc: _Transient) -> None:
        if exc.retry_after is not None:
            self._paused_until = max(self._paused_until, self._clock() + exc.retry_after)
            log.warning(
                "slack rate limit: holding the channel %.1f s (delivery %s)", exc.retry_after, delivery.delivery_id
            )
        else:
            self._pause_for_outage()
            log.warning(
                "slack unavailable (%s): holding the channel %.1f s (delivery %s)",
                exc.reason,
                self.paused_for,
                delivery.delivery_id,
            )
        if delivery.attempts + 1 >= self.outbox.max_attempts:
            # The cause is Slack, not this message: never dead-letter it for that. It stays pending and
            # due; the channel pause paces the next tries.
            return
        self.outbox.failed(delivery.delivery_id, f"slack: {exc.reason}", retry_after=exc.retry_after)

    def _pause_for_outage(self) -> None:
        self._outages += 1
        ceiling = min(self.pause_max, self.pause_base * 2.0 ** (self._outages - 1))
        self._paused_until = max(self._paused_until, self._clock() + self._rng.uniform(ceiling / 2, ceiling))

    async def _call(self, method: str, **kwargs: Any) -> dict[str, Any]:
        try:
            if method == "chat.postMessage":
                response = await self.client.chat_postMessage(**kwargs)
            elif method == "chat.update":
                response = await self.client.chat_update(**kwargs)
            elif method == "conversations.history":
                response = await self.client.conversations_history(**kwargs)
            else:
                response = await self.client.conversations_replies(**kwargs)
        except SlackApiError as exc:
            raise _classify(exc) from exc
        except aiohttp.ClientConnectorError as exc:  # not connected: nothing was sent
            raise _Transient(f"{method}: {type(exc).__name__}: {exc}") from exc
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise _Transient(f"{method}: {type(exc).__name__}: {exc}", maybe_done=True) from exc
        return dict(response.data) if isinstance(response.data, dict) else {}

    async def _send(self, delivery: Delivery) -> dict[str, Any]:
        try:
            alert = Alert.model_validate(delivery.payload["alert"])
        except (KeyError, ValueError) as exc:
            raise _Permanent(f"payload is not an alert: {exc}") from exc
        action = delivery.payload.get("action")
        message = message_for(alert, action=action, label_hint=self.label_hint)
        target = delivery.target
        root = self.threads.root(alert.incident_id, target)
        done = self.threads.posted(alert.alert_id)  # posted before a crash or a failed parent update
        if done is None and (tried := self.threads.attempt(alert.alert_id)) is not None:
            # A post went out and its answer was lost (a timeout, a dropped connection, a crash): Slack
            # may have it. Look before posting again, or the incident gets a second top-level message.
            done = await self._find(target, tried[0], alert.alert_id, since=tried[1] - FIND_SLACK_SECONDS)
            if done is not None:
                self.threads.record(alert.alert_id, alert.incident_id, target, done, time.time())
        if done is None:
            reply_to = root.ts if root is not None else None
            self.threads.attempting(alert.alert_id, reply_to, time.time())
            answer = await self._post(
                alert.alert_id,
                channel=target,
                thread_ts=reply_to,
                unfurl_links=False,
                unfurl_media=False,
                metadata={
                    "event_type": "stormwatch_alert",
                    "event_payload": {"incident_id": alert.incident_id, "alert_id": alert.alert_id},
                },
                **message.to_kwargs(),
            )
            done = Posted(str(answer.get("channel") or target), str(answer["ts"]), reply_to)
            self.threads.record(alert.alert_id, alert.incident_id, target, done, time.time())
        result: dict[str, Any] = {"channel": done.channel, "ts": done.ts, "thread_ts": done.thread_ts}
        if root is not None and done.thread_ts is not None:
            result["parent_updated"] = await self._update_parent(root, message, delivery)
        return result

    async def _post(self, alert_id: str, **kwargs: Any) -> dict[str, Any]:
        """chat.postMessage; a failure that certainly posted nothing clears the attempt (no need to look)."""
        try:
            return await self._call("chat.postMessage", **kwargs)
        except (_Transient, _Permanent) as exc:
            if not getattr(exc, "maybe_done", False):
                self.threads.forget_attempt(alert_id)
            raise

    async def _find(self, channel: str, thread_ts: str | None, alert_id: str, since: float) -> Posted | None:
        """The message posted for ``alert_id`` (by its metadata) since ``since``, if Slack has it.

        Needs the ``channels:history`` scope (``groups:history`` for private channels). Without it, or
        for a channel given by name, nothing can be found: the record is posted again (a duplicate is
        better than a lost page), and the reason logged.
        """
        method = "conversations.history" if thread_ts is None else "conversations.replies"
        kwargs: dict[str, Any] = {"channel": channel, "oldest": f"{since:.6f}", "limit": 200}
        if thread_ts is not None:
            kwargs["ts"] = thread_ts
        try:
            answer = await self._call(method, include_all_metadata=True, **kwargs)
        except _Permanent as exc:
            log.warning("slack: cannot look for the lost post of %s (%s); posting it again", alert_id, exc)
            return None
        for m in answer.get("messages") or []:
            payload = (m.get("metadata") or {}).get("event_payload") or {}
            if payload.get("alert_id") == alert_id and m.get("ts"):
                log.info("slack: the post of %s whose answer was lost is there (ts %s)", alert_id, m["ts"])
                return Posted(channel, str(m["ts"]), thread_ts)
        return None

    async def _update_parent(self, root: Posted, message: SlackMessage, delivery: Delivery) -> bool:
        """Edit the incident's top-level message to this record (its header shows the status now)."""
        try:
            await self._call("chat.update", channel=root.channel, ts=root.ts, **message.to_kwargs())
        except _Permanent as exc:
            if str(exc) not in _PARENT_GONE:
                raise
            log.warning("slack: parent of incident %s not updated: %s", delivery.group, exc)
            return False
        return True
