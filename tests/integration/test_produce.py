"""``detector produce`` on a real broker: a file of events onto the usage topic, keyed as the worker wants."""

from __future__ import annotations

import asyncio
import gzip
import json
import time
from pathlib import Path

import pytest

from detector.cli import main as cli_main
from tests.conftest import T0, make_event
from tests.integration.kafka_tools import Topics, cli_settings, partition_of, read_all, topic_configs

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def test_produce_sends_each_line_as_it_is_keyed_by_api_key(
    kafka_bootstrap: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    topics = Topics.fresh("produce")
    cli_settings(monkeypatch, kafka_bootstrap, usage_topic=topics.usage, partitions=3)
    events = [make_event(T0 + i, api_key_id=f"key-{i % 4}") for i in range(40)]
    lines = [ev.model_dump_json().encode() for ev in events]
    broken = b'{"event_id": "half a line'
    path = tmp_path / "events.jsonl.gz"
    path.write_bytes(gzip.compress(b"\n".join([*lines[:20], b"", broken, *lines[20:]]) + b"\n"))

    started = time.monotonic()
    assert cli_main(["produce", str(path), "--rate", "100"]) == 0
    took = time.monotonic() - started

    records = asyncio.run(read_all(kafka_bootstrap, topics.usage))
    assert sorted(r.value for r in records) == sorted([*lines, broken]), "every line as it was, blank ones left out"
    for r in records:
        key = json.loads(r.value)["api_key_id"].encode() if r.value != broken else None
        assert r.key == key
        assert key is None or r.partition == partition_of(key.decode(), 3), "where the worker looks for the key"
    assert took >= 40 / 100, "paced at 100 events/s"
    assert asyncio.run(topic_configs(kafka_bootstrap, [topics.usage]))[topics.usage]["partitions"] == "3"
