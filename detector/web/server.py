"""The dashboard, its JSON API, a live stream and ``/metrics``: one aiohttp application.

:func:`create_web_app` builds it over a :class:`~detector.web.view.LiveView` (and, optionally,
:class:`~detector.web.metrics.Metrics`, a :class:`~detector.web.control.BreakerControl` and a
:class:`~detector.web.control.FeedbackSink`). The same application serves the embedded shell
(:func:`serve`, or :class:`BackgroundServer` from another thread) and can be mounted in the
worker's aiohttp server (``web_app.add_subapp("/stormwatch/", app)``: the page uses relative
URLs). It listens on 127.0.0.1 unless told otherwise.

Routes (all JSON unless said):

============================================  ===============================================
``GET /``                                     the page (HTML; its JS and CSS under ``/static/``)
``GET /api/state?range=SECONDS``              everything the page shows, in one document
``GET /api/stream?range=SECONDS``             the same, pushed as server-sent events (``state``)
``GET /api/incidents?status=&limit=``         active (most severe first) and resolved incidents
``GET /api/incidents/{incident_id}``          one incident with its record history
``POST /api/incidents/{incident_id}/feedback`` ``{"label": "real"|"false_alarm"|"planned", ...}``
``GET /api/entities/{type}/{id}[?team=T]``    spend, events, models, incidents, breaker of one entity
``GET /api/spend?range=&step=``               spend per team over time
``GET /api/breakers``                         breakers, open first
``POST /api/breakers``                        ``{"entity": "api_key:k1", "action": "open"|"close", ...}``
``GET /healthz``, ``GET /readyz``             liveness; readiness from the shell's ``ready()``
``GET /metrics``                              Prometheus text exposition
============================================  ===============================================

Changes (the two POSTs) need ``Authorization: Bearer <api_token>``: 401 without it, 403 with a
wrong one, and 403 for everyone when no token is configured (read-only).

A request whose ``Host`` is not one of ``allowed_hosts`` gets 421 (but for the probes): a web page
elsewhere cannot point a DNS name of its own at 127.0.0.1 and read the dashboard through it.

>>> sorted(answers_to("127.0.0.1", [])), answers_to("0.0.0.0", []), answers_to("::1", ["*"])
(['127.0.0.1', '::1', 'localhost'], None, None)
>>> host_name("[::1]:8080"), host_name("Dash.Example.com:443"), host_name("")
('::1', 'dash.example.com', '')
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import logging
import math
import threading
import uuid
from collections.abc import Awaitable, Callable, Collection, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

import orjson
from aiohttp import web

from detector.breakers import TEAM_SCOPED
from detector.events import Entity, FeedbackLabel, IncidentFeedback
from detector.web.control import DASHBOARD_ACTOR, BreakerControl, BreakerRefused, BreakerRequest, FeedbackSink
from detector.web.metrics import Metrics
from detector.web.view import BREAKER_ENTITY_TYPES, ENTITY_TYPES, LiveView, iso

log = logging.getLogger("stormwatch.web")

STATIC_DIR: Final = Path(__file__).with_name("static")
DEFAULT_RANGE_SECONDS: Final = 6 * 3600.0
MAX_RANGE_SECONDS: Final = 7 * 86400.0
MAX_TTL_SECONDS: Final = 30 * 86400.0
#: How long a false alarm or planned activity silences its pattern when the request does not say.
DEFAULT_SILENCE_SECONDS: Final = {"real": 0.0, "false_alarm": 86400.0, "planned": 86400.0}

#: The text exposition format every Prometheus version parses (our names are all plain ASCII).
METRICS_CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"

LOOPBACK_NAMES: Final = frozenset({"localhost", "127.0.0.1", "::1"})

CSP: Final = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "font-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'none'"
)


class _Config:
    """Everything the handlers need, stored under one app key."""

    def __init__(
        self,
        view: LiveView,
        metrics: Metrics | None,
        breaker_control: BreakerControl | None,
        feedback_sink: FeedbackSink | None,
        api_token: str | None,
        ready: Callable[[], bool],
        push_interval: float,
        heartbeat_seconds: float,
        allowed_hosts: Collection[str] | None,
    ) -> None:
        self.view = view
        self.metrics = metrics
        self.breaker_control = breaker_control
        self.feedback_sink = feedback_sink
        self.api_token = api_token or None
        self.ready = ready
        self.push_interval = push_interval
        self.heartbeat_seconds = heartbeat_seconds
        self.allowed_hosts = allowed_hosts
        self.streams: set[asyncio.Event] = set()
        self.closing = False

    def controls(self) -> dict[str, Any]:
        return {
            "read_only": self.api_token is None,
            "breakers": self.api_token is not None and self.breaker_control is not None,
            "feedback": self.api_token is not None and self.feedback_sink is not None,
        }


CONFIG: Final = web.AppKey("stormwatch_web", _Config)


def answers_to(listen_host: str, allowed: Iterable[str]) -> frozenset[str] | None:
    """The host names a server on ``listen_host`` answers to (``None``: any), from ``[web] allowed_hosts``."""
    names = frozenset(name.lower().strip("[]") for name in allowed)
    if "*" in names:
        return None
    if names:
        return names
    try:
        loopback = listen_host == "localhost" or ipaddress.ip_address(listen_host).is_loopback
    except ValueError:
        loopback = False
    return LOOPBACK_NAMES | {listen_host.lower().strip("[]")} if loopback else None


def host_name(host: str) -> str:
    """The name in a ``Host`` header, without its port, lower-cased ("" when it has none)."""
    try:
        return (urlsplit("//" + host).hostname or "").lower()
    except ValueError:  # e.g. an unclosed "[": no name of ours
        return ""


def create_web_app(
    view: LiveView,
    metrics: Metrics | None = None,
    *,
    breaker_control: BreakerControl | None = None,
    feedback_sink: FeedbackSink | None = None,
    api_token: str | None = None,
    ready: Callable[[], bool] | None = None,
    push_interval: float = 0.5,
    heartbeat_seconds: float = 15.0,
    allowed_hosts: Collection[str] | None = None,
) -> web.Application:
    """The dashboard application. ``ready()`` answers ``/readyz`` (default: always ready).

    ``push_interval`` is the least time between two pushes of the live stream; changes in
    between are sent together. ``heartbeat_seconds`` keeps idle streams open through proxies.
    ``allowed_hosts``: the ``Host`` names answered (see :func:`answers_to`); ``None``: any.
    """
    app = web.Application(client_max_size=64 * 1024, middlewares=[_check_host])
    app[CONFIG] = _Config(
        view,
        metrics,
        breaker_control,
        feedback_sink,
        api_token,
        ready or (lambda: True),
        push_interval,
        heartbeat_seconds,
        allowed_hosts,
    )
    app.on_response_prepare.append(_security_headers)
    app.on_shutdown.append(_close_streams)
    r = app.router
    r.add_get("/", _index)
    r.add_static("/static/", STATIC_DIR, follow_symlinks=False)
    r.add_get("/api/state", _state)
    r.add_get("/api/stream", _stream)
    r.add_get("/api/incidents", _incidents)
    r.add_get("/api/incidents/{incident_id}", _incident)
    r.add_post("/api/incidents/{incident_id}/feedback", _feedback)
    r.add_get("/api/entities/{type}/{id:.+}", _entity)
    r.add_get("/api/spend", _spend)
    r.add_get("/api/breakers", _breakers)
    r.add_post("/api/breakers", _change_breaker)
    r.add_get("/healthz", _healthz)
    r.add_get("/readyz", _readyz)
    r.add_get("/metrics", _metrics)
    return app


async def serve(app: web.Application, host: str = "127.0.0.1", port: int = 8080) -> web.AppRunner:
    """Start ``app`` on ``host:port`` (port 0: a free one, see :func:`bound_port`).

    ``await runner.cleanup()`` stops it, ending live streams first.
    """
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=5.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    return runner


def url_host(host: str) -> str:
    """``host`` as it goes in a URL: an IPv6 address in brackets.

    >>> url_host("::1"), url_host("127.0.0.1"), url_host("[::1]")
    ('[::1]', '127.0.0.1', '[::1]')
    """
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def bound_port(runner: web.AppRunner) -> int:
    """The port a started runner listens on."""
    port: int = runner.addresses[0][1]
    return port


class BackgroundServer:
    """The app served from its own thread and event loop, for a shell that runs in the foreground (and tests).

    >>> view = LiveView()
    >>> with BackgroundServer(create_web_app(view), port=0) as server:
    ...     import urllib.request
    ...     urllib.request.urlopen(server.url + "healthz").read()
    b'{"status":"ok"}'
    """

    def __init__(self, app: web.Application, host: str = "127.0.0.1", port: int = 8080) -> None:
        self.app = app
        self.host = host
        self.port = port
        self.loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._thread = threading.Thread(target=self.loop.run_forever, name="stormwatch-web", daemon=True)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    def start(self) -> BackgroundServer:
        self._thread.start()
        self._runner = self.call(serve(self.app, self.host, self.port))
        self.port = bound_port(self._runner)
        return self

    def call(self, coro: Awaitable[Any], timeout: float = 30.0) -> Any:
        """Run a coroutine on the server's loop and wait for its result."""

        async def run() -> Any:
            return await coro

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(timeout)

    def stop(self) -> None:
        if self._runner is not None:
            self.call(self._runner.cleanup())
            self._runner = None
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
        if not self.loop.is_running():
            self.loop.close()

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- helpers ---------------------------------------------------------------------------------


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json", headers=headers)


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return _json({"error": message}, status, headers)


def _cfg(request: web.Request) -> _Config:
    return request.app[CONFIG]


def _range(request: web.Request) -> float:
    try:
        seconds = float(request.query.get("range", DEFAULT_RANGE_SECONDS))
    except ValueError:
        raise web.HTTPBadRequest(
            text='{"error": "range must be a number of seconds"}', content_type="application/json"
        ) from None
    if not math.isfinite(seconds) or seconds < 60:
        seconds = DEFAULT_RANGE_SECONDS
    return min(seconds, MAX_RANGE_SECONDS)


def _state_payload(cfg: _Config, range_seconds: float) -> dict[str, Any]:
    state = cfg.view.snapshot(range_seconds)
    state["controls"] = cfg.controls()
    state["range_seconds"] = range_seconds
    return state


def _authorize(request: web.Request) -> web.Response | None:
    """None when the request may change things; else the response that says why not."""
    token = _cfg(request).api_token
    if token is None:
        return _error(403, "read-only: no API token is configured, so nothing can be changed from here")
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        return _error(401, "send Authorization: Bearer <token>", {"WWW-Authenticate": 'Bearer realm="stormwatch"'})
    # aiohttp keeps header bytes that are not UTF-8 as surrogates: encoded back as they came, they match no token.
    if not hmac.compare_digest(given.strip().encode("utf-8", "surrogateescape"), token.encode()):
        return _error(403, "wrong token")
    return None


async def _body(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json(loads=orjson.loads)
    except (orjson.JSONDecodeError, UnicodeDecodeError, LookupError):  # LookupError: a charset Python lacks
        raise web.HTTPBadRequest(
            text='{"error": "the body must be a JSON object"}', content_type="application/json"
        ) from None
    if not isinstance(body, dict):
        raise web.HTTPBadRequest(text='{"error": "the body must be a JSON object"}', content_type="application/json")
    return body


def _text(body: dict[str, Any], key: str, default: str, limit: int) -> str:
    value = body.get(key, default)
    if value is None:
        return default
    if not isinstance(value, str):
        raise ValueError(f"{key} must be a string")
    value = value.strip()
    if len(value) > limit:
        raise ValueError(f"{key} is longer than {limit} characters")
    return value or default


@web.middleware
async def _check_host(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    allowed = request.app[CONFIG].allowed_hosts
    # By handler, not path: mounted under a prefix (add_subapp) the probes' paths are /prefix/healthz.
    if allowed is not None and request.match_info.handler not in (_healthz, _readyz):
        name = host_name(request.host)
        if name not in allowed:
            return _error(421, f"this server does not answer to host {name!r}: add it to [web] allowed_hosts")
    return await handler(request)


async def _security_headers(request: web.Request, response: web.StreamResponse) -> None:
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("Referrer-Policy", "no-referrer")
    response.headers.setdefault("X-Frame-Options", "DENY")
    response.headers.setdefault("Content-Security-Policy", CSP)
    if request.path.startswith("/api/"):
        response.headers.setdefault("Cache-Control", "no-store")


async def _close_streams(app: web.Application) -> None:
    cfg = app[CONFIG]
    cfg.closing = True
    for changed in list(cfg.streams):
        changed.set()


# -- handlers --------------------------------------------------------------------------------


async def _index(request: web.Request) -> web.StreamResponse:
    return web.FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})


async def _state(request: web.Request) -> web.Response:
    return _json(_state_payload(_cfg(request), _range(request)))


async def _stream(request: web.Request) -> web.StreamResponse:
    """Server-sent events: a ``state`` event now, then after every change (at most one per push interval)."""
    cfg = _cfg(request)
    range_seconds = _range(request)
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )
    await response.prepare(request)
    loop = asyncio.get_running_loop()
    changed = asyncio.Event()

    def listener(_topic: str) -> None:  # called from whichever thread fed the view
        with contextlib.suppress(RuntimeError):  # the loop is closing
            loop.call_soon_threadsafe(changed.set)

    unsubscribe = cfg.view.subscribe(listener)
    cfg.streams.add(changed)
    try:
        await response.write(b"retry: 2000\n\n")
        push = True
        while not cfg.closing:
            if push:
                changed.clear()
                state = _state_payload(cfg, range_seconds)
                await response.write(b"event: state\nid: %d\ndata: %s\n\n" % (state["version"], orjson.dumps(state)))
                pushed_at = loop.time()
            try:
                await asyncio.wait_for(changed.wait(), cfg.heartbeat_seconds)
            except TimeoutError:
                await response.write(b": keep-alive\n\n")
                push = False
                continue
            push = True
            wait = cfg.push_interval - (loop.time() - pushed_at)
            if wait > 0 and not cfg.closing:
                await asyncio.sleep(wait)
    except (ConnectionResetError, ConnectionError):
        pass  # the page went away
    finally:
        unsubscribe()
        cfg.streams.discard(changed)
    return response


async def _incidents(request: web.Request) -> web.Response:
    which = request.query.get("status", "all")
    if which not in ("active", "resolved", "all"):
        return _error(400, "status must be active, resolved or all")
    try:
        limit = max(1, min(int(request.query.get("limit", "200")), 1000))
    except ValueError:
        return _error(400, "limit must be a whole number")
    incidents = _cfg(request).view.incidents(which, limit)  # type: ignore[arg-type]
    return _json({"incidents": incidents, "count": len(incidents)})


async def _incident(request: web.Request) -> web.Response:
    incident = _cfg(request).view.incident(request.match_info["incident_id"])
    if incident is None:
        return _error(404, "no such incident (it may be older than the dashboard remembers)")
    return _json(incident)


async def _entity(request: web.Request) -> web.Response:
    type_, id_ = request.match_info["type"], request.match_info["id"]
    if type_ not in ENTITY_TYPES:
        return _error(400, f"type must be one of {', '.join(ENTITY_TYPES)}")
    team = request.query.get("team") or None  # users, agents and sessions are per team
    summary = _cfg(request).view.entity(type_, id_, team)
    if summary is None:
        return _error(404, f"{type_}:{id_}{f' of team {team}' if team else ''} has not been seen")
    return _json(summary)


async def _spend(request: web.Request) -> web.Response:
    step: int | None = None
    if "step" in request.query:
        try:
            step = max(60, min(int(request.query["step"]), int(MAX_RANGE_SECONDS)))
        except ValueError:
            return _error(400, "step must be a whole number of seconds")
    return _json(_cfg(request).view.spend_series(_range(request), step))


async def _breakers(request: web.Request) -> web.Response:
    cfg = _cfg(request)
    return _json({"breakers": cfg.view.breakers(), "controls": cfg.controls()})


async def _change_breaker(request: web.Request) -> web.Response:
    denied = _authorize(request)
    if denied is not None:
        return denied
    cfg = _cfg(request)
    if cfg.breaker_control is None:
        return _error(501, "this shell has no breaker control")
    body = await _body(request)
    try:
        breaker_request = _breaker_request(body, cfg.view)
    except ValueError as error:
        return _error(400, str(error))
    try:
        changes = list(await cfg.breaker_control(breaker_request))
    except BreakerRefused as error:
        return _error(409, str(error))
    except ValueError as error:  # the request cannot be carried out as it stands (whose agent is it?)
        return _error(400, str(error))
    except Exception as error:
        log.exception("breaker control failed for %s", breaker_request.entity)
        return _error(502, f"the breaker could not be changed: {type(error).__name__}: {error}")
    for change in changes:
        cfg.view.observe_breaker(change)
    log.info(
        "breaker %s %s by %s: %s",
        breaker_request.entity,
        breaker_request.action,
        breaker_request.actor,
        breaker_request.reason,
    )
    current = cfg.view.breaker(breaker_request.entity, breaker_request.owner or "")
    return _json(
        {
            "changes": [c.model_dump(mode="json") for c in changes],
            "breaker": None if current is None else current.model_dump(mode="json"),
        }
    )


def _breaker_request(body: dict[str, Any], view: LiveView) -> BreakerRequest:
    text = body.get("entity")
    if not isinstance(text, str):
        raise ValueError('entity must be a string like "api_key:k1"')
    type_, _, id_ = text.strip().partition(":")
    id_ = id_.strip()  # "api_key: " is no key; " k1" is k1
    if type_ not in BREAKER_ENTITY_TYPES or not id_ or len(id_) > 256:
        raise ValueError(f"entity {text!r}: a breaker guards a {', '.join(BREAKER_ENTITY_TYPES)} (TYPE:ID)")
    entity = Entity.model_validate({"type": type_, "id": id_})
    action = body.get("action")
    if action not in ("open", "close"):
        raise ValueError("action must be open or close")
    ttl: float | None = None
    if body.get("until_closed") is True:
        ttl = math.inf
    elif body.get("ttl_seconds") is not None:
        raw = body["ttl_seconds"]
        if isinstance(raw, bool) or not isinstance(raw, int | float) or not 0 < raw <= MAX_TTL_SECONDS:
            raise ValueError(f"ttl_seconds must be a number of seconds in (0, {MAX_TTL_SECONDS:g}]")
        ttl = float(raw)
    owner = body.get("owner")
    if owner is None:
        owner = view.owner(entity)  # the team of its newest event
    elif not isinstance(owner, str) or not 0 < len(owner.strip()) <= 256:
        raise ValueError("owner must be a team name")
    else:
        owner = owner.strip()
    if owner is None and entity.type in TEAM_SCOPED:
        raise ValueError(f"{entity}: whose? Each team has its own {entity.type}s; say owner (the team)")
    default_reason = "opened from the dashboard" if action == "open" else "closed from the dashboard"
    incident_id = body.get("incident_id")
    if incident_id is not None and (not isinstance(incident_id, str) or len(incident_id) > 256):
        raise ValueError("incident_id must be a string")
    return BreakerRequest(
        entity=entity,
        action=action,
        reason=_text(body, "reason", default_reason, 500),
        actor=_text(body, "actor", _text(body, "by", DASHBOARD_ACTOR, 256), 256),
        ttl_seconds=ttl,
        incident_id=incident_id,
        owner=owner,
    )


async def _feedback(request: web.Request) -> web.Response:
    denied = _authorize(request)
    if denied is not None:
        return denied
    cfg = _cfg(request)
    if cfg.feedback_sink is None:
        return _error(501, "this shell takes no incident feedback")
    incident_id = request.match_info["incident_id"]
    alert = cfg.view.incident_alert(incident_id)
    if alert is None:
        return _error(404, "no such incident (it may be older than the dashboard remembers)")
    body = await _body(request)
    label = body.get("label")
    if not isinstance(label, str) or label not in {lb.value for lb in FeedbackLabel}:
        return _error(400, "label must be real, false_alarm or planned")
    try:
        note = _text(body, "note", "", 2000)
        actor = _text(body, "by", _text(body, "actor", DASHBOARD_ACTOR, 256), 256)
    except ValueError as error:
        return _error(400, str(error))
    silence = body.get("silence_seconds", DEFAULT_SILENCE_SECONDS[label])
    if isinstance(silence, bool) or not isinstance(silence, int | float) or not 0 <= silence <= MAX_TTL_SECONDS:
        return _error(400, f"silence_seconds must be a number of seconds in [0, {MAX_TTL_SECONDS:g}]")
    feedback = IncidentFeedback(
        feedback_id=str(uuid.uuid4()),
        incident_id=incident_id,
        kind=alert.kind,
        entity=alert.entity,
        team=alert.owner,
        label=FeedbackLabel(label),
        actor=actor,
        labelled_at=datetime.now(UTC),
        silence_seconds=float(silence),
        note=note,
    )
    try:
        await cfg.feedback_sink(feedback)
    except Exception as error:
        log.exception("feedback sink failed for incident %s", incident_id)
        return _error(502, f"the feedback could not be recorded: {type(error).__name__}: {error}")
    cfg.view.observe_feedback(feedback)
    return _json({"feedback": feedback.model_dump(mode="json"), "labelled_at": iso(feedback.labelled_at)})


async def _healthz(request: web.Request) -> web.Response:
    return _json({"status": "ok"})


async def _readyz(request: web.Request) -> web.Response:
    try:
        ready = bool(_cfg(request).ready())
    except Exception as error:
        log.exception("ready() failed")
        return _json({"status": "not ready", "error": f"{type(error).__name__}: {error}"}, 503)
    return _json({"status": "ready"}) if ready else _json({"status": "not ready"}, 503)


async def _metrics(request: web.Request) -> web.Response:
    metrics = _cfg(request).metrics
    if metrics is None:
        return _error(404, "this shell exports no metrics")
    body = await asyncio.get_running_loop().run_in_executor(None, metrics.render)
    return web.Response(body=body, headers={"Content-Type": METRICS_CONTENT_TYPE})
