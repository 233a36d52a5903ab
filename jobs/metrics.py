"""A Celery worker's metrics folder, and the stamp on every message it or anyone sends.

``celery worker`` is a main process and pool processes (forked) that run the tasks; the metrics
are recorded in the pool processes. So a worker takes a fresh folder of its own for
prometheus_client's multi-process mode (under PROMETHEUS_MULTIPROC_DIR when that is set, else
under the system's temporary folder) as soon as its app module is imported (``jobs/celery.py``
calls :func:`take_a_metrics_folder`: Celery's Django fixup runs Django's checks, which import
the URLconf and with it prometheus_client, before any worker signal); the folder is removed
when the worker stops. Nothing is shared with other workers or web processes, so any number of
them may run on one host or in one pod.

What is recorded there, and the exporter that serves it (TUNEPLEX_WORKER_METRICS_PORT), are the
platform's: ``tuneplex.operations.worker_metrics``, whose Celery signal hooks the platform
connects itself when Django starts. Nothing here imports the platform.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from celery.signals import before_task_publish, worker_shutdown

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


def has_a_metrics_folder() -> bool:
    """Whether this worker took a folder of its own (its pool processes' metrics add up there)."""
    return _private_dir is not None


@worker_shutdown.connect
def _remove_the_folder(**kwargs) -> None:
    if _private_dir is not None:
        shutil.rmtree(_private_dir, ignore_errors=True)


@before_task_publish.connect
def _stamp(headers=None, **kwargs) -> None:
    """Every message, whoever sends it (the platform, tasks, beat): when it was sent."""
    if headers is not None:
        headers[SENT_AT_HEADER] = time.time()
