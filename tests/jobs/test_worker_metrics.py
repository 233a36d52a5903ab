"""A real Celery worker records its tasks with the platform's hooks and serves them on its own
exporter (the hooks live in tuneplex.operations.worker_metrics; jobs/ imports no platform)."""

from __future__ import annotations

import os
import uuid

import httpx

from jobs.celery import app
from tests.conftest import WorkerProcess, free_port, wait_for
from tests.metrics import scrape
from tuneplex.core.worker_ping import ping_answered


def test_a_worker_exports_the_tasks_it_ran_and_their_wait(test_database_url):
    # A queue of its own: another test's worker on the default queue must not take the ping.
    own_queue = f"metrics-test-{os.getpid()}"
    port = free_port()
    worker = WorkerProcess(queues=own_queue, database_url=test_database_url, name="metrics",
                           extra_env={"TUNEPLEX_WORKER_METRICS_PORT": str(port)})
    try:
        url = f"http://127.0.0.1:{port}/metrics"
        assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10).status_code == 200
        before = scrape(url)
        token = uuid.uuid4().hex
        app.send_task("tuneplex.ping", args=[token], queue=own_queue)
        assert wait_for(lambda: ping_answered(token), timeout=60, message="the ping's answer")

        def ran() -> float:
            return scrape(url).before("tuneplex_celery_tasks_total", task="tuneplex.ping",
                                      outcome="succeeded")

        wait_for(lambda: ran() == before.before("tuneplex_celery_tasks_total",
                                                task="tuneplex.ping", outcome="succeeded") + 1,
                 timeout=30, message="the task counted")
        after = scrape(url)
        # Sent by this process, started by the worker: the stamp crossed the broker.
        assert (after.value("tuneplex_queue_wait_seconds_count", queue=own_queue)
                == before.before("tuneplex_queue_wait_seconds_count", queue=own_queue) + 1)
        refused = httpx.get(url, headers={"X-Forwarded-For": "203.0.113.9"}, timeout=10)
        assert refused.status_code == 403 and "tuneplex_" not in refused.text
    finally:
        worker.stop()
