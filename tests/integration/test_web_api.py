"""The JSON API, the live stream and /metrics of the dashboard server, over a real socket on 127.0.0.1."""

from __future__ import annotations

import http.client
import inspect
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from typing import Any

import orjson
import pytest

from detector.events import BreakerChange
from detector.web.control import BreakerRefused, BreakerRequest, LocalBreakerControl, LocalFeedback
from detector.web.metrics import Metrics
from detector.web.server import BackgroundServer, answers_to, create_web_app, serve
from detector.web.view import LiveView
from tests.conftest import T0, make_event
from tests.unit.test_web_view import make_alert

pytestmark = pytest.mark.integration

TOKEN = "t0ken-for-tests"


class Control(LocalBreakerControl):
    """The in-memory control, refusing one entity so the 409 path is tested too."""

    async def __call__(self, request: BreakerRequest) -> Sequence[BreakerChange]:
        if request.entity.id == "protected":
            raise BreakerRefused("api_key:protected is on the never-break list")
        return await super().__call__(request)


class Ready:
    def __init__(self) -> None:
        self.ready = True

    def __call__(self) -> bool:
        return self.ready


def populated_view() -> LiveView:
    view = LiveView()
    for i in range(120):
        view.observe_event(make_event(T0 + i, api_key_id="k1", user="ann", session_id="s/1:x", team="search"), 0.5)
        view.observe_event(make_event(T0 + i, api_key_id="k2", team="ads", model="o3"), 0.25)
    view.observe_alert(make_alert("inc-a", severity="critical", entity="api_key:k1", at=T0 + 60))
    view.observe_alert(make_alert("inc-b", severity="warning", entity="session:s/1:x", kind="agent_loop", at=T0 + 90))
    view.observe_alert(make_alert("inc-c", entity="api_key:k2", at=T0 + 10))
    view.observe_alert(make_alert("inc-c", sequence=1, status="resolved", entity="api_key:k2", at=T0 + 100))
    view.observe_reject("not valid JSON: oops")
    return view


class Api:
    def __init__(self, server: BackgroundServer, view: LiveView, control: Control, feedback: LocalFeedback) -> None:
        self.server, self.view, self.control, self.feedback = server, view, control, feedback

    def call(
        self, method: str, path: str, body: Any = None, token: str | None = None, raw: bytes | None = None
    ) -> tuple[int, Any, http.client.HTTPMessage]:
        headers = {"Content-Type": "application/json"}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        data = raw if raw is not None else (orjson.dumps(body) if body is not None else None)
        request = urllib.request.Request(self.server.url + path.lstrip("/"), data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                payload = response.read()
                status, message = response.status, response.headers
        except urllib.error.HTTPError as error:
            payload, status, message = error.read(), error.code, error.headers
        ctype = message.get("Content-Type", "")
        return status, orjson.loads(payload) if ctype.startswith("application/json") else payload, message


@pytest.fixture
def api() -> Iterator[Api]:
    view = populated_view()
    control, feedback = Control(view), LocalFeedback()
    app = create_web_app(
        view, Metrics(view), breaker_control=control, feedback_sink=feedback, api_token=TOKEN, ready=Ready()
    )
    with BackgroundServer(app, port=0) as server:
        yield Api(server, view, control, feedback)


def test_listens_on_loopback_by_default(api: Api) -> None:
    assert inspect.signature(serve).parameters["host"].default == "127.0.0.1"
    assert inspect.signature(BackgroundServer).parameters["host"].default == "127.0.0.1"
    assert api.server.url.startswith("http://127.0.0.1:")
    with socket.create_connection(("127.0.0.1", api.server.port), timeout=5):
        pass


def _get_as(server: BackgroundServer, path: str, host: str) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        conn.request("GET", path, headers={"Host": host})
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def test_a_loopback_server_answers_only_to_loopback_names_against_dns_rebinding() -> None:
    app = create_web_app(populated_view(), allowed_hosts=answers_to("127.0.0.1", []))
    with BackgroundServer(app, port=0) as server:
        port = server.port
        for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", "LOCALHOST"):
            assert _get_as(server, "/api/state", host) == 200, host
        for host in (f"rebind.attacker.example:{port}", "127.0.0.1.attacker.example", "[::1", ""):
            assert _get_as(server, "/api/state", host) == 421, host
        assert _get_as(server, "/", "rebind.attacker.example") == 421
        assert _get_as(server, "/healthz", "10.0.0.7:8080") == 200  # probes come by pod IP
    proxied = create_web_app(LiveView(), allowed_hosts=answers_to("0.0.0.0", ["Dash.Example.com"]))
    with BackgroundServer(proxied, port=0) as server:
        assert _get_as(server, "/api/state", "dash.example.com") == 200
        assert _get_as(server, "/api/state", f"127.0.0.1:{server.port}") == 421
    assert answers_to("0.0.0.0", []) is None and answers_to("127.0.0.1", ["*"]) is None


def test_health_and_readiness() -> None:
    ready = Ready()
    with BackgroundServer(create_web_app(LiveView(), ready=ready), port=0) as server:
        api = Api(server, LiveView(), Control(LiveView()), LocalFeedback())
        assert api.call("GET", "/healthz")[:2] == (200, {"status": "ok"})
        assert api.call("GET", "/readyz")[:2] == (200, {"status": "ready"})
        ready.ready = False
        assert api.call("GET", "/readyz")[:2] == (503, {"status": "not ready"})
        assert api.call("GET", "/healthz")[0] == 200
        assert api.call("GET", "/metrics")[0] == 404  # no metrics given to this app


def test_incidents_are_listed_filtered_and_detailed(api: Api) -> None:
    status, body, headers = api.call("GET", "/api/incidents")
    assert status == 200 and headers["Cache-Control"] == "no-store"
    assert [i["incident_id"] for i in body["incidents"]] == ["inc-a", "inc-b", "inc-c"]
    first = body["incidents"][0]
    assert first["severity"] == "critical" and first["entity"] == "api_key:k1" and first["owner"] == "search"
    assert first["summary"] and first["cost_rate_usd_per_hour"] == 12.5 and first["excess_cost_usd"] == 3.0
    assert [i["incident_id"] for i in api.call("GET", "/api/incidents?status=active")[1]["incidents"]] == [
        "inc-a",
        "inc-b",
    ]
    assert [i["incident_id"] for i in api.call("GET", "/api/incidents?status=resolved")[1]["incidents"]] == ["inc-c"]
    assert api.call("GET", "/api/incidents?limit=1&status=active")[1]["count"] == 1
    assert api.call("GET", "/api/incidents?status=sideways")[0] == 400
    assert api.call("GET", "/api/incidents?limit=many")[0] == 400
    status, detail, _ = api.call("GET", "/api/incidents/inc-c")
    assert status == 200 and [h["status"] for h in detail["history"]] == ["firing", "resolved"]
    assert detail["evidence"]["metric"] == "attempts_per_minute"
    assert api.call("GET", "/api/incidents/nope")[0] == 404


def test_entities(api: Api) -> None:
    status, key, _ = api.call("GET", "/api/entities/api_key/k1")
    assert status == 200
    assert (key["owner"], key["events"], key["spend_usd"]) == ("search", 120, 60.0)
    assert [i["incident_id"] for i in key["incidents"]] == ["inc-a"]
    status, session, _ = api.call("GET", "/api/entities/session/" + urllib.parse.quote("s/1:x", safe=""))
    assert status == 200 and session["id"] == "s/1:x" and session["incidents"][0]["kind"] == "agent_loop"
    assert api.call("GET", "/api/entities/session/s/1:x")[1]["id"] == "s/1:x"  # a slash need not be escaped
    team = api.call("GET", "/api/entities/team/ads")[1]
    assert team["spend_usd"] == 30.0 and team["breakdown"][0]["name"] == "o3"
    assert api.call("GET", "/api/entities/api_key/never-seen")[0] == 404
    assert api.call("GET", "/api/entities/planet/earth")[0] == 400


def test_a_user_is_asked_for_by_team(api: Api) -> None:
    api.view.observe_event(make_event(T0 + 200, api_key_id="k2", team="ads", user="ann"), 7.0)  # ads' own ann
    status, ann, _ = api.call("GET", "/api/entities/user/ann?team=ads")
    assert status == 200 and (ann["owner"], ann["events"], ann["spend_usd"]) == ("ads", 1, 7.0)
    assert ann["teams"] == ["ads", "search"]
    assert api.call("GET", "/api/entities/user/ann")[1]["owner"] == "search"  # the team that spent most
    status, error, _ = api.call("GET", "/api/entities/user/ann?team=billing")
    assert status == 404 and error["error"] == "user:ann of team billing has not been seen"


def test_state_and_spend(api: Api) -> None:
    status, state, _ = api.call("GET", "/api/state?range=3600")
    assert status == 200
    assert state["controls"] == {"read_only": False, "breakers": True, "feedback": True}
    assert state["totals"]["events"] == 240 and state["totals"]["rejected"] == 1
    assert {s["team"] for s in state["spend"]["series"]} == {"search", "ads"}
    assert state["top"]["api_key"][0]["id"] == "k1"
    spend = api.call("GET", "/api/spend?range=600&step=60")[1]
    assert spend["points"] == 10 and sum(spend["total"]) == pytest.approx(90.0)
    assert api.call("GET", "/api/spend?step=x")[0] == 400
    assert api.call("GET", "/api/state?range=soon")[0] == 400


def test_breaker_changes_need_the_token(api: Api) -> None:
    body = {"entity": "api_key:k1", "action": "open", "reason": "storm", "ttl_seconds": 600}
    status, _, headers = api.call("POST", "/api/breakers", body)
    assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer")
    assert api.call("POST", "/api/breakers", body, token="guess")[:2] == (403, {"error": "wrong token"})
    assert api.control.requests == []
    status, result, _ = api.call("POST", "/api/breakers", body, token=TOKEN)
    assert status == 200 and result["breaker"]["state"] == "open"
    (request,) = api.control.requests
    assert (str(request.entity), request.action, request.reason, request.ttl_seconds) == (
        "api_key:k1",
        "open",
        "storm",
        600,
    )
    assert (request.actor, request.owner) == ("dashboard", "search")
    breakers = api.call("GET", "/api/breakers")[1]["breakers"]
    assert [(b["entity"], b["state"], b["owner"]) for b in breakers] == [("api_key:k1", "open", "search")]
    closing = {"entity": "api_key:k1", "action": "close", "by": "ann"}
    status, result, _ = api.call("POST", "/api/breakers", closing, token=TOKEN)
    assert status == 200 and result["breaker"]["state"] == "closed" and result["changes"][0]["actor"] == "ann"
    assert (
        api.call(
            "POST",
            "/api/breakers",
            {"entity": "agent:bot", "action": "open", "until_closed": True, "owner": "ads"},
            token=TOKEN,
        )[1]["breaker"]["expires_at"]
        is None
    )
    assert api.control.requests[-1].ttl_seconds == float("inf")


def test_an_agents_breaker_is_opened_and_closed_for_one_team(api: Api) -> None:
    for team in ("search", "ads"):
        body = {"entity": "agent:assistant", "action": "open", "owner": team, "reason": "loop"}
        status, result, _ = api.call("POST", "/api/breakers", body, token=TOKEN)
        assert status == 200 and (result["breaker"]["owner"], result["breaker"]["state"]) == (team, "open")
    closing = {"entity": "agent:assistant", "action": "close", "owner": "ads"}
    assert api.call("POST", "/api/breakers", closing, token=TOKEN)[1]["breaker"]["state"] == "closed"
    breakers = api.call("GET", "/api/breakers")[1]["breakers"]
    assert sorted((b["key"], b["state"]) for b in breakers if b["entity"] == "agent:assistant") == [
        ("agent:ads/assistant", "closed"),
        ("agent:search/assistant", "open"),
    ]


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"entity": "model:gpt-4o", "action": "open"}, 400),
        ({"entity": "api_key:", "action": "open"}, 400),
        ({"entity": "api_key: ", "action": "open"}, 400),
        ({"entity": "api_key:k1", "action": "smash"}, 400),
        ({"entity": "api_key:k1", "action": "open", "ttl_seconds": -5}, 400),
        ({"entity": "api_key:k1", "action": "open", "ttl_seconds": "1h"}, 400),
        ({"entity": "api_key:k1", "action": "open", "reason": "x" * 600}, 400),
        ({"entity": "api_key:protected", "action": "open"}, 409),
        ({"entity": "agent:never-seen", "action": "open"}, 400),  # whose? teams name their agents
        ({"entity": "agent:bot", "action": "open", "owner": 5}, 400),
        ({"entity": "agent:bot", "action": "open", "owner": " "}, 400),
        ([1, 2, 3], 400),
    ],
)
def test_bad_breaker_requests_are_refused_with_the_reason(api: Api, body: Any, status: int) -> None:
    got, error, _ = api.call("POST", "/api/breakers", body, token=TOKEN)
    assert got == status and error["error"]


def test_a_body_that_is_not_json_is_refused(api: Api) -> None:
    assert api.call("POST", "/api/breakers", raw=b"{nope", token=TOKEN)[0] == 400


def test_read_only_without_a_token_and_no_control_without_one() -> None:
    view = populated_view()
    with BackgroundServer(create_web_app(view, breaker_control=Control(view)), port=0) as server:
        api = Api(server, view, Control(view), LocalFeedback())
        status, error, _ = api.call("POST", "/api/breakers", {"entity": "api_key:k1", "action": "open"}, token="x")
        assert status == 403 and error["error"].startswith("read-only")
        assert api.call("POST", "/api/incidents/inc-a/feedback", {"label": "real"})[0] == 403
        assert api.call("GET", "/api/breakers")[1]["controls"] == {
            "read_only": True,
            "breakers": False,
            "feedback": False,
        }
    with BackgroundServer(create_web_app(view, api_token=TOKEN), port=0) as server:
        api = Api(server, view, Control(view), LocalFeedback())
        assert api.call("POST", "/api/breakers", {"entity": "api_key:k1", "action": "open"}, token=TOKEN)[0] == 501
        assert api.call("POST", "/api/incidents/inc-a/feedback", {"label": "real"}, token=TOKEN)[0] == 501


def test_feedback_reaches_the_sink_and_shows_on_the_incident(api: Api) -> None:
    path = "/api/incidents/inc-a/feedback"
    assert api.call("POST", path, {"label": "false_alarm"})[0] == 401
    assert api.call("POST", path, {"label": "meh"}, token=TOKEN)[0] == 400
    assert api.call("POST", "/api/incidents/nope/feedback", {"label": "real"}, token=TOKEN)[0] == 404
    status, result, _ = api.call("POST", path, {"label": "false_alarm", "note": "load test", "by": "ann"}, token=TOKEN)
    assert status == 200
    (fb,) = api.feedback.received
    assert (fb.incident_id, fb.kind.value, str(fb.entity), fb.label.value, fb.actor, fb.note) == (
        "inc-a",
        "retry_storm",
        "api_key:k1",
        "false_alarm",
        "ann",
        "load test",
    )
    assert fb.silence_seconds == 86400.0  # the default for a false alarm
    assert result["feedback"]["feedback_id"] == fb.feedback_id
    incident = api.call("GET", "/api/incidents/inc-a")[1]
    assert incident["feedback"]["label"] == "false_alarm" and incident["feedback"]["actor"] == "ann"
    api.call("POST", path, {"label": "planned", "silence_seconds": 0}, token=TOKEN)
    assert api.feedback.received[-1].silence_seconds == 0


def test_metrics_endpoint(api: Api) -> None:
    metrics = Metrics(api.view)
    assert metrics.registry is not None  # a second Metrics on the same view is independent
    api.call("POST", "/api/breakers", {"entity": "session:s/1:x", "action": "open"}, token=TOKEN)
    status, body, headers = api.call("GET", "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
    text = body.decode()
    assert 'stormwatch_breakers{entity_type="session",state="open"} 1.0' in text
    assert 'stormwatch_incidents_active{kind="retry_storm",severity="critical"} 1.0' in text


def test_page_and_static_files_are_served_with_a_strict_policy(api: Api) -> None:
    status, page, headers = api.call("GET", "/")
    assert status == 200 and b"<title>Stormwatch" in page
    assert "default-src 'self'" in headers["Content-Security-Policy"]
    assert headers["X-Content-Type-Options"] == "nosniff"
    for asset in (b"static/app.js", b"static/chart.js", b"static/app.css"):
        assert asset in page
        assert api.call("GET", "/" + asset.decode())[0] == 200
    assert b"http://" not in page and b"https://" not in page  # nothing from a CDN
    assert api.call("GET", "/static/../server.py")[0] in (403, 404)
    assert api.call("GET", "/static/%2e%2e/server.py")[0] in (403, 404)


def read_event(response: http.client.HTTPResponse) -> dict[str, Any]:
    """The next `state` event of a server-sent event stream, parsed."""
    fields: dict[str, str] = {}
    while True:
        line = response.fp.readline().decode()
        assert line, "the stream ended"
        line = line.rstrip("\n")
        if not line:
            if fields.get("event") == "state":
                data: dict[str, Any] = orjson.loads(fields["data"])
                return data
            fields = {}
            continue
        if line.startswith(":"):
            continue
        key, _, value = line.partition(": ")
        fields[key] = value


def test_stream_pushes_state_then_every_change(api: Api) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", api.server.port, timeout=10)
    conn.request("GET", "/api/stream?range=3600")
    response = conn.getresponse()
    assert response.status == 200 and response.headers["Content-Type"] == "text/event-stream"
    first = read_event(response)
    assert {i["incident_id"] for i in first["incidents"]["active"]} == {"inc-a", "inc-b"}
    started = time.monotonic()
    api.view.observe_alert(make_alert("inc-live", severity="critical", entity="api_key:k2", at=T0 + 200))
    pushed = read_event(response)
    assert time.monotonic() - started < 5
    assert "inc-live" in {i["incident_id"] for i in pushed["incidents"]["active"]}
    assert pushed["version"] > first["version"]
    # Many events in a burst come as few pushes, not one per event.
    for i in range(500):
        api.view.observe_event(make_event(T0 + 300 + i, team="burst"), 1.0)
    burst = read_event(response)
    while burst["totals"]["events"] < 740:
        burst = read_event(response)
    assert "burst" in {s["team"] for s in burst["spend"]["series"]}
    conn.close()


def test_stopping_the_server_ends_open_streams() -> None:
    view = LiveView()
    server = BackgroundServer(create_web_app(view, heartbeat_seconds=60), port=0).start()
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    conn.request("GET", "/api/stream")
    response = conn.getresponse()
    read_event(response)
    started = time.monotonic()
    server.stop()
    assert time.monotonic() - started < 5
    conn.close()


def _raw(server: BackgroundServer, method: str, path: str, headers: dict[str, bytes], body: bytes = b"") -> int:
    """One request with header values sent as the bytes given (not what urllib would allow)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        conn.putrequest(method, path)
        for name, value in {**headers, "Content-Length": str(len(body)).encode()}.items():
            conn.putheader(name, value)
        conn.endheaders(body)
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def test_odd_requests_get_a_4xx_not_a_500_nor_a_stall(api: Api) -> None:
    """What a review found: each of these answered 500, or held the server (and a worker's events) for good."""
    started = time.monotonic()
    status, spend, _ = api.call("GET", f"/api/spend?range=3600&step={10**14}")
    assert status == 200 and spend["points"] == 1 and spend["step_seconds"] <= 3600
    assert time.monotonic() - started < 5 and api.call("GET", "/healthz")[0] == 200
    bad_token = {"Authorization": b"Bearer \xff\xfe", "Content-Type": b"application/json"}
    assert _raw(api.server, "POST", "/api/breakers", bad_token, b'{"entity": "api_key:k1", "action": "open"}') == 403
    charset = {"Authorization": f"Bearer {TOKEN}".encode(), "Content-Type": b"application/json; charset=nope"}
    assert _raw(api.server, "POST", "/api/breakers", charset, b"{}") == 400
    for label in (["real"], {"real": 1}, 7):
        assert api.call("POST", "/api/incidents/inc-a/feedback", {"label": label}, token=TOKEN)[0] == 400, label
    assert answers_to("127.0.0.2", []) == frozenset({"localhost", "127.0.0.1", "::1", "127.0.0.2"})


def test_mounted_under_a_prefix_the_probes_still_answer_any_host() -> None:
    """A kubelet probes by pod IP; in the worker the dashboard may be mounted under a prefix (add_subapp)."""
    from aiohttp import web

    parent = web.Application()
    parent.add_subapp("/stormwatch/", create_web_app(populated_view(), allowed_hosts=answers_to("127.0.0.1", [])))
    with BackgroundServer(parent, port=0) as server:
        assert _get_as(server, "/stormwatch/healthz", "10.0.0.7:8080") == 200
        assert _get_as(server, "/stormwatch/api/state", "10.0.0.7:8080") == 421
