"""TLS and SASL as managed clusters want them, on a real broker: the worker, the breaker CLI, a gateway.

A broker of this module's own (``kafka.sh up`` with ``KAFKA_SASL_SSL_PORT``) adds a SASL_SSL
listener whose certificate a test CA signs, with a PLAIN and a SCRAM-SHA-512 user. Every client
of ours is pointed at that listener alone; the test's own producer and readers use the broker's
plaintext listener, so what is checked is our clients' security settings, not the test's.
"""

from __future__ import annotations

import asyncio
import os
import ssl
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from detector.cli import main as cli_main
from detector.enforce import BreakerFollower, BreakerTable
from detector.events import Alert, BreakerState
from tests.conftest import T0, normal_hour, retry_storm
from tests.integration.conftest import KAFKA_SH
from tests.integration.kafka_tools import Topics, Workers, cli_settings, consume_until, firing_storm, produce, record

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]


@dataclass(frozen=True)
class SecureBroker:
    plaintext: str  # for the test's own clients
    sasl_ssl: str  # for ours
    cafile: Path
    user: str = "stormwatch"
    password: str = "s3cret-for-tests"

    def kafka(self, mechanism: str, password: str | None = None) -> dict[str, object]:
        """The ``[kafka]`` security settings of a client of ours on the SASL_SSL listener."""
        return {
            "security_protocol": "SASL_SSL",
            "sasl_mechanism": mechanism,
            "sasl_username": self.user,
            "sasl_password": password or self.password,
            "ssl_cafile": self.cafile,
        }


@pytest.fixture(scope="module")
def secure_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureBroker]:
    run_dir = tmp_path_factory.mktemp("kafka-secure")
    env = {
        **os.environ,
        "KAFKA_PORT": "0",
        "KAFKA_SASL_SSL_PORT": "auto",
        "KAFKA_SASL_PASSWORD": SecureBroker.password,
        "KAFKA_RUN_DIR": str(run_dir),
    }
    try:
        up = subprocess.run(["bash", str(KAFKA_SH), "up"], env=env, capture_output=True, text=True, timeout=300)
        assert up.returncode == 0, f"kafka.sh up failed:\n{up.stderr}"
        port = (run_dir / "sasl_ssl.port").read_text().strip()
        yield SecureBroker(up.stdout.strip().splitlines()[-1], f"127.0.0.1:{port}", run_dir / "tls" / "ca.pem")
    finally:
        subprocess.run(["bash", str(KAFKA_SH), "down"], env=env, capture_output=True, timeout=120)


def test_a_worker_on_sasl_ssl_with_scram_pages_a_retry_storm(secure_broker: SecureBroker, tmp_path: Path) -> None:
    """Topic creation, the usage consumer, the by-team stage and the alerts all go through TLS and SCRAM."""
    topics = Topics.fresh("scram")
    workers = Workers(secure_broker.sasl_ssl, tmp_path)

    async def scenario() -> list[Alert]:
        worker = workers.start(topics, partitions=2, **secure_broker.kafka("SCRAM-SHA-512"))
        await worker.await_line(r"stormwatch: assigned .*\.by-team\[", timeout=60)
        await produce(secure_broker.plaintext, topics.usage, map(record, normal_hour(T0) + retry_storm(T0 + 3600)))
        records = await consume_until(secure_broker.plaintext, topics.alerts, firing_storm, timeout=60)
        return [Alert.model_validate_json(r.value) for r in records]

    try:
        alerts = asyncio.run(scenario())
    finally:
        workers.stop_all()
    assert ("retry_storm", "firing") in {(a.kind.value, a.status.value) for a in alerts}


def test_a_worker_with_a_wrong_password_stops_and_says_why(secure_broker: SecureBroker, tmp_path: Path) -> None:
    topics = Topics.fresh("wrongpw")
    workers = Workers(secure_broker.sasl_ssl, tmp_path)
    worker = workers.start(topics, **secure_broker.kafka("SCRAM-SHA-512", password="not-the-password"))
    try:
        worker.wait_for(r"SaslAuthenticationFailed: .*invalid credentials with SASL mechanism SCRAM-SHA-512", 60)
        assert worker.proc.wait(60) != 0, "a worker that cannot log in exits with an error, not hangs"
    finally:
        workers.stop_all()


def test_the_breaker_cli_and_a_gateway_follower_on_sasl_ssl_with_plain(
    secure_broker: SecureBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    topic = f"it-breakers-secure-{uuid.uuid4().hex[:8]}"
    cli_settings(monkeypatch, secure_broker.sasl_ssl, breakers_topic=topic, **secure_broker.kafka("PLAIN"))
    table = BreakerTable()
    follower = BreakerFollower(
        table,
        secure_broker.sasl_ssl,
        topic,
        poll_seconds=0.2,
        security_protocol="SASL_SSL",
        ssl_context=ssl.create_default_context(cafile=str(secure_broker.cafile)),
        sasl_mechanism="PLAIN",
        sasl_plain_username=secure_broker.user,
        sasl_plain_password=secure_broker.password,
    )

    async def scenario() -> None:
        await follower.start()
        try:
            args = [
                "breaker",
                "open",
                "session:s-9",
                "--owner",
                "search",
                "--reason",
                "loop",
                "--ttl",
                "10m",
                "--by",
                "ana",
            ]
            assert await asyncio.to_thread(cli_main, args) == 0
            await follower.wait_until(
                lambda t: (c := t.get("session:search/s-9")) is not None and c.state is BreakerState.OPEN, timeout=30
            )
        finally:
            await follower.stop()

    asyncio.run(scenario())
