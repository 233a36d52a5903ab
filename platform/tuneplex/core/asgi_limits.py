"""Refuse oversized request bodies at the ASGI layer, before Django spools them to disk.

Django's ASGI handler reads the whole body before any middleware runs, so a 5 GB upload to a
512 MiB limit would be written out in full just to be refused. This wrapper answers 413 from the
Content-Length header at once, and stops a body sent without one as soon as it passes the limit.
"""

from __future__ import annotations

import json

from tuneplex.core.middleware import body_limit, too_large


class BodyLimitMiddleware:
    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            return await self.app(scope, receive, send)
        limit, explanation = body_limit(scope["path"])
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await _reject(send, int(declared), explanation)
        received = 0

        async def counting_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise _BodyTooLarge(received)
            return message

        try:
            return await self.app(scope, counting_receive, send)
        except _BodyTooLarge as exc:
            return await _reject(send, exc.size, explanation)


class _BodyTooLarge(Exception):
    def __init__(self, size: int) -> None:
        self.size = size


async def _reject(send, size: int, explanation: str) -> None:
    body = json.dumps(too_large(size, explanation)).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})
