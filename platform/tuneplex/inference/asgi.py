"""The inference fast path: key-authenticated completion requests skip Django's request cycle.

Mounted in tuneplex.asgi in front of Django (behind the body-size guard). A POST to
/v1/chat/completions, /v1/completions or /v1/responses that carries an ``Authorization`` header is admitted and
answered by :func:`tuneplex.inference.gateway.complete` straight from the ASGI scope: the same
checks, the same answers, without the middleware stack, which costs more than the rest of the
gateway on small machines. Everything else (browser sessions, other methods, other paths) goes
to Django unchanged.
"""

from __future__ import annotations

import asyncio
import json
import logging

from tuneplex.core.errors import server_error_body
from tuneplex.inference.gateway import CHAT, COMPLETIONS, RESPONSES, Reply, complete

log = logging.getLogger(__name__)

PATHS = {"/v1/chat/completions": CHAT, "/v1/completions": COMPLETIONS, "/v1/responses": RESPONSES}


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
        # Watch for the client leaving for as long as the request lasts: cancelling the work
        # closes the connection to the engine, and vLLM aborts the request (frees its slot in
        # the batch) when its client goes away.
        gone = asyncio.ensure_future(_disconnected(receive))
        try:
            await self._answer(scope, authorization, endpoint, raw, gone, send)
        finally:
            gone.cancel()

    async def _answer(self, scope, authorization: bytes, endpoint: str, raw: bytes, gone, send) -> None:
        client = scope.get("client")
        work = asyncio.ensure_future(complete(endpoint, authorization=authorization.decode("latin-1"),
                                              raw=raw, address=client[0] if client else None))
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        if not work.done():
            work.cancel()  # gone before the answer began
            await asyncio.gather(work, return_exceptions=True)
            return
        try:
            reply = work.result()
        except Exception:  # what Django's handler500 does for its views: log, answer in our shape
            log.exception("inference request failed")
            reply = Reply(500, {"Content-Type": "application/json"},
                          json.dumps(server_error_body()).encode())
        headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in reply.headers.items()]
        if reply.stream is None:
            headers.append((b"content-length", str(len(reply.body)).encode()))
            await send({"type": "http.response.start", "status": reply.status, "headers": headers})
            await send({"type": "http.response.body", "body": reply.body})
            return
        await send({"type": "http.response.start", "status": reply.status, "headers": headers})
        await _stream(reply.stream, gone, send)


async def _read_body(receive) -> tuple[bytes, bool]:
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return b"", True
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(chunks), False


async def _disconnected(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _stream(events, gone, send) -> None:
    """Send the events; stop (and so abort the engine's work) as soon as the client goes away,
    also while the engine has not produced the next event yet."""
    async def pump() -> None:
        async for chunk in events:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    pumping = asyncio.ensure_future(pump())
    gone.add_done_callback(lambda _: pumping.cancel())
    try:
        await pumping
    except asyncio.CancelledError:
        if not gone.done() or gone.cancelled():
            raise  # we were cancelled, not the client gone
    finally:
        await events.aclose()
