"""A Celery worker's metrics, on the platform's side: the task hooks that record them, and the
exporter its operator scrapes.

Connected by :class:`tuneplex.operations.apps.OperationsConfig` when Django starts, which in a
worker is before any worker signal (Celery's Django fixup sets Django up as the worker loads its
task modules); the worker's own metrics folder is ``jobs/metrics.py``'s. With
TUNEPLEX_WORKER_METRICS_PORT set, the worker's main process serves ``GET /metrics`` (and
``/healthz``) once it starts (``celeryd_init``): the sum over its pool processes, past and
present. A pool process that ends drops its live gauges.

Task hooks: time from sending to start per queue (every message is stamped when it is published,
``jobs.metrics.SENT_AT_HEADER``) and tasks run by name and outcome.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from celery.signals import celeryd_init, task_postrun, task_prerun, worker_process_shutdown
from django.conf import settings

from jobs.metrics import SENT_AT_HEADER, has_a_metrics_folder

log = logging.getLogger(__name__)


def connect() -> None:
    """Connect the hooks (once, whatever the number of calls)."""
    celeryd_init.connect(_serve_metrics, dispatch_uid="tuneplex.operations.worker_metrics.serve")
    worker_process_shutdown.connect(_pool_process_ended,
                                    dispatch_uid="tuneplex.operations.worker_metrics.ended")
    task_prerun.connect(_started, dispatch_uid="tuneplex.operations.worker_metrics.started")
    task_postrun.connect(_ended, dispatch_uid="tuneplex.operations.worker_metrics.task_ended")


def _serve_metrics(**kwargs) -> None:
    if not has_a_metrics_folder():
        log.warning("no metrics folder of this worker's own: its pool processes' metrics are "
                    "not exported")
        return
    if settings.WORKER_METRICS_PORT:
        server = ThreadingHTTPServer((settings.WORKER_METRICS_HOST, settings.WORKER_METRICS_PORT),
                                     _Handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, name="metrics-exporter", daemon=True).start()
        log.info("metrics exporter on http://%s:%s/metrics", settings.WORKER_METRICS_HOST,
                 server.server_address[1])


def _pool_process_ended(pid=None, **kwargs) -> None:
    from tuneplex.core import metrics

    metrics.forget_process(pid or os.getpid())


def _started(task=None, **kwargs) -> None:
    sent_at = _header(task, SENT_AT_HEADER)
    queue = (getattr(task.request, "delivery_info", None) or {}).get("routing_key")
    if sent_at is None or not queue:
        return
    from tuneplex.core import metrics

    try:
        metrics.QUEUE_WAIT.labels(queue).observe(max(0.0, time.time() - float(sent_at)))
    except (TypeError, ValueError):
        pass


def _ended(task=None, state=None, **kwargs) -> None:
    from tuneplex.core import metrics

    metrics.TASKS.labels(task.name, "succeeded" if state == "SUCCESS" else "failed").inc()


def _header(task, name: str):
    request = task.request
    value = getattr(request, name, None)
    if value is None:
        value = (getattr(request, "headers", None) or {}).get(name)
    return value


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # noqa: A002 - the base class's signature
        log.debug("metrics exporter: " + format, *args)

    def do_GET(self):  # noqa: N802 - http.server's naming
        from tuneplex.core import metrics

        if self.path == "/healthz":  # the container's health check: this worker is up
            return self._send(200, b'{"status": "ok"}', "application/json")
        if self.path.split("?")[0] != "/metrics":
            return self._send(404, b'{"error": {"code": "not_found", "message": "No such '
                              b'endpoint.", "param": null}}', "application/json")
        if not metrics.may_scrape(self.client_address[0], self.headers.get("Authorization"),
                                  proxied="X-Forwarded-For" in self.headers):
            return self._send(403, metrics.REFUSED, "application/json")
        return self._send(200, metrics.recorded(), metrics.CONTENT_TYPE)

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
