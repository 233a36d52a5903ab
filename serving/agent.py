"""The pool agent's HTTP interface: how gateways on any node lease adapters on this replica.

A small threaded HTTP server (the standard library's: a lease is taken once per gateway and
adapter, not per request, so it is far from any hot path) in front of :class:`ReplicaPool`.
Every endpoint but ``/healthz`` requires the install's engine API key.

    GET  /metrics                  Prometheus metrics of this replica (when the process serves
                                   them: ``metrics`` decides who may read them and renders them)
    GET  /v1/state                 ready, slots, loaded/leased/pinned adapters, the engine's URL
    POST /v1/leases                {"adapter", "adapter_id", "holder", "wait"?} -> {"lease"}; 409 when
                                   every slot stays pinned or leased, 503 engine down, 422 refused
    POST /v1/leases/renew          {"leases": [...]} -> {"unknown": [...]}
    POST /v1/leases/release        {"leases": [...]}
    POST /v1/adapters/stage        {"adapter", "adapter_id"}: stage and validate only (a deploy
                                   while every slot is leased; it loads on first use)
    POST /v1/adapters/unload       {"adapter"}: undeployed (unloaded at its last release)
    POST /v1/reconcile             follow the deployed set now (after a deploy elsewhere)
"""

from __future__ import annotations

import hmac
import json
import logging
import threading
from collections.abc import Callable
from typing import Protocol
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx

from serving.pool import AdapterLoadError, EngineDown, ReplicaPool, SlotsBusy

log = logging.getLogger(__name__)


class MetricsExporter(Protocol):
    def allowed(self, client_address: str, authorization: str | None, *, proxied: bool) -> bool: ...

    def render(self) -> tuple[bytes, str]: ...  # (body, content type)


class AgentServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], *, pool: ReplicaPool, api_key: str,
                 engine_url: str, model: str, reconcile: Callable[[], dict],
                 metrics: MetricsExporter | None = None) -> None:
        super().__init__(address, _Handler)
        self.pool = pool
        self.api_key = api_key
        self.engine_url = engine_url
        self.model = model
        self.reconcile = reconcile
        self.metrics = metrics

    def serve_in_thread(self) -> threading.Thread:
        thread = threading.Thread(target=self.serve_forever, name="pool-agent", daemon=True)
        thread.start()
        return thread


class _Handler(BaseHTTPRequestHandler):
    server: AgentServer
    protocol_version = "HTTP/1.1"
    # The reply goes out as two writes (headers, then body); with Nagle's algorithm on a kept-alive
    # connection the body waits for the client's delayed ACK: 44-48 ms per lease, measured, against
    # 0.9 ms with TCP_NODELAY.
    disable_nagle_algorithm = True

    def log_message(self, format, *args):  # noqa: A002 - the base class's signature
        log.debug("agent: " + format, *args)

    def _reply(self, status: int, body: dict) -> None:
        self._send(status, json.dumps(body).encode(), "application/json")

    def _send(self, status: int, raw: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def _metrics(self) -> None:
        exporter = self.server.metrics
        if exporter is None:
            return self._error(404, "not_found", "No such endpoint.")
        if not exporter.allowed(self.client_address[0], self.headers.get("Authorization"),
                                proxied="X-Forwarded-For" in self.headers):
            return self._error(403, "permission_denied", "Metrics are served to the monitoring "
                               "network or with the metrics token.")
        return self._send(200, *exporter.render())

    def _error(self, status: int, code: str, message: str) -> None:
        self._reply(status, {"error": {"code": code, "message": message}})

    def _authorized(self) -> bool:
        given = self.headers.get("Authorization", "")
        expected = f"Bearer {self.server.api_key}"
        if self.server.api_key and not hmac.compare_digest(given.encode(), expected.encode()):
            self._error(401, "unauthorized", "The engine API key is required.")
            return False
        return True

    def do_GET(self):  # noqa: N802 - http.server's naming
        if self.path == "/healthz":
            return self._reply(200, {"status": "ok"})
        if self.path == "/metrics":
            return self._metrics()
        if not self._authorized():
            return None
        if self.path == "/v1/state":
            return self._reply(200, {**self.server.pool.state(), "model": self.server.model,
                                     "engine_url": self.server.engine_url})
        return self._error(404, "not_found", "No such endpoint.")

    def do_POST(self):  # noqa: N802
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b"{}"
        if not self._authorized():
            return None
        try:
            body = json.loads(raw)
        except ValueError:
            return self._error(400, "invalid_json", "The body is not JSON.")
        pool = self.server.pool
        try:
            if self.path == "/v1/leases":
                wait = body.get("wait")
                lease = pool.acquire(str(body["adapter"]), str(body["adapter_id"]),
                                     str(body.get("holder", "?")),
                                     wait=float(wait) if isinstance(wait, (int, float)) else None)
                return self._reply(200, {"lease": lease.id, "adapter": lease.adapter,
                                         "expires_in": pool.lease_seconds})
            if self.path == "/v1/leases/renew":
                return self._reply(200, {"unknown": pool.renew([str(x) for x in body["leases"]])})
            if self.path == "/v1/leases/release":
                pool.release([str(x) for x in body["leases"]])
                return self._reply(200, {})
            if self.path == "/v1/adapters/stage":
                pool.stage(str(body["adapter_id"]), str(body["adapter"]))
                return self._reply(200, {})
            if self.path == "/v1/adapters/unload":
                return self._reply(200, {"unloaded": pool.unload(str(body["adapter"]))})
            if self.path == "/v1/reconcile":
                return self._reply(200, self.server.reconcile())
        except KeyError as exc:
            return self._error(400, "missing_field", f"{exc.args[0]} is required.")
        except SlotsBusy as exc:
            return self._error(409, "slots_busy", str(exc))
        except EngineDown as exc:
            return self._error(503, "engine_down", str(exc))
        except AdapterLoadError as exc:
            return self._error(422, exc.code, str(exc))
        except httpx.HTTPError as exc:
            return self._error(503, "engine_down", f"the engine did not answer ({type(exc).__name__})")
        return self._error(404, "not_found", "No such endpoint.")
