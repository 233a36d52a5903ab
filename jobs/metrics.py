"""A Celery worker's metrics: the exporter its operator scrapes, and the task hooks.

``celery worker`` is a main process and pool processes (forked) that run the tasks; the metrics
are recorded in the pool processes. So a worker takes a fresh folder of its own for
prometheus_client's multi-process mode (under PROMETHEUS_MULTIPROC_DIR when that is set, else
under the system's temporary folder) as soon as its app module is imported (``jobs/celery.py``
calls :func:`take_a_metrics_folder`: Celery's Django fixup runs Django's checks, which import
the URLconf and with it prometheus_client, before any worker signal), and, with
TUNEPLEX_WORKER_METRICS_PORT set, serves ``GET /metrics`` (and ``/healthz``) from its main
process once it starts (``celeryd_init``): the sum over its pool processes, past and present. A pool process that ends drops its live gauges; the folder is
removed when the worker stops. Nothing is shared with other workers or web processes, so any
number of them may run on one host or in one pod.

Task hooks: time from sending to start per queue (every message is stamped when it is published)
and tasks run by name and outcome.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from celery.signals import (
    before_task_publish,
    celeryd_init,
    task_postrun,
    task_prerun,
    worker_process_shutdown,
    worker_shutdown,
)

log = logging.getLogger(__name__)
SENT_AT_HEADER = "tuneplex_sent_at"
_private_dir: str | None = None


def _launched_as_worker() -> bool:
    """``celery ... worker ...`` (or ``python -m celery ... worker``), not beat, not the web."""
    program = Path(sys.argv[0]) if sys.argv else Path()
    celery = program.name == "celery" or program.parent.name == "celery"  # python -m celery
    return celery and "worker" in sys.argv[1:]


def take_a_metrics_folder() -> None:
    """In a worker's main process, before prometheus_client is first imported: a private
    multi-process folder, inherited by the pool processes."""
    global _private_dir
    if not _launched_as_worker() or _private_dir is not None:
        return
    if "prometheus_client" in sys.modules:  # too late to switch modes: say so, do not half-work
        log.warning("prometheus_client was imported before the worker started; "
                    "the pool processes' metrics will not be exported")
        return
    parent = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None
    if parent:
        os.makedirs(parent, exist_ok=True)
    _private_dir = tempfile.mkdtemp(prefix=f"celery-{os.getpid()}-", dir=parent)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = _private_dir


@celeryd_init.connect
def _serve_metrics(**kwargs) -> None:
    from django.conf import settings

    if _private_dir is None:
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


@worker_process_shutdown.connect
def _pool_process_ended(pid=None, **kwargs) -> None:
    from tuneplex.core import metrics

    metrics.forget_process(pid or os.getpid())


@worker_shutdown.connect
def _remove_the_folder(**kwargs) -> None:
    if _private_dir is not None:
        shutil.rmtree(_private_dir, ignore_errors=True)


@before_task_publish.connect
def _stamp(headers=None, **kwargs) -> None:
    """Every message, whoever sends it (the platform, tasks, beat): when it was sent."""
    if headers is not None:
        headers[SENT_AT_HEADER] = time.time()


@task_prerun.connect
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


@task_postrun.connect
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
