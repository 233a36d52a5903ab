"""A request id on every request, response and log line, so that a client's error report and the
server's log meet: the client sees the id (``X-Request-Id``, and in a 500's message), never the
internals; the log has both."""

from __future__ import annotations

import contextvars
import logging
import re
import uuid

from django.http import HttpRequest, HttpResponse
from django.utils.deprecation import MiddlewareMixin

HEADER = "X-Request-Id"
_ACCEPTED = re.compile(r"^[A-Za-z0-9._-]{8,64}$")  # a proxy's id is kept if it looks like one
current: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")


def request_id_of(request: HttpRequest) -> str:
    return getattr(request, "request_id", None) or current.get()


class RequestIdMiddleware(MiddlewareMixin):
    def process_request(self, request: HttpRequest) -> None:
        offered = request.headers.get(HEADER, "")
        request.request_id = offered if _ACCEPTED.match(offered) else uuid.uuid4().hex
        current.set(request.request_id)

    def process_response(self, request: HttpRequest, response: HttpResponse) -> HttpResponse:
        response.headers.setdefault(HEADER, request_id_of(request))
        return response


class RequestIdFilter(logging.Filter):
    """Adds ``request_id`` to every record (``-`` outside a request)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = current.get()
        return True
