"""Standard Webhooks signing and the receiver-side ``verify`` gateway teams call; the webhook body."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from datetime import UTC, datetime

import pytest
from pydantic import ValidationError

from detector.alerting.webhooks import (
    WebhookEndpoint,
    WebhookError,
    WebhookVerificationError,
    generate_secret,
    parse_retry_after,
    sign,
    verify,
    webhook_body,
)
from detector.events import BreakerChange

# The Standard Webhooks specification's published test vector (also in its reference libraries' tests).
VECTOR_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
VECTOR_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
VECTOR_TIMESTAMP = 1614265330
VECTOR_BODY = '{"test": 2432232314}'
VECTOR_SIGNATURE = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="

NOW = 1_793_952_000
SECRET = generate_secret()
BODY = b'{"type":"breaker.open","timestamp":"2026-11-06T08:00:00Z","data":{"change_id":"chg-1"}}'


def test_signature_matches_the_spec_test_vector() -> None:
    headers = sign(VECTOR_SECRET, VECTOR_ID, VECTOR_TIMESTAMP, VECTOR_BODY)
    assert headers == {
        "webhook-id": VECTOR_ID,
        "webhook-timestamp": str(VECTOR_TIMESTAMP),
        "webhook-signature": VECTOR_SIGNATURE,
    }
    assert verify(VECTOR_SECRET, headers, VECTOR_BODY, now=VECTOR_TIMESTAMP) == {"test": 2432232314}


def test_signature_is_hmac_sha256_of_id_timestamp_body() -> None:
    """The same bytes a receiver without any library would compute."""
    key = base64.b64decode(SECRET.removeprefix("whsec_"))
    digest = hmac.new(key, f"chg-1.{NOW}.".encode() + BODY, hashlib.sha256).digest()
    assert sign(SECRET, "chg-1", NOW, BODY.decode())["webhook-signature"] == "v1," + base64.b64encode(digest).decode()


def signed(body: bytes = BODY, timestamp: int = NOW, secret: str = SECRET) -> dict[str, str]:
    return sign(secret, "chg-1", timestamp, body.decode())


def test_verify_accepts_a_good_request_with_any_header_case() -> None:
    headers = {k.title(): v for k, v in signed().items()}  # Webhook-Id, ... as some servers present them
    assert verify(SECRET, headers, BODY, now=NOW + 299)["data"] == {"change_id": "chg-1"}
    assert verify(SECRET, signed(), BODY.decode(), now=NOW - 299)["type"] == "breaker.open"


def test_verify_accepts_one_matching_signature_among_several() -> None:
    """During secret rotation a sender signs with old and new secret, space-separated."""
    headers = signed()
    old = signed(secret=generate_secret())["webhook-signature"]
    headers["webhook-signature"] = f"{old} v2,whatever {headers['webhook-signature']}"
    assert verify(SECRET, headers, BODY, now=NOW)["type"] == "breaker.open"


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("tampered body", "no signature matches"),
        ("wrong secret", "no signature matches"),
        ("other id", "no signature matches"),
        ("stale", "too old"),
        ("future", "too new"),
        ("no id", "missing header webhook-id"),
        ("no timestamp", "missing header webhook-timestamp"),
        ("no signature", "missing header webhook-signature"),
        ("empty signature", "missing header webhook-signature"),
        ("timestamp not a number", "not Unix seconds"),
        ("garbage signature", "no signature matches"),
        ("not JSON", "not a JSON object"),
        ("not UTF-8", "not UTF-8"),
    ],
)
def test_verify_rejects(case: str, message: str) -> None:
    headers, body, now, secret = signed(), BODY, NOW, SECRET
    if case == "tampered body":
        body = BODY.replace(b"open", b"closed")
    elif case == "wrong secret":
        secret = generate_secret()
    elif case == "other id":
        headers["webhook-id"] = "chg-2"
    elif case == "stale":
        now = NOW + 301
    elif case == "future":
        now = NOW - 301
    elif case.startswith("no "):
        del headers[{"id": "webhook-id", "timestamp": "webhook-timestamp", "signature": "webhook-signature"}[case[3:]]]
    elif case == "empty signature":
        headers["webhook-signature"] = ""
    elif case == "timestamp not a number":
        headers["webhook-timestamp"] = "yesterday"
    elif case == "garbage signature":
        headers["webhook-signature"] = "v1 v1,,, nonsense"
    elif case == "not JSON":
        body = b"[1, 2]"
        headers = signed(body)
    elif case == "not UTF-8":
        body = b"\xff\xfe"
        headers = sign(SECRET, "chg-1", NOW, "x")
    with pytest.raises(WebhookVerificationError, match=message) as caught:
        verify(secret, headers, body, now=now)
    assert isinstance(caught.value, WebhookError)


def test_verify_tolerance_is_configurable_and_defaults_to_the_wall_clock() -> None:
    with pytest.raises(WebhookVerificationError, match="too old"):
        verify(SECRET, signed(), BODY, now=NOW + 61, tolerance_seconds=60)
    assert verify(SECRET, signed(), BODY, now=NOW + 61, tolerance_seconds=3600)
    with pytest.raises(WebhookVerificationError, match="too old"):  # NOW in the past of the real clock
        verify(SECRET, signed(timestamp=1_600_000_000), BODY)


def change(**fields: object) -> BreakerChange:
    base: dict[str, object] = {
        "change_id": "chg-7",
        "entity": {"type": "api_key", "id": "k1"},
        "owner": "search",
        "state": "open",
        "previous_state": "closed",
        "version": 3,
        "changed_at": "2026-11-06T09:00:00+01:00",
        "expires_at": "2026-11-06T08:15:00Z",
        "reason": "retry storm on api_key:k1",
        "incident_id": "inc-1",
        "actor": "stormwatch",
    }
    base.update(fields)
    return BreakerChange.model_validate(base)


def test_webhook_body_follows_the_standard_webhooks_payload_convention() -> None:
    body = webhook_body(change())
    assert body["type"] == "breaker.open"
    assert body["timestamp"] == "2026-11-06T08:00:00Z"  # changed_at, in UTC, RFC 3339
    assert datetime.fromisoformat(body["timestamp"]) == datetime(2026, 11, 6, 8, tzinfo=UTC)
    assert BreakerChange.model_validate(body["data"]) == change()
    json.dumps(body)  # plain JSON all through
    assert webhook_body(change(state="half_open", previous_state="open"))["type"] == "breaker.half_open"


def test_endpoint_refuses_an_unusable_secret_and_hides_a_good_one() -> None:
    endpoint = WebhookEndpoint(name="gw", url="https://gw.example/hooks", secret=SECRET)
    assert SECRET not in repr(endpoint) and SECRET not in str(endpoint.model_dump())
    assert endpoint.timeout_seconds == 10.0
    for bad in ["", "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "whsec_", "whsec_not base64!"]:
        with pytest.raises(ValidationError, match="secret"):
            WebhookEndpoint(name="gw", url="https://gw.example/hooks", secret=bad)
    with pytest.raises(ValidationError):
        WebhookEndpoint(name="gw", url="ftp://gw.example", secret=SECRET)


def test_parse_retry_after() -> None:
    assert parse_retry_after("120", now=0) == 120.0
    assert parse_retry_after(None, now=0) is None
    assert parse_retry_after("soon", now=0) is None
    assert parse_retry_after("Fri, 06 Nov 2026 08:00:30 GMT", now=NOW) == 30.0
    assert parse_retry_after("Fri, 06 Nov 2026 07:00:00 GMT", now=NOW) == 0.0
