"""``GET /metrics`` at the ASGI layer, in front of Django.

Served before Django so that a scrape by address (Prometheus reaches a pod by its IP, which is
not in ALLOWED_HOSTS) works, skips the middleware stack, and is never redirected to HTTPS.
Access: ``tuneplex.core.metrics.may_scrape`` (the monitoring networks, or the metrics token).
"""

from __future__ import annotations

import json
import logging

from asgiref.sync import sync_to_async

from tuneplex.core import metrics
from tuneplex.core.errors import error_body

log = logging.getLogger(__name__)


def _scrape() -> bytes:
    from tuneplex.operations.metrics_state import PlatformStateCollector

    return metrics.exposition(PlatformStateCollector())


class MetricsEndpoint:
    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] != "/metrics":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        authorization = headers.get(b"authorization")
        client = scope.get("client")
        if scope["method"] not in ("GET", "HEAD"):
            return await _refuse(send, 405, "method_not_allowed", "Use GET.")
        if not metrics.may_scrape(client[0] if client else None,
                                  authorization.decode("latin-1") if authorization else None,
                                  proxied=b"x-forwarded-for" in headers):
            log.warning("refused a metrics scrape from %s", client[0] if client else "?")
            return await _refuse(send, 403, "permission_denied", metrics.REFUSED_MESSAGE)
        body = await sync_to_async(_scrape)()
        await _answer(send, 200, b"" if scope["method"] == "HEAD" else body, metrics.CONTENT_TYPE)


async def _refuse(send, status: int, code: str, message: str) -> None:
    await _answer(send, status, json.dumps(error_body(code, message)).encode(), "application/json")


async def _answer(send, status: int, body: bytes, content_type: str) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", content_type.encode()),
                            (b"content-length", str(len(body)).encode()),
                            (b"cache-control", b"no-store")]})
    await send({"type": "http.response.body", "body": body})
