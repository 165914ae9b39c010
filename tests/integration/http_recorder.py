"""A real HTTP server on 127.0.0.1 that records every request, for tests of things that send HTTP::

    async with HttpRecorder() as server:
        ...  # send to server.url
        seen = await server.wait_for(lambda requests: len(requests) >= 3)

``respond`` decides each answer from the request (and how many came before it), so a test can
play a receiver that fails, then recovers. ``port`` may be fixed in advance (:func:`free_port`)
so a sender can aim at a receiver that is not up yet.

(No doctest here: a doctest under tests/integration has no integration marker, yet the autouse
fixture there would start the session's Kafka broker for it.)
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from types import TracebackType

from aiohttp import web


@dataclass(frozen=True)
class Recorded:
    method: str
    path: str
    headers: dict[str, str]  # names lower-cased
    body: bytes
    at: float  # time.monotonic() on arrival
    status: int  # what the recorder answered


Respond = Callable[[Recorded, int], web.Response | Awaitable[web.Response]]


def ok(_request: Recorded, _index: int) -> web.Response:
    return web.Response(text="ok")


def free_port() -> int:
    """A port of 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class HttpRecorder:
    """Records requests in ``requests`` (arrival order); answers with ``respond(request, index)``, 200 by default."""

    def __init__(self, port: int = 0, respond: Respond = ok) -> None:
        self.port = port
        self.respond = respond
        self.requests: list[Recorded] = []
        self._changed = asyncio.Condition()
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        seen = Recorded(
            method=request.method,
            path=request.path_qs,
            headers={k.lower(): v for k, v in request.headers.items()},
            body=await request.read(),
            at=time.monotonic(),
            status=0,
        )
        answer = self.respond(seen, len(self.requests))
        response = answer if isinstance(answer, web.Response) else await answer
        async with self._changed:
            self.requests.append(replace(seen, status=response.status))
            self._changed.notify_all()
        return response

    async def start(self) -> HttpRecorder:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        await site.start()
        if self.port == 0:
            self.port = self._runner.addresses[0][1]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def wait_for(self, predicate: Callable[[list[Recorded]], bool], timeout: float = 10.0) -> list[Recorded]:
        """Wait until ``predicate(requests)`` holds and return a copy of them; TimeoutError after ``timeout``."""
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(lambda: predicate(self.requests))
            return list(self.requests)

    async def __aenter__(self) -> HttpRecorder:
        return await self.start()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()
