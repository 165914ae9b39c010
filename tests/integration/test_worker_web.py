"""The worker's web server on a real broker: health, readiness, metrics, incidents, and a breaker button.

A worker with ``kafka.web_port`` serves the dashboard's API: after a retry storm the incident is
listed, /metrics counts the events, and an authorised POST to /api/breakers writes an audited
change to the breakers topic, which the view then shows (read back from the topic).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest

from detector.events import BreakerChange
from tests.conftest import T0, normal_hour, retry_storm
from tests.integration.http_recorder import free_port
from tests.integration.kafka_tools import Topics, Workers, consume_until, firing_storm, produce, record

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

TOKEN = "s3cret-token"


def test_the_worker_serves_health_metrics_incidents_and_breaker_changes(
    kafka_bootstrap: str,
    workers: Workers,
) -> None:
    topics = Topics.fresh("web")
    port = free_port()
    events = normal_hour(T0) + retry_storm(T0 + 3600)
    base = f"http://127.0.0.1:{port}"

    async def scenario() -> dict[str, Any]:
        worker = workers.start(topics, env={"STORMWATCH_WEB__API_TOKEN": TOKEN}, partitions=2, web_port=port)
        await worker.await_line(r"stormwatch: dashboard on http://127\.0\.0\.1:\d+/", timeout=30)
        await worker.await_line(r"stormwatch: resuming", timeout=30)
        await produce(kafka_bootstrap, topics.usage, map(record, events))
        await consume_until(kafka_bootstrap, topics.alerts, firing_storm, timeout=30)
        await worker.await_line(rf"stormwatch: events={len(events)} ", timeout=30)
        got: dict[str, Any] = {}
        async with aiohttp.ClientSession() as http:
            for path in ("/healthz", "/readyz"):
                async with http.get(base + path) as r:
                    got[path] = r.status
            for _ in range(100):  # lag is reported with the commits, about once a second
                async with http.get(base + "/metrics") as r:
                    got["metrics"] = await r.text()
                lags = [line for line in got["metrics"].splitlines() if line.startswith("stormwatch_consumer_lag{")]
                if lags and all(float(line.split()[-1]) == 0 for line in lags):
                    break
                await asyncio.sleep(0.1)
            got["lags"] = lags
            async with http.get(base + "/api/incidents") as r:
                got["incidents"] = await r.json()
            change = {"entity": "api_key:key-1", "action": "open", "reason": "stop the storm", "ttl_seconds": 600}
            async with http.post(base + "/api/breakers", json=change) as r:
                got["unauthorised"] = r.status
            headers = {"Authorization": f"Bearer {TOKEN}"}
            async with http.post(base + "/api/breakers", json=change, headers=headers) as r:
                got["authorised"] = r.status
            on_topic = await consume_until(kafka_bootstrap, topics.breakers, lambda rs: bool(rs), timeout=20)
            got["topic"] = [BreakerChange.model_validate_json(r.value) for r in on_topic]
            for _ in range(100):  # the view learns it back from the topic, through the worker's follower
                async with http.get(base + "/api/breakers") as r:
                    breakers = (await r.json())["breakers"]
                if breakers:
                    break
                await asyncio.sleep(0.1)
            got["breakers"] = breakers
            # Two teams' agents named "assistant": a close for ads closes ads' breaker, not search's.
            for team in ("search", "ads"):
                opening = {"entity": "agent:assistant", "action": "open", "reason": "loop", "owner": team}
                async with http.post(base + "/api/breakers", json=opening, headers=headers) as r:
                    assert r.status == 200, await r.text()
            closing = {"entity": "agent:assistant", "action": "close", "reason": "fixed", "owner": "ads"}
            async with http.post(base + "/api/breakers", json=closing, headers=headers) as r:
                got["close"] = (r.status, await r.json())
            on_topic = await consume_until(kafka_bootstrap, topics.breakers, lambda rs: len(rs) >= 4, timeout=20)
            got["agents"] = [BreakerChange.model_validate_json(r.value) for r in on_topic[1:]]
        return got

    got = asyncio.run(scenario())
    assert got["/healthz"] == 200 and got["/readyz"] == 200
    processed = [line for line in got["metrics"].splitlines() if line.startswith("stormwatch_events_processed_total")]
    assert processed and float(processed[0].split()[-1]) == len(events), processed
    # Both usage partitions (and the by-team ones) are reported, and drained.
    usage_lags = [line for line in got["lags"] if f'topic="{topics.usage}"' in line]
    assert len(usage_lags) == 2 and all(float(line.split()[-1]) == 0 for line in got["lags"]), got["lags"]
    metric_lines = got["metrics"].splitlines()
    (count,) = [line for line in metric_lines if line.startswith("stormwatch_processing_latency_seconds_count")]
    assert float(count.split()[-1]) > 0, "the batches' processing time is observed"
    kinds = {(i["kind"], i["entity"]) for i in got["incidents"]["incidents"]}
    assert ("retry_storm", "api_key:key-1") in kinds, kinds
    assert got["unauthorised"] == 401 and got["authorised"] == 200
    (change,) = got["topic"]
    assert (change.entity.type, change.entity.id, change.state.value) == ("api_key", "key-1", "open")
    assert change.reason == "stop the storm"
    assert [(b["entity"], b["state"]) for b in got["breakers"]] == [("api_key:key-1", "open")]
    status, body = got["close"]
    assert status == 200, body
    assert [(c["owner"], c["state"]) for c in body["changes"]] == [("ads", "closed")]
    assert [(c.owner, c.state.value) for c in got["agents"]] == [("search", "open"), ("ads", "open"), ("ads", "closed")]
    print(json.dumps(got["breakers"][0])[:200])
