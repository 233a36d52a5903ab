"""A request id on every request, response and log line, so that a client's error report and the
server's log meet: the client sees the id (``X-Request-Id`` on every response, and
``request_id`` in every error body), never the internals; the log has both.

The id is given at the ASGI layer (:class:`RequestIdAsgi`, outermost), so the answers made before
Django (the inference fast path, the body-size guard, /metrics) carry it too; Django's
middleware takes it from there, or gives one itself under WSGI and the test client.
"""

from __future__ import annotations

import contextvars
import logging
import re
import uuid

from django.http import HttpRequest, HttpResponse
from django.utils.deprecation import MiddlewareMixin

HEADER = "X-Request-Id"
SCOPE_KEY = "tuneplex.request_id"
_ACCEPTED = re.compile(r"^[A-Za-z0-9._-]{8,64}$")  # a proxy's id is kept if it looks like one
current: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")


def request_id_of(request: HttpRequest) -> str:
    return getattr(request, "request_id", None) or current.get()


def _kept_or_new(offered: str) -> str:
    return offered if _ACCEPTED.match(offered) else uuid.uuid4().hex


class RequestIdAsgi:
    """Gives each HTTP request its id (the context of everything that serves it: log lines,
    error bodies) and puts it on the response's headers unless the app already did."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        offered = next((v for k, v in scope["headers"] if k == b"x-request-id"), b"")
        request_id = _kept_or_new(offered.decode("latin-1"))
        scope = {**scope, SCOPE_KEY: request_id}
        current.set(request_id)  # this request's task only: each has its own context
        header = (b"x-request-id", request_id.encode())

        async def send_with_id(message):
            if message["type"] == "http.response.start" and not any(
                    k.lower() == b"x-request-id" for k, _ in message.get("headers", ())):
                message = {**message, "headers": [*message.get("headers", ()), header]}
            await send(message)

        return await self.app(scope, receive, send_with_id)


class RequestIdMiddleware(MiddlewareMixin):
    def process_request(self, request: HttpRequest) -> None:
        given = getattr(request, "scope", {}).get(SCOPE_KEY)  # by RequestIdAsgi
        request.request_id = given or _kept_or_new(request.headers.get(HEADER, ""))
        current.set(request.request_id)

    def process_response(self, request: HttpRequest, response: HttpResponse) -> HttpResponse:
        response.headers.setdefault(HEADER, request_id_of(request))
        return response


class RequestIdFilter(logging.Filter):
    """Adds ``request_id`` to every record (``-`` outside a request)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = current.get()
        return True
