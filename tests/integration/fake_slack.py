"""A stand-in for Slack's Web API on 127.0.0.1, for the Slack sender's tests.

It answers ``auth.test``, ``chat.postMessage``, ``chat.update``, ``conversations.history`` and
``conversations.replies`` (with message metadata when asked for it) the way Slack does (HTTP 200 with
``{"ok": false, "error": ...}`` for refusals, increasing ``ts`` values, Block Kit limits enforced as
``invalid_blocks``), records every request, and can be told to misbehave: answer the next calls with 429
and ``Retry-After``, or with 500, or refuse a channel, or be down (nothing listening on its port).

    async with FakeSlack() as slack:
        client = AsyncWebClient(token=slack.token, base_url=slack.base_url)
        slack.fail_next(1, status=429, retry_after=1)
        ...
        await slack.wait_for(lambda s: len(s.calls("chat.postMessage")) == 2, timeout=10)
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

from aiohttp import web


@dataclass(frozen=True)
class Call:
    """One request as the fake saw it, and what it answered."""

    method: str  # Slack API method, e.g. chat.postMessage
    headers: dict[str, str]
    body: dict[str, Any]  # query, form and JSON fields merged; JSON-looking form fields decoded
    at: float  # time.monotonic() when it arrived
    status: int  # HTTP status answered
    answer: dict[str, Any]


@dataclass
class Message:
    channel: str
    ts: str
    text: str
    blocks: list[dict[str, Any]]
    thread_ts: str | None
    edits: int = 0
    metadata: dict[str, Any] | None = None

    def as_json(self, with_metadata: bool) -> dict[str, Any]:
        out: dict[str, Any] = {"type": "message", "text": self.text, "ts": self.ts, "bot_id": "B0000BOT"}
        if self.thread_ts:
            out["thread_ts"] = self.thread_ts
        if with_metadata and self.metadata:
            out["metadata"] = self.metadata
        return out


@dataclass
class _Fault:
    count: int
    status: int
    retry_after: float | None
    methods: frozenset[str] | None


@dataclass
class FakeSlack:
    token: str = "xoxb-test-token"
    host: str = "127.0.0.1"
    port: int = 0  # 0: a free one, fixed on the first start and kept across down()/up()
    refused_channels: set[str] = field(default_factory=set)  # answered with channel_not_found
    requests: list[Call] = field(default_factory=list)
    messages: dict[tuple[str, str], Message] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._faults: list[_Fault] = []
        self._late: list[tuple[str, float]] = []  # (method, seconds): answer the next such call that late
        self._next_ts = int(time.time() * 1_000_000)  # microseconds, from now, as Slack's; ts = "seconds.micros"
        self._changed = asyncio.Condition()
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None

    # -- lifecycle -----------------------------------------------------------------------------

    async def __aenter__(self) -> FakeSlack:
        await self.up()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.down()

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/api/"

    async def up(self) -> None:
        """Start listening (again, on the same port)."""
        if self._site is not None:
            return
        if self.port == 0:
            with socket.socket() as probe:
                probe.bind((self.host, 0))
                self.port = probe.getsockname()[1]
        app = web.Application()
        app.router.add_post("/api/{method}", self._handle)
        app.router.add_get("/api/{method}", self._handle)  # slack-sdk reads conversations.* with GET
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        self._site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True)
        await self._site.start()

    async def down(self) -> None:
        """Stop listening: connections to the port are refused until ``up()``."""
        if self._runner is not None:
            await self._runner.cleanup()
        self._runner, self._site = None, None

    # -- misbehaving -----------------------------------------------------------------------------

    def fail_next(
        self, count: int, *, status: int = 500, retry_after: float | None = None, methods: set[str] | None = None
    ) -> None:
        """Answer the next ``count`` calls (of ``methods``, default any) with ``status`` (429: ratelimited)."""
        self._faults.append(_Fault(count, status, retry_after, frozenset(methods) if methods else None))

    def answer_late(self, method: str, seconds: float) -> None:
        """Carry out the next ``method`` call, but answer it only after ``seconds`` (Slack slow, a proxy)."""
        self._late.append((method, seconds))

    # -- looking at what happened ----------------------------------------------------------------

    def calls(self, method: str | None = None, *, ok: bool | None = None) -> list[Call]:
        """Recorded calls, of one method and/or only those answered ``ok``."""
        return [
            c
            for c in self.requests
            if (method is None or c.method == method) and (ok is None or bool(c.answer.get("ok")) == ok)
        ]

    def top_level(self) -> list[Message]:
        return [m for m in self.messages.values() if m.thread_ts is None]

    def replies(self, thread_ts: str) -> list[Message]:
        return [m for m in self.messages.values() if m.thread_ts == thread_ts]

    async def wait_for(self, predicate: Callable[[FakeSlack], bool], timeout: float = 10.0) -> None:
        """Until ``predicate(self)`` holds after some request; TimeoutError (with the calls) if it does not."""
        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(lambda: predicate(self)), timeout)
            except TimeoutError:
                seen = [(c.method, c.status, c.answer.get("error")) for c in self.requests]
                raise TimeoutError(f"fake slack: condition not met in {timeout} s; calls: {seen}") from None

    # -- the API -------------------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.Response:
        method = request.match_info["method"]
        body = await _body(request)
        headers = dict(request.headers)
        status, answer, extra = self._fault(method)
        if status == 200:
            answer = self._answer(method, headers, body)
        self.requests.append(Call(method, headers, body, time.monotonic(), status, answer))
        async with self._changed:
            self._changed.notify_all()
        late = next((x for x in self._late if x[0] == method), None)
        if late is not None:
            self._late.remove(late)
            await asyncio.sleep(late[1])
        if status >= 500:
            return web.Response(status=status, text="<html>upstream error</html>", content_type="text/html")
        return web.json_response(answer, status=status, headers=extra)

    def _fault(self, method: str) -> tuple[int, dict[str, Any], dict[str, str]]:
        for fault in self._faults:
            if fault.count > 0 and (fault.methods is None or method in fault.methods):
                fault.count -= 1
                headers = {} if fault.retry_after is None else {"Retry-After": f"{fault.retry_after:g}"}
                error = "ratelimited" if fault.status == 429 else "internal_error"
                return fault.status, {"ok": False, "error": error}, headers
        return 200, {}, {}

    def _answer(self, method: str, headers: dict[str, str], body: dict[str, Any]) -> dict[str, Any]:
        if headers.get("Authorization") != f"Bearer {self.token}":
            return {"ok": False, "error": "invalid_auth"}
        if method == "auth.test":
            return {
                "ok": True,
                "url": "https://stormwatch-test.slack.com/",
                "team": "Stormwatch test",
                "user": "stormwatch",
                "team_id": "T0000TEST",
                "user_id": "U0000BOT",
                "bot_id": "B0000BOT",
            }
        if method not in ("chat.postMessage", "chat.update", "conversations.history", "conversations.replies"):
            return {"ok": False, "error": "unknown_method"}
        channel = str(body.get("channel", ""))
        if not channel or channel in self.refused_channels:
            return {"ok": False, "error": "channel_not_found"}
        if method.startswith("conversations."):
            return self._read(method, channel, body)
        blocks = body.get("blocks") or []
        text = str(body.get("text") or "")
        if not text and not blocks:
            return {"ok": False, "error": "no_text"}
        problem = block_kit_problem(blocks)
        if problem:
            return {"ok": False, "error": "invalid_blocks", "errors": [problem]}
        if method == "chat.update":
            message = self.messages.get((channel, str(body.get("ts"))))
            if message is None:
                return {"ok": False, "error": "message_not_found"}
            message.text, message.blocks, message.edits = text, blocks, message.edits + 1
            return {"ok": True, "channel": channel, "ts": message.ts, "text": text}
        thread_ts = body.get("thread_ts")
        if thread_ts is not None and (channel, str(thread_ts)) not in self.messages:
            return {"ok": False, "error": "thread_not_found"}
        self._next_ts += 100
        ts = f"{self._next_ts // 1_000_000}.{self._next_ts % 1_000_000:06d}"
        metadata = body.get("metadata") if isinstance(body.get("metadata"), dict) else None
        message = Message(channel, ts, text, blocks, str(thread_ts) if thread_ts else None, metadata=metadata)
        self.messages[(channel, ts)] = message
        return {"ok": True, "channel": channel, "ts": ts, "message": message.as_json(with_metadata=False)}

    def _read(self, method: str, channel: str, body: dict[str, Any]) -> dict[str, Any]:
        """conversations.history (top level, newest first) or .replies (the parent, then its thread)."""
        oldest = float(body.get("oldest") or 0)
        with_metadata = str(body.get("include_all_metadata", "")).lower() in ("1", "true")
        if method == "conversations.history":
            found = [m for m in self.messages.values() if m.channel == channel and m.thread_ts is None]
            found.sort(key=lambda m: float(m.ts), reverse=True)
        else:
            parent = str(body.get("ts", ""))
            if (channel, parent) not in self.messages:
                return {"ok": False, "error": "thread_not_found"}
            found = [self.messages[(channel, parent)], *self.replies(parent)]
        messages = [m.as_json(with_metadata) for m in found if float(m.ts) >= oldest]
        return {"ok": True, "messages": messages, "has_more": False}


def block_kit_problem(blocks: Any) -> str | None:
    """The first Block Kit limit a message breaks, as Slack would refuse it; None when it is fine."""
    if not isinstance(blocks, list):
        return "blocks must be a list"
    if len(blocks) > 50:
        return f"{len(blocks)} blocks, at most 50"
    for i, block in enumerate(blocks):
        kind = block.get("type")
        text = (block.get("text") or {}).get("text", "")
        if kind == "header" and (len(text) > 150 or block["text"].get("type") != "plain_text"):
            return f"block {i}: header must be plain_text of at most 150 characters"
        if kind == "section":
            if len(text) > 3000:
                return f"block {i}: section text of {len(text)} characters, at most 3000"
            fields = block.get("fields") or []
            if len(fields) > 10 or any(len(f.get("text", "")) > 2000 for f in fields):
                return f"block {i}: at most 10 fields of at most 2000 characters"
            if not text and not fields:
                return f"block {i}: section without text or fields"
        if kind == "context":
            elements = block.get("elements") or []
            if not elements or len(elements) > 10 or any(len(e.get("text", "")) > 3000 for e in elements):
                return f"block {i}: context needs 1 to 10 elements of at most 3000 characters"
    return None


async def _body(request: web.Request) -> dict[str, Any]:
    """Query, form and JSON fields as one dict, the way Slack reads any of them."""
    fields: dict[str, Any] = dict(parse_qsl(request.query_string))
    raw = await request.read()
    if not raw:
        return fields
    if request.content_type == "application/json":
        fields.update(json.loads(raw))
        return fields
    for key, value in parse_qsl(raw.decode()):
        try:
            fields[key] = json.loads(value) if value[:1] in "[{" else value
        except ValueError:
            fields[key] = value
    return fields
