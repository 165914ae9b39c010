"""A toy LLM gateway that enforces Stormwatch's circuit breakers: follower + middleware around an app.

Run it with any ASGI server (the module-level ``app`` reads its settings from the environment)::

    STORMWATCH_BOOTSTRAP=127.0.0.1:9092 uvicorn examples.gateway_asgi:app --port 8080

or, with nothing but the standard library (a minimal HTTP/1.1 server, for trying it out)::

    STORMWATCH_BOOTSTRAP=127.0.0.1:9092 python examples/gateway_asgi.py --port 8080

then::

    curl -i -H 'x-team: search' -H 'x-session-id: s-1' localhost:8080/v1/chat/completions  # 200 from the toy app
    detector breaker open session:s-1 --owner search --reason "looping agent" --ttl 10m
    curl -i -H 'x-team: search' -H 'x-session-id: s-1' localhost:8080/v1/chat/completions  # 429 circuit_open
    curl -i -H 'x-team: ads' -H 'x-session-id: s-1' localhost:8080/v1/chat/completions     # 200: ads' own s-1

Environment: ``STORMWATCH_BOOTSTRAP`` (host:port list, default ``localhost:9092``) and
``STORMWATCH_BREAKERS_TOPIC`` (default ``llm.breakers``). At startup the gateway waits up to
``ready_timeout`` seconds for the breaker table to catch up with the topic, then serves anyway
(fail open: an unreachable Kafka must not take the gateway down; it keeps retrying).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
from typing import Any

from detector.enforce import ASGIApp, BreakerFollower, BreakerMiddleware, BreakerTable, Receive, Scope, Send

log = logging.getLogger("gateway")


async def toy_llm_app(scope: Scope, receive: Receive, send: Send) -> None:
    """Stands in for the real gateway: answers every HTTP request with a canned completion."""
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):  # drain the request body
        pass
    body = b'{"choices":[{"message":{"role":"assistant","content":"hello"}}]}'
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


class Gateway:
    """The ASGI app: the breaker middleware around ``inner``, with the follower run by the lifespan."""

    def __init__(
        self, inner: ASGIApp, bootstrap_servers: str, topic: str = "llm.breakers", ready_timeout: float = 10.0
    ) -> None:
        self.table = BreakerTable(probe_interval=30.0)
        self.follower = BreakerFollower(self.table, bootstrap_servers, topic)
        self.app = BreakerMiddleware(inner, self.table)
        self.ready_timeout = ready_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        else:
            await self.app(scope, receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.follower.start()
                except Exception as error:
                    await send({"type": "lifespan.startup.failed", "message": f"no Kafka: {error!r}"})
                    return
                try:
                    async with asyncio.timeout(self.ready_timeout):
                        await asyncio.shield(self.follower.ready)
                    log.info("breaker table ready: %d refusing", len(self.table))
                except TimeoutError:
                    log.warning("breaker table not caught up after %.0f s: serving anyway", self.ready_timeout)
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.follower.stop()
                await send({"type": "lifespan.shutdown.complete"})
                return


def build_app() -> Gateway:
    return Gateway(
        toy_llm_app,
        bootstrap_servers=os.environ.get("STORMWATCH_BOOTSTRAP", "localhost:9092"),
        topic=os.environ.get("STORMWATCH_BREAKERS_TOPIC", "llm.breakers"),
    )


app = build_app()  # for `uvicorn examples.gateway_asgi:app`


# -- a minimal HTTP/1.1 server, so the example runs without installing one ------------------------


async def serve(asgi: Gateway, host: str, port: int) -> None:
    """Serve ``asgi`` on host:port, one request per connection; lifespan around it. Not for production."""
    startup: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    sent: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    await startup.put({"type": "lifespan.startup"})
    lifespan = asyncio.create_task(asgi({"type": "lifespan"}, startup.get, sent.put))  # type: ignore[arg-type]
    started = await sent.get()
    if started["type"] != "lifespan.startup.complete":
        raise SystemExit(started.get("message", "startup failed"))

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            request_line, *lines = head.decode("latin-1").split("\r\n")
            method, target, _ = request_line.split(" ", 2)
            headers = [
                (name.strip().lower().encode("latin-1"), value.strip().encode("latin-1"))
                for name, _, value in (line.partition(":") for line in lines if line)
            ]
            length = int(dict(headers).get(b"content-length", b"0"))
            body = await reader.readexactly(length) if length else b""
            path, _, query = target.partition("?")
            scope = {
                "type": "http",
                "asgi": {"version": "3.0"},
                "http_version": "1.1",
                "method": method,
                "scheme": "http",
                "path": path,
                "raw_path": path.encode(),
                "query_string": query.encode(),
                "headers": headers,
                "client": writer.get_extra_info("peername"),
                "server": (host, port),
            }

            async def receive() -> dict[str, Any]:
                return {"type": "http.request", "body": body, "more_body": False}

            async def send(message: dict[str, Any]) -> None:
                if message["type"] == "http.response.start":
                    writer.write(f"HTTP/1.1 {message['status']} \r\n".encode())
                    for name, value in message.get("headers", []):
                        writer.write(name + b": " + value + b"\r\n")
                    writer.write(b"connection: close\r\n\r\n")
                elif message["type"] == "http.response.body":
                    writer.write(message.get("body", b""))

            await asgi(scope, receive, send)  # type: ignore[arg-type]
            await writer.drain()
        except (asyncio.IncompleteReadError, ValueError, ConnectionError) as error:
            log.info("bad request: %r", error)
        finally:
            writer.close()

    server = await asyncio.start_server(handle, host, port)
    log.info("gateway on http://%s:%d", host, port)
    try:
        async with server:
            await server.serve_forever()
    finally:
        await startup.put({"type": "lifespan.shutdown"})
        await lifespan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(app, args.host, args.port))


if __name__ == "__main__":
    main()
