"""The pool agent's HTTP interface: how gateways on any node lease adapters on this replica.

A small HTTP server from the standard library (a lease is taken once per gateway and adapter,
not per request, so it is far from any hot path) in front of :class:`ReplicaPool`. Every
endpoint but ``/healthz`` and the metrics requires the install's engine API key.

    GET  /metrics                  Prometheus metrics of this replica (when the process serves
                                   them: ``metrics`` decides who may read them and renders them)
    GET  /metrics/engine           vLLM's own metrics, read from the engine, with the series that
                                   name adapters removed (same access rule as /metrics)
    GET  /v1/state                 ready, slots, loaded/leased/pinned adapters, the engine's URL
    POST /v1/leases                {"adapter", "adapter_id", "holder", "wait"?} -> {"lease"}; 409 when
                                   every slot stays pinned or leased, 503 engine down, 422 refused
    POST /v1/leases/renew          {"leases": [...]} -> {"unknown": [...]}
    POST /v1/leases/release        {"leases": [...]}
    POST /v1/adapters/stage        {"adapter", "adapter_id"}: stage and validate only (a deploy
                                   while every slot is leased; it loads on first use)
    POST /v1/adapters/unload       {"adapter"}: undeployed (unloaded at its last release)
    POST /v1/reconcile             follow the deployed set now (after a deploy elsewhere)

It listens where the operator says (``run_engine --host``, loopback by default) and holds
nothing an unauthenticated caller can grow:

- The key is checked (in constant time) from the headers, before a byte of the body is read;
  a body longer than :data:`MAX_BODY` is refused (413) from its Content-Length, unread.
- A fixed pool of ``workers`` threads handles requests; while all are busy, further connections
  wait in the listen backlog. Each connection carries one request (the answer closes it), so an
  idle gateway's connection never holds a thread.
- A request must arrive whole, headers and body, within ``read_timeout`` seconds of its
  connection being taken up, however slowly its bytes trickle in, or the connection is cut.
"""

from __future__ import annotations

import hmac
import json
import logging
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Protocol

import httpx

from serving.engine import tenant_free_metrics
from serving.pool import AdapterLoadError, EngineDown, ReplicaPool, SlotsBusy

log = logging.getLogger(__name__)

MAX_BODY = 1 * 2**20  # a request lists lease ids at most: a megabyte is thousands of them


class MetricsExporter(Protocol):
    def allowed(self, client_address: str, authorization: str | None, *, proxied: bool) -> bool: ...

    def render(self) -> tuple[bytes, str]: ...  # (body, content type)


class ReadDeadlines:
    """Cuts the connections whose request has not arrived whole by its deadline: one thread for
    all of them. A per-read socket timeout would not do: a client sending a byte every few
    seconds never lets one read time out."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._due: dict[int, tuple[float, socket.socket]] = {}
        self._next = 0
        self._closed = False
        threading.Thread(target=self._run, name="pool-agent-deadlines", daemon=True).start()

    def start(self, connection: socket.socket, seconds: float) -> int:
        with self._changed:
            self._next += 1
            self._due[self._next] = (time.monotonic() + seconds, connection)
            self._changed.notify()
            return self._next

    def cancel(self, token: int) -> None:
        with self._changed:
            self._due.pop(token, None)

    def close(self) -> None:
        with self._changed:
            self._closed = True
            self._changed.notify()

    def _run(self) -> None:
        while True:
            with self._changed:
                if self._closed:
                    return
                now = time.monotonic()
                late = [token for token, (due, _) in self._due.items() if due <= now]
                expired = [self._due.pop(token)[1] for token in late]
                if not expired:
                    soonest = min((due for due, _ in self._due.values()), default=None)
                    self._changed.wait(None if soonest is None else soonest - now)
                    continue
            for connection in expired:  # outside the lock
                try:
                    connection.shutdown(socket.SHUT_RDWR)  # its blocked read returns at once
                except OSError:
                    pass  # already closed


class AgentServer(HTTPServer):
    request_queue_size = 128  # connections waiting for a worker

    def __init__(self, address: tuple[str, int], *, pool: ReplicaPool, api_key: str,
                 engine_url: str, model: str, reconcile: Callable[[], dict],
                 metrics: MetricsExporter | None = None, engine_metrics_url: str | None = None,
                 tls: ssl.SSLContext | None = None, workers: int = 32,
                 read_timeout: float = 10.0) -> None:
        if not api_key:
            raise ValueError("the pool agent needs the engine API key")
        super().__init__(address, _Handler)
        if tls is not None:
            # The handshake happens on a worker's first read, under the request's deadline, not
            # on the accepting thread.
            self.socket = tls.wrap_socket(self.socket, server_side=True,
                                          do_handshake_on_connect=False)
        self.pool = pool
        self.api_key = api_key
        self.engine_url = engine_url
        self.model = model
        self.reconcile = reconcile
        self.metrics = metrics
        self.engine_metrics_url = engine_metrics_url
        self.read_timeout = read_timeout
        self.deadlines = ReadDeadlines()
        self._free = threading.BoundedSemaphore(workers)
        self._workers = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="pool-agent")
        self._closing = False

    def state(self) -> dict:
        """What ``/v1/state`` answers and the fleet's entry of this replica holds."""
        return {**self.pool.state(), "model": self.model, "engine_url": self.engine_url}

    def serve_in_thread(self) -> threading.Thread:
        thread = threading.Thread(target=self.serve_forever, name="pool-agent", daemon=True)
        thread.start()
        return thread

    def process_request(self, request, client_address) -> None:
        # On the accepting thread: while every worker is busy, accept nothing more.
        while not self._free.acquire(timeout=0.5):
            if self._closing:
                self.shutdown_request(request)
                return
        try:
            self._workers.submit(self._work, request, client_address)
        except RuntimeError:  # the pool is shut down
            self._free.release()
            self.shutdown_request(request)

    def _work(self, request, client_address) -> None:
        try:
            self.finish_request(request, client_address)
        except Exception:  # noqa: BLE001 - socketserver's own rule: log it, keep serving
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)
            self._free.release()

    def handle_error(self, request, client_address) -> None:
        # A client that hung up, was cut off or failed the TLS handshake is routine, and one line
        # at most: a flood of them must not flood the log.
        error = sys.exc_info()[1]
        if isinstance(error, OSError):
            log.debug("agent: connection from %s ended: %r", client_address[0], error)
        else:
            log.exception("agent: request from %s failed", client_address[0])

    def shutdown(self) -> None:
        self._closing = True
        super().shutdown()

    def server_close(self) -> None:
        super().server_close()
        self._workers.shutdown(wait=False, cancel_futures=True)
        self.deadlines.close()


class _Handler(BaseHTTPRequestHandler):
    server: AgentServer
    protocol_version = "HTTP/1.1"
    # The reply goes out as two writes (headers, then body); with Nagle's algorithm the body
    # waits for the client's delayed ACK: 44-48 ms per lease, measured, against 0.9 ms with
    # TCP_NODELAY.
    disable_nagle_algorithm = True
    timeout = 30  # seconds for any one read or write (the deadline bounds the whole request)

    def setup(self) -> None:
        super().setup()
        self._deadline = self.server.deadlines.start(self.connection, self.server.read_timeout)

    def handle(self) -> None:
        self.close_connection = True
        self.handle_one_request()  # one request per connection (see AgentServer)

    def finish(self) -> None:
        self.server.deadlines.cancel(self._deadline)
        super().finish()

    def log_message(self, format, *args):
        log.debug("agent: " + format, *args)

    def _reply(self, status: int, body: dict) -> None:
        self._send(status, json.dumps(body).encode(), "application/json")

    def _send(self, status: int, raw: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(raw)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(raw)

    def _may_scrape(self) -> bool:
        exporter = self.server.metrics
        if exporter is None:
            self._error(404, "not_found", "No such endpoint.")
            return False
        if not exporter.allowed(self.client_address[0], self.headers.get("Authorization"),
                                proxied="X-Forwarded-For" in self.headers):
            self._error(403, "permission_denied", "Metrics are served to the monitoring "
                        "network or with the metrics token.")
            return False
        return True

    def _metrics(self) -> None:
        if self._may_scrape():
            self._send(200, *self.server.metrics.render())

    def _engine_metrics(self) -> None:
        if self.server.engine_metrics_url is None:
            return self._error(404, "not_found", "No such endpoint.")
        if not self._may_scrape():
            return None
        try:
            response = httpx.get(self.server.engine_metrics_url, timeout=5)
            response.raise_for_status()
        except httpx.HTTPError as exc:
            return self._error(503, "engine_down", f"the engine did not answer ({type(exc).__name__})")
        return self._send(200, tenant_free_metrics(response.text).encode(),
                          response.headers.get("Content-Type", "text/plain; version=0.0.4"))

    def _error(self, status: int, code: str, message: str) -> None:
        self._reply(status, {"error": {"code": code, "message": message}})

    def _authorized(self) -> bool:
        given = self.headers.get("Authorization", "")
        expected = f"Bearer {self.server.api_key}"
        if not hmac.compare_digest(given.encode(), expected.encode()):
            self._error(401, "unauthorized", "The engine API key is required.")
            return False
        return True

    def _admit_body(self) -> int | None:
        """What the headers say, checked before any of the body is read: the key, then the
        length. The body's length, or None once the refusal has been sent."""
        if not self._authorized():
            return None
        if "Transfer-Encoding" in self.headers:
            self._error(411, "length_required", "Send the body with a Content-Length.")
            return None
        declared = self.headers.get("Content-Length", "0").strip()
        if not declared.isdigit():
            self._error(400, "invalid_content_length", "Content-Length is not a number.")
            return None
        if int(declared) > MAX_BODY:
            self._error(413, "body_too_large", f"The body is larger than {MAX_BODY} bytes.")
            return None
        return int(declared)

    def handle_expect_100(self) -> bool:
        # A client that asks before sending its body is refused before sending it.
        if self.command == "POST" and self._admit_body() is None:
            return False
        return super().handle_expect_100()

    def _request_in(self) -> None:
        """The whole request has been read: what follows (a lease may wait for a slot) has no
        deadline."""
        self.server.deadlines.cancel(self._deadline)

    def do_GET(self):
        self._request_in()
        if self.path == "/healthz":
            return self._reply(200, {"status": "ok"})
        if self.path == "/metrics":
            return self._metrics()
        if self.path == "/metrics/engine":
            return self._engine_metrics()
        if not self._authorized():
            return None
        if self.path == "/v1/state":
            return self._reply(200, self.server.state())
        return self._error(404, "not_found", "No such endpoint.")

    def do_POST(self):
        length = self._admit_body()
        if length is None:
            return None
        raw = self.rfile.read(length) if length else b"{}"
        if len(raw) < length:  # cut off at its deadline, or the client gave up
            return None
        self._request_in()
        try:
            body = json.loads(raw)
        except ValueError:
            return self._error(400, "invalid_json", "The body is not JSON.")
        if not isinstance(body, dict):
            return self._error(400, "invalid_json", "The body is not a JSON object.")
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
        except TypeError:  # e.g. "leases" that is not a list
            return self._error(400, "invalid_field", "A field has the wrong type.")
        except SlotsBusy as exc:
            return self._error(409, "slots_busy", str(exc))
        except EngineDown as exc:
            return self._error(503, "engine_down", str(exc))
        except AdapterLoadError as exc:
            return self._error(422, exc.code, str(exc))
        except httpx.HTTPError as exc:
            return self._error(503, "engine_down", f"the engine did not answer ({type(exc).__name__})")
        return self._error(404, "not_found", "No such endpoint.")
