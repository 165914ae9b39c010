"""One real Kafka broker for the whole integration session.

Uses ``$KAFKA_BOOTSTRAP`` when set (a broker someone else runs). Otherwise starts
``deploy/kafka/kafka.sh up`` on two free ports of 127.0.0.1 (so several runs can share a
machine) with its run directory in the session's tmp dir, exports ``KAFKA_BOOTSTRAP`` so
every test (``test_kafka_broker.py`` too) uses it, and stops it when the session ends. Tests
keep apart by topic and group names.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.kafka_tools import Workers

KAFKA_SH = Path(__file__).resolve().parents[2] / "deploy" / "kafka" / "kafka.sh"


@pytest.fixture(scope="session", autouse=True)
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    external = os.environ.get("KAFKA_BOOTSTRAP")
    if external:
        yield external
        return
    # No skip without Java: a missing broker must fail the run, not hide the Kafka tests.
    assert shutil.which("java") or os.environ.get("JAVA_HOME"), "need Java 17 (or KAFKA_BOOTSTRAP) for Kafka tests"
    env = {
        **os.environ,
        "KAFKA_PORT": "0",  # two free adjacent ports
        "KAFKA_RUN_DIR": str(tmp_path_factory.mktemp("kafka")),
    }
    try:
        up = subprocess.run(["bash", str(KAFKA_SH), "up"], env=env, capture_output=True, text=True, timeout=300)
        assert up.returncode == 0, f"kafka.sh up failed:\n{up.stderr}"
        bootstrap = up.stdout.strip().splitlines()[-1]
        os.environ["KAFKA_BOOTSTRAP"] = bootstrap
        yield bootstrap
    finally:
        os.environ.pop("KAFKA_BOOTSTRAP", None)
        subprocess.run(["bash", str(KAFKA_SH), "down"], env=env, capture_output=True, timeout=120)


@pytest.fixture
def workers(kafka_bootstrap: str, tmp_path: Path) -> Iterator[Workers]:
    """Every worker a test starts is stopped after it."""
    w = Workers(kafka_bootstrap, tmp_path)
    yield w
    w.stop_all()
