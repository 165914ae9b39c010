"""Kill-switch webhooks: breaker changes POSTed to gateways, signed per Standard Webhooks.

The body is ``{"type": "breaker.<state>", "timestamp": <changed_at>, "data": <BreakerChange>}``.
Each request carries ``webhook-id`` (the change's ``change_id``, so a receiver drops repeats),
``webhook-timestamp`` (Unix seconds, fresh on every attempt) and ``webhook-signature``
(``v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`` under the endpoint's ``whsec_`` secret).
Deliveries wait in an :class:`~detector.alerting.outbox.Outbox`, so they survive a restart, are
retried with backoff while a receiver is down, and one entity's changes reach one receiver in order.

A gateway checks a request with :func:`verify`:

>>> secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
>>> body = '{"type":"breaker.open","timestamp":"2026-11-06T08:00:00Z","data":{}}'
>>> headers = sign(secret, "chg-1", 1_793_952_000, body)
>>> headers["webhook-signature"]
'v1,kH2G17zURmupbONUafStd08zr2ONqVR5JzwbEGUDsYU='
>>> verify(secret, headers, body, now=1_793_952_010)["type"]
'breaker.open'
>>> verify(secret, headers, body.replace("open", "closed"), now=1_793_952_010)
Traceback (most recent call last):
...
detector.alerting.webhooks.WebhookVerificationError: no signature matches
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import hmac
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from types import TracebackType
from typing import Any

import aiohttp
from pydantic import BaseModel, ConfigDict, Field, HttpUrl, SecretStr, field_validator
from standardwebhooks import Webhook

from detector.alerting.outbox import Delivery, Outbox
from detector.events import BreakerChange

log = logging.getLogger(__name__)

CHANNEL = "webhook"
SECRET_PREFIX = "whsec_"
MAX_ERROR_BODY = 200  # characters of a refusing receiver's body kept in the failure reason
FAILED_PASS_PAUSE_SECONDS = 5.0  # after a delivery pass failed on the outbox itself


class WebhookError(Exception):
    """Something about a kill-switch webhook went wrong."""


class WebhookVerificationError(WebhookError):
    """A received webhook is not to be trusted: bad signature, missing header or a timestamp out of tolerance."""


def generate_secret(n_bytes: int = 32) -> str:
    """A fresh endpoint secret, ``whsec_`` and base64 of random bytes, to share with the receiver."""
    return SECRET_PREFIX + base64.b64encode(os.urandom(n_bytes)).decode()


def _signer(secret: str) -> Webhook:
    try:
        return Webhook(secret)
    except Exception as exc:  # binascii.Error, EmptyWebhookSecretError
        raise ValueError("a webhook secret is 'whsec_' followed by non-empty base64") from exc


def sign(secret: str, webhook_id: str, timestamp: int, body: str) -> dict[str, str]:
    """The Standard Webhooks headers for one attempt to send ``body``."""
    signature = _signer(secret).sign(webhook_id, datetime.fromtimestamp(timestamp, UTC), body)
    return {"webhook-id": webhook_id, "webhook-timestamp": str(timestamp), "webhook-signature": signature}


def verify(
    secret: str,
    headers: Mapping[str, str],
    body: bytes | str,
    *,
    tolerance_seconds: float = 300,
    now: float | None = None,
) -> dict[str, Any]:
    """Check a received webhook and return its parsed body; raise :class:`WebhookVerificationError` if untrusted.

    ``headers`` may be any mapping (header names in any case); ``body`` the raw bytes as received.
    ``now`` (Unix seconds) defaults to the wall clock. Several space-separated signatures are
    accepted when one matches (secret rotation).
    """
    lowered = {k.lower(): v for k, v in headers.items()}
    missing = [h for h in ("webhook-id", "webhook-timestamp", "webhook-signature") if not lowered.get(h)]
    if missing:
        raise WebhookVerificationError(f"missing header {', '.join(missing)}")
    raw_timestamp = lowered["webhook-timestamp"]
    try:
        timestamp = int(raw_timestamp)
    except ValueError:
        raise WebhookVerificationError(f"webhook-timestamp {raw_timestamp!r} is not Unix seconds") from None
    age = (time.time() if now is None else now) - timestamp
    if age > tolerance_seconds:
        raise WebhookVerificationError(f"timestamp too old: {age:.0f} s ago (tolerance {tolerance_seconds:g} s)")
    if -age > tolerance_seconds:
        raise WebhookVerificationError(f"timestamp too new: {-age:.0f} s ahead (tolerance {tolerance_seconds:g} s)")
    try:
        text = body if isinstance(body, str) else body.decode()
    except UnicodeDecodeError:
        raise WebhookVerificationError("body is not UTF-8") from None
    expected = sign(secret, lowered["webhook-id"], timestamp, text)["webhook-signature"].encode()
    offered = lowered["webhook-signature"].split()
    if not any(hmac.compare_digest(expected, candidate.encode()) for candidate in offered):
        raise WebhookVerificationError("no signature matches")
    try:
        payload = json.loads(text)
    except json.JSONDecodeError:
        payload = None
    if not isinstance(payload, dict):
        raise WebhookVerificationError("body is not a JSON object")
    return payload


def webhook_body(change: BreakerChange) -> dict[str, Any]:
    """The Standard Webhooks payload of one breaker change."""
    data = change.model_dump(mode="json")
    return {"type": f"breaker.{change.state.value}", "timestamp": data["changed_at"], "data": data}


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds a ``Retry-After`` header asks to wait (delta-seconds or an HTTP date), None if absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:  # an HTTP date is GMT
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - now)


class WebhookTarget(BaseModel):
    """Where and how to reach a receiver of kill-switch webhooks (``[alerting.webhooks.<name>]``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    url: HttpUrl
    secret: SecretStr = Field(description="'whsec_' + base64, shared with the receiver.")
    timeout_seconds: float = Field(default=10.0, gt=0, description="Whole request, connect to last byte.")

    @field_validator("secret")
    @classmethod
    def _secret_is_usable(cls, value: SecretStr) -> SecretStr:
        if not value.get_secret_value().startswith(SECRET_PREFIX):
            raise ValueError("a webhook secret starts with 'whsec_'")
        _signer(value.get_secret_value())
        return value


class WebhookEndpoint(WebhookTarget):
    """A receiver of kill-switch webhooks, e.g. an LLM gateway, under its stable name."""

    name: str = Field(min_length=1, description="Stable name; part of the delivery id and ordering group.")


class WebhookSender:
    """Sends breaker changes to webhook endpoints through a durable outbox.

    ``enqueue`` stores a change for one endpoint; ``run`` delivers until stopped, sleeping until the
    next retry is due or new work arrives. Endpoint secrets stay in memory, never in the outbox; a
    stored delivery whose endpoint is no longer configured is dead-lettered. The caller owns
    ``outbox`` (and ``session`` when given); :meth:`aclose` closes the HTTP session made here.
    ``on_attempt(delivery, error)`` is called after every attempt (``error`` None on success),
    for metrics and tests; ``idle`` is set while ``run`` waits.
    """

    def __init__(
        self,
        outbox: Outbox,
        endpoints: Iterable[WebhookEndpoint] = (),
        *,
        session: aiohttp.ClientSession | None = None,
        clock: Callable[[], float] = time.time,
        on_attempt: Callable[[Delivery, str | None], None] | None = None,
        batch: int = 100,
    ) -> None:
        self.outbox = outbox
        self.endpoints: dict[str, WebhookEndpoint] = {}
        for endpoint in endpoints:
            self._register(endpoint)
        self._session = session
        self._owns_session = session is None
        self._clock = clock
        self._on_attempt = on_attempt
        self._batch = batch
        self._wake = asyncio.Event()
        self.idle = asyncio.Event()  # set while run() waits for new work or the next retry

    def _register(self, endpoint: WebhookEndpoint) -> None:
        known = self.endpoints.setdefault(endpoint.name, endpoint)
        if known != endpoint:
            raise ValueError(f"another webhook endpoint is already named {endpoint.name!r}")

    def enqueue(self, change: BreakerChange, endpoint: WebhookEndpoint) -> bool:
        """Store ``change`` for ``endpoint`` (registering the endpoint); False if it was already enqueued."""
        self._register(endpoint)
        added = self.outbox.put(
            f"{change.change_id}:{endpoint.name}",
            CHANNEL,
            str(endpoint.url),
            {"endpoint": endpoint.name, "body": webhook_body(change)},
            group=f"{endpoint.name}|{change.entity}",
        )
        if added:
            self._wake.set()
        return added

    async def deliver_due(self) -> int:
        """One pass: try every due delivery (concurrently; one per entity and endpoint). Returns how many succeeded."""
        due = self.outbox.due(CHANNEL, self._batch)
        if not due:
            return 0
        if self._session is None:
            self._session = aiohttp.ClientSession()
        outcomes = await asyncio.gather(*(self._attempt(self._session, d) for d in due))
        return sum(outcomes)

    async def _attempt(self, session: aiohttp.ClientSession, delivery: Delivery) -> bool:
        endpoint = self.endpoints.get(delivery.payload["endpoint"])
        if endpoint is None:
            reason = f"webhook endpoint {delivery.payload['endpoint']!r} is not configured"
            self.outbox.give_up(delivery.delivery_id, reason)
            log.error("webhook %s dead-lettered: %s", delivery.delivery_id, reason)
            self._notify(delivery, reason)
            return False
        error, retry_after = await self._post(session, endpoint, delivery)
        attempt = delivery.attempts + 1
        if error is None:
            self.outbox.delivered(delivery.delivery_id)
        elif self.outbox.failed(delivery.delivery_id, error, retry_after):
            log.warning("webhook %s to %s failed (attempt %d): %s", delivery.delivery_id, endpoint.name, attempt, error)
        else:
            log.error(
                "webhook %s to %s dead-lettered after %d attempts: %s",
                delivery.delivery_id,
                endpoint.name,
                attempt,
                error,
            )
        self._notify(delivery, error)
        return error is None

    async def _post(
        self, session: aiohttp.ClientSession, endpoint: WebhookEndpoint, delivery: Delivery
    ) -> tuple[str | None, float | None]:
        """(None, None) on a 2xx, else (reason, seconds the receiver asked to wait)."""
        body = json.dumps(delivery.payload["body"], separators=(",", ":"))
        webhook_id = delivery.payload["body"]["data"]["change_id"]
        headers = sign(endpoint.secret.get_secret_value(), webhook_id, int(self._clock()), body)
        headers["content-type"] = "application/json"
        try:
            async with session.post(
                delivery.target,
                data=body.encode(),
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=endpoint.timeout_seconds),
                allow_redirects=False,
            ) as response:
                if 200 <= response.status < 300:
                    return None, None
                text = (await response.content.read(4 * MAX_ERROR_BODY)).decode(errors="replace")[:MAX_ERROR_BODY]
                reason = f"HTTP {response.status} {response.reason or ''}".rstrip()
                retry_after = parse_retry_after(response.headers.get("Retry-After"), self._clock())
                return (f"{reason}: {text}" if text else reason), retry_after
        except TimeoutError:
            return f"timed out after {endpoint.timeout_seconds:g} s", None
        except Exception as exc:  # a broken delivery must not stop the others; it is retried, then dead-lettered
            return f"{type(exc).__name__}: {exc}", None

    def _notify(self, delivery: Delivery, error: str | None) -> None:
        if self._on_attempt is not None:
            self._on_attempt(delivery, error)

    async def run(self, stop: asyncio.Event) -> None:
        """Deliver until ``stop`` is set, waking when a retry is due or something is enqueued."""
        stopping = asyncio.ensure_future(stop.wait())
        try:
            while not stop.is_set():
                self._wake.clear()
                try:
                    await self.deliver_due()
                    delay = self.outbox.next_due_in(CHANNEL)
                except Exception:  # the outbox's file (locked, full), a bug: keep the loop, try again shortly
                    log.exception("webhook delivery pass failed")
                    delay = FAILED_PASS_PAUSE_SECONDS
                if delay == 0 or self._wake.is_set():
                    continue
                woken = asyncio.ensure_future(self._wake.wait())
                self.idle.set()
                try:
                    await asyncio.wait({stopping, woken}, timeout=delay, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    self.idle.clear()
                    woken.cancel()
        finally:
            stopping.cancel()

    async def aclose(self) -> None:
        if self._owns_session and self._session is not None:
            await self._session.close()
        self._session = None

    async def __aenter__(self) -> WebhookSender:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()
