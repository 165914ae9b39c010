"""``detector replay --serve``: the embedded shell keeps the dashboard's API up after a replay.

The replay's incidents are listed, and the breakers are the ones the ``[alerting]`` policy would
have opened (here: a retry storm trips its key) and then moved on in event time; Ctrl-C stops it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import T0, normal_hour, retry_storm
from tests.integration.http_recorder import free_port

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

CONFIG = """
[[alerting.rules]]
kind = "retry_storm"
min_severity = "warning"
action = "trip"
breaker_ttl = "15m"
"""


def get(url: str) -> dict[str, object]:
    with urllib.request.urlopen(url, timeout=10) as r:
        body: dict[str, object] = json.load(r)
        return body


def test_replay_serve_shows_the_incidents_and_the_policys_breakers(tmp_path: Path) -> None:
    events = tmp_path / "events.jsonl"
    events.write_text("".join(e.model_dump_json() + "\n" for e in normal_hour(T0) + retry_storm(T0 + 3600)))
    config = tmp_path / "stormwatch.toml"
    config.write_text(CONFIG)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("STORMWATCH_")} | {"STORMWATCH_WEB__PORT": str(port)}
    args = [sys.executable, "-m", "detector.cli", "replay", str(events), "--config", str(config), "--serve"]
    proc = subprocess.Popen(args, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # the line that says where the dashboard is: it is up
            if line.startswith("dashboard: "):
                break
        else:
            pytest.fail(f"no dashboard line; exit {proc.wait()}")
        incidents = get(f"http://127.0.0.1:{port}/api/incidents")["incidents"]
        breakers = get(f"http://127.0.0.1:{port}/api/breakers")["breakers"]
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(30)
    assert [(i["kind"], i["entity"]) for i in incidents] == [("retry_storm", "api_key:key-1")]  # type: ignore[index, union-attr]
    # Tripped by the storm, then (event time went on to the replay's end) half-open or closed again.
    assert [b["entity"] for b in breakers] == ["api_key:key-1"]  # type: ignore[index, union-attr]
    assert breakers[0]["reason"]  # type: ignore[index]
    assert code == 0
