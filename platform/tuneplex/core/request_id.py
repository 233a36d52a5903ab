"""A request id on every request, response and log line, so that a client's error report and the
server's log meet: the client sees the id (``X-Request-Id`` on every response, and
``request_id`` in every error body), never the internals; the log has both.

The id is given at the outermost ASGI layer (``tuneplex.core.asgi_request_id``), so the answers
made before Django (the inference fast path, the body-size guard, /metrics) carry it too;
Django's middleware takes it from there, or gives one itself under WSGI and the test client.
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


def kept_or_new(offered: str) -> str:
    """The id a client (a proxy) offered if it looks like one, else a new one."""
    return offered if _ACCEPTED.match(offered) else uuid.uuid4().hex


class RequestIdMiddleware(MiddlewareMixin):
    def process_request(self, request: HttpRequest) -> None:
        given = getattr(request, "scope", {}).get(SCOPE_KEY)  # given at the ASGI layer
        request.request_id = given or kept_or_new(request.headers.get(HEADER, ""))
        current.set(request.request_id)

    def process_response(self, request: HttpRequest, response: HttpResponse) -> HttpResponse:
        response.headers.setdefault(HEADER, request_id_of(request))
        return response


class RequestIdFilter(logging.Filter):
    """Adds ``request_id`` to every record (``-`` outside a request)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = current.get()
        return True
