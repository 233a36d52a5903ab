"""The inference fast path: key-authenticated completion requests skip Django's request cycle.

Mounted in tuneplex.asgi in front of Django (behind the body-size guard). A POST to
/v1/chat/completions or /v1/completions that carries an ``Authorization`` header is admitted and
answered by :func:`tuneplex.inference.gateway.complete` straight from the ASGI scope: the same
checks, the same answers, without the middleware stack, which costs more than the rest of the
gateway on small machines. Everything else (browser sessions, other methods, other paths) goes
to Django unchanged.
"""

from __future__ import annotations

import asyncio
import json
import logging

from tuneplex.core.errors import error_body
from tuneplex.inference.gateway import CHAT, COMPLETIONS, Reply, complete

log = logging.getLogger(__name__)

PATHS = {"/v1/chat/completions": CHAT, "/v1/completions": COMPLETIONS}


class InferenceFastPath:
    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        endpoint = PATHS.get(scope.get("path", "")) if scope["type"] == "http" else None
        if endpoint is None or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        authorization = next((v for k, v in scope["headers"] if k == b"authorization"), None)
        if authorization is None:
            return await self.app(scope, receive, send)
        raw, disconnected = await _read_body(receive)
        if disconnected:
            return
        try:
            reply = await complete(endpoint, authorization=authorization.decode("latin-1"), raw=raw)
        except Exception:  # what Django's handler500 does for its views: log, answer in our shape
            log.exception("inference request failed")
            reply = Reply(500, {"Content-Type": "application/json"}, json.dumps(error_body(
                "server_error", "Internal error; it has been logged.")).encode())
        headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in reply.headers.items()]
        if reply.stream is None:
            headers.append((b"content-length", str(len(reply.body)).encode()))
            await send({"type": "http.response.start", "status": reply.status, "headers": headers})
            await send({"type": "http.response.body", "body": reply.body})
            return
        await send({"type": "http.response.start", "status": reply.status, "headers": headers})
        await _stream(reply.stream, receive, send)


async def _read_body(receive) -> tuple[bytes, bool]:
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return b"", True
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(chunks), False


async def _stream(events, receive, send) -> None:
    """Send the events; stop (and so abort the engine's work) when the client goes away."""
    async def watch() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(watch())
    try:
        async for chunk in events:
            if watcher.done():
                break
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        else:
            await send({"type": "http.response.body", "body": b""})
    finally:
        watcher.cancel()
        await events.aclose()
