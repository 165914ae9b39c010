"""The by-team repartition on a real broker: a team spread over four usage partitions is judged whole.

Eight keys of team ``search`` hash to different usage partitions. Together they burn the team's
budget at ~30x its fair rate (critical: 14.4x over an hour and five minutes); each partition's
share burns at ~7.5x. Judged per usage partition, that would be warnings at most, from several
engines; through the by-team topic it is one incident that turns critical, raised by the by-team stage.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from detector.pricing import PriceCatalog
from detector.worker.app import REASON_HEADER, SOURCES_HEADER, WATERMARK_HEADER
from detector.worker.packs import pack
from detector.worker.snapshots import RECORD_HEADER, SOURCE_PARTITION_HEADER, SOURCE_TOPIC_HEADER
from tests.conftest import T0
from tests.integration.kafka_tools import (
    Topics,
    Workers,
    consume_until,
    fleet,
    partition_of,
    produce,
    read_all,
    record,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


def test_a_team_spread_over_partitions_burns_its_budget_as_one(
    kafka_bootstrap: str,
    workers: Workers,
) -> None:
    keys = [f"key-{i}" for i in range(8)]
    assert len({partition_of(k, 4) for k in keys}) >= 3, "the team is spread over partitions"
    events = fleet(T0, 5400, keys)  # 1.5 hours, every key every 2 s
    per_hour = sum(PriceCatalog.default().cost(e.model, e.input_tokens, e.output_tokens, 0) for e in events) / 1.5
    budget = per_hour * 720 / 30  # the team burns at 30x; a quarter of it at ~7.5x, under the 14.4x of critical
    topics = Topics.fresh("byteam")
    budget_env = {"STORMWATCH_TEAMS__SEARCH__MONTHLY_BUDGET_USD": f"{budget:.4f}"}

    async def scenario() -> tuple[list[dict[str, object]], int]:
        worker = workers.start(topics, env=budget_env, partitions=4, idle_advance_after_seconds=600)
        await worker.await_line(r"stormwatch: assigned .*\.usage\[", timeout=30)
        await produce(kafka_bootstrap, topics.usage, map(record, events))
        done = await worker.await_line(rf"by team: events={len(events)} .* late=(\d+) ", timeout=90)
        records = await read_all(kafka_bootstrap, topics.alerts)
        alerts = [json.loads(r.value) | {"_source": dict(r.headers)[SOURCE_TOPIC_HEADER].decode()} for r in records]
        return alerts, int(done.group(1))

    alerts, late = asyncio.run(scenario())
    # The four usage partitions drain at their own pace; aligned on their watermarks, the by-team
    # engine still sees the team's events in time order (unaligned, ~1,000 of them came late).
    assert late == 0
    burns = [a for a in alerts if a["kind"] == "budget_burn"]
    assert burns, f"no budget_burn among {[(a['kind'], a['entity']) for a in alerts]}"
    assert {a["incident_id"] for a in burns} == {burns[0]["incident_id"]}, "one incident for the team"
    assert [a["status"] for a in burns if a["status"] == "firing"] == ["firing"]
    assert "critical" in {a["severity"] for a in burns}, "the whole team burns at 30x: it becomes critical"
    assert all(a["entity"] == {"type": "team", "id": "search"} for a in burns)
    assert {a["_source"] for a in burns} == {topics.by_team}, "raised by the by-team stage"


def test_a_findings_record_that_is_not_one_goes_to_the_dlq(kafka_bootstrap: str, workers: Workers) -> None:
    """Findings handed over by team are checked like events: a broken record is a dead letter with its reason."""
    topics = Topics.fresh("badfindings")
    headers = [(SOURCE_PARTITION_HEADER, b"0"), (RECORD_HEADER, b"findings")]
    broken = (b"search", b'[[120.0, 0, [{"kind": "no such kind"}]]]')

    async def scenario() -> list[dict[str, object]]:
        worker = workers.start(topics, partitions=2, idle_advance_after_seconds=600)
        await worker.await_line(r"stormwatch: assigned .*\.by-team\[", timeout=30)
        await produce(kafka_bootstrap, topics.by_team, [broken], headers=headers)
        dead = await consume_until(kafka_bootstrap, topics.dlq, lambda got: bool(got), timeout=30)
        await produce(kafka_bootstrap, topics.usage, map(record, fleet(T0, 60, ["key-1"])))
        await worker.await_line(r"by team: events=30 ", timeout=30)  # and the by-team stage goes on
        return [{"key": r.key, "value": r.value, **{k: v.decode() for k, v in r.headers}} for r in dead]

    (letter,) = asyncio.run(scenario())
    assert (letter["key"], letter["value"]) == broken, "the record as it came"
    assert str(letter[REASON_HEADER]).startswith("not a findings record: "), letter
    assert letter[SOURCE_TOPIC_HEADER] == topics.by_team


def test_records_on_the_by_team_topic_that_are_not_packs_go_to_the_dlq(kafka_bootstrap: str, workers: Workers) -> None:
    """Whatever lands on the by-team topic is read like input: a record that is no pack is a dead letter."""
    topics = Topics.fresh("badpacks")
    pack_headers = [(SOURCE_PARTITION_HEADER, b"0"), (WATERMARK_HEADER, b"120.0"), (SOURCES_HEADER, b"2")]
    broken = {
        "no headers": (b"search", b"hello", []),
        "a source that is no partition": (b"search", pack([(1, b"{}")]), [(SOURCE_PARTITION_HEADER, b"zero")]),
        "a watermark that is no time": (
            b"search",
            pack([(1, b"{}")]),
            [*pack_headers[:1], (WATERMARK_HEADER, b"soon")],
        ),
        "a truncated pack": (b"search", pack([(1, b'{"a": 1}')])[:-1], pack_headers),
    }
    reasons = {
        "no headers": "not a pack: no stormwatch-source-partition header",
        "a source that is no partition": "not a pack: stormwatch-source-partition b'zero' is not a partition",
        "a watermark that is no time": "not a pack: stormwatch-watermark b'soon' is not an event time",
        "a truncated pack": "truncated pack: event at byte 12 wants 8 bytes, 7 left",
    }

    async def scenario() -> list[dict[str, object]]:
        worker = workers.start(topics, partitions=2, idle_advance_after_seconds=600)
        await worker.await_line(r"stormwatch: assigned .*\.by-team\[", timeout=30)
        for key, value, headers in broken.values():
            await produce(kafka_bootstrap, topics.by_team, [(key, value)], headers=headers)
        dead = await consume_until(kafka_bootstrap, topics.dlq, lambda got: len(got) >= len(broken), timeout=30)
        await produce(kafka_bootstrap, topics.usage, map(record, fleet(T0, 60, ["key-1"])))
        await worker.await_line(r"by team: events=30 ", timeout=30)  # the stage goes on
        return [{"value": r.value, **{k: v.decode() for k, v in r.headers}} for r in dead]

    letters = asyncio.run(scenario())
    assert {letter["value"]: letter[REASON_HEADER] for letter in letters} == {
        value: reasons[name] for name, (_, value, _) in broken.items()
    }
    assert {letter[SOURCE_TOPIC_HEADER] for letter in letters} == {topics.by_team}
