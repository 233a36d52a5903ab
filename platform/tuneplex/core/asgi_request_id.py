"""The outermost ASGI layer: each HTTP request gets its id here (``tuneplex.core.request_id``).

Set before anything else runs, the id is in the context of everything that serves the request
(log lines, error bodies), and on the response's headers also when the answer is made before
Django (the inference fast path, the body-size guard, /metrics). An exception that escapes
every layer below is logged with the id and answered in the API's error shape; uvicorn's own
answer would be a bare text 500 without it.
"""

from __future__ import annotations

import json
import logging

from tuneplex.core.errors import server_error_body
from tuneplex.core.request_id import SCOPE_KEY, current, kept_or_new

log = logging.getLogger(__name__)


class RequestIdAsgi:
    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        offered = next((v for k, v in scope["headers"] if k == b"x-request-id"), b"")
        request_id = kept_or_new(offered.decode("latin-1"))
        scope = {**scope, SCOPE_KEY: request_id}
        current.set(request_id)  # this request's task only: each has its own context
        header = (b"x-request-id", request_id.encode())
        started = False

        async def send_with_id(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                if not any(k.lower() == b"x-request-id" for k, _ in message.get("headers", ())):
                    message = {**message, "headers": [*message.get("headers", ()), header]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            if started:
                raise  # the answer is under way: the server ends the connection
            log.exception("unhandled error in %s %s", scope["method"], scope["path"])
            body = json.dumps(server_error_body()).encode()
            await send({"type": "http.response.start", "status": 500, "headers": [
                (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                header]})
            await send({"type": "http.response.body", "body": body})
