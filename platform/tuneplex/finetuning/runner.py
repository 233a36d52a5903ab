"""Runs one claimed job on this worker: the trainer as a child process in its own environment.

The worker process streams the trainer's JSON lines into events, metrics and checkpoints; a
heartbeat thread keeps the job row alive, turns a cancel request into SIGTERM, and stops the
trainer if this worker's Celery parent disappears. The trainer is also tied to this process with
PR_SET_PDEATHSIG, so a killed worker never leaves a training process behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db import close_old_connections

from jobs.training.layout import latest_checkpoint
from tuneplex.files.models import File
from tuneplex.files.services import local_copy
from tuneplex.finetuning import scheduler
from tuneplex.finetuning.models import FineTuningJob
from tuneplex.finetuning.services import (
    job_event,
    job_fail,
    job_mark_cancelled,
    job_record_checkpoint,
    job_record_metrics,
    job_succeed,
)

log = logging.getLogger(__name__)
PR_SET_PDEATHSIG = 1
CANCEL_GRACE_SECONDS = 30


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass


def job_work_dir(job: FineTuningJob) -> Path:
    return settings.WORK_DIR / job.id


def run_job(job_id: str) -> str:
    """Claim and train; returns the final status or 'skipped' if the claim failed."""
    worker = worker_name()
    job = scheduler.claim(job_id=job_id, worker=worker)
    if job is None:
        log.info("job %s not claimable (already taken, cancelled or gone)", job_id)
        return "skipped"
    try:
        return _run_claimed(job, worker)
    except Exception as exc:  # noqa: BLE001 - the job row must never stay "running"
        log.exception("job %s crashed in the worker", job_id)
        job_fail(job=job, code="worker_error", message=f"{exc.__class__.__name__}: {exc}"[:1000])
        return "failed"


def _files(job: FineTuningJob) -> tuple[File, File | None]:
    train = File.objects.get(organization=job.organization_id, id=job.training_file)
    validation = (File.objects.get(organization=job.organization_id, id=job.validation_file)
                  if job.validation_file else None)
    return train, validation


def _run_claimed(job: FineTuningJob, worker: str) -> str:
    work = job_work_dir(job)
    work.mkdir(parents=True, exist_ok=True)
    train_file, validation_file = _files(job)
    resume = latest_checkpoint(work / "checkpoints")
    with contextlib.ExitStack() as files:
        train_path = files.enter_context(local_copy(train_file.blob_name))
        validation_path = (files.enter_context(local_copy(validation_file.blob_name))
                           if validation_file else None)
        config = {**job.config, "base_model_dir": job.base_model.directory,
                  "train_file": str(train_path), "output_dir": str(work),
                  "validation_file": str(validation_path) if validation_path else None,
                  "device": settings.TRAINING_DEVICE,
                  "resume_from": str(resume) if resume else None}
        config_path = work / "config.json"
        config_path.write_text(json.dumps(config, indent=1))
        return _supervise(job, worker, config_path, work)


def _supervise(job: FineTuningJob, worker: str, config_path: Path, work: Path) -> str:
    environ = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HF_HUB_OFFLINE": "1",
               "HOME": str(work), "PYTHONUNBUFFERED": "1"}
    for passthrough in ("CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS", "LD_LIBRARY_PATH"):
        if passthrough in os.environ:
            environ[passthrough] = os.environ[passthrough]
    stderr_log = (work / "trainer.log").open("ab")
    process = subprocess.Popen(
        [str(settings.TRAINER_PYTHON), "-m", "jobs.training.run", str(config_path)],
        cwd=settings.REPO_DIR, env=environ, stdout=subprocess.PIPE, stderr=stderr_log,
        preexec_fn=_die_with_parent)
    stop = threading.Event()
    keeper = threading.Thread(target=_keep_alive, args=(job.id, worker, process, stop),
                              name=f"heartbeat-{job.id}", daemon=True)
    keeper.start()
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    try:
        assert process.stdout is not None
        for raw in process.stdout:
            try:
                message = json.loads(raw)
            except json.JSONDecodeError:
                continue
            kind = message.get("type")
            if kind == "metrics":
                job_record_metrics(job=job, metrics=message["data"])
            elif kind == "event":
                job_event(job, message["message"], level=message.get("level", "info"),
                          data=message.get("data"))
            elif kind == "checkpoint":
                job_record_checkpoint(job=job, step=message["step"], path=message["path"],
                                      metrics=message.get("metrics", {}))
            elif kind == "result":
                result = message
            elif kind == "error":
                error = message
        process.wait()
    finally:
        stop.set()
        keeper.join(timeout=10)
        if process.poll() is None:
            process.kill()
            process.wait()
        stderr_log.close()
    job.refresh_from_db()
    if job.status != FineTuningJob.Status.RUNNING or job.worker != worker:
        return job.status  # re-queued by the reaper meanwhile: not ours to finish
    if result and result.get("status") == "succeeded":
        job_succeed(job=job, adapter_dir=Path(result["adapter_dir"]), result=result)
        shutil.rmtree(work / "checkpoints", ignore_errors=True)
        return "succeeded"
    if (result and result.get("status") == "cancelled") or job.cancel_requested:
        job_mark_cancelled(job=job)
        return "cancelled"
    if error:
        job_fail(job=job, code=error.get("code", "training_error"), message=error["message"])
    else:
        tail = (work / "trainer.log").read_text(errors="replace")[-500:]
        job_fail(job=job, code="trainer_crashed",
                 message=f"The trainer exited with status {process.returncode}. {tail}")
    return "failed"


def _keep_alive(job_id: str, worker: str, process: subprocess.Popen, stop: threading.Event) -> None:
    parent = os.getppid()
    cancel_sent_at: float | None = None
    while not stop.wait(settings.JOB_HEARTBEAT_SECONDS):
        try:
            close_old_connections()
            if os.getppid() != parent:  # our Celery worker died: do not train as an orphan
                log.error("worker parent gone; stopping the trainer of %s", job_id)
                process.kill()
                return
            if not scheduler.heartbeat(job_id=job_id, worker=worker):
                process.terminate()  # re-queued elsewhere or finished: stop
                return
            if cancel_sent_at is None and scheduler.cancel_requested(job_id=job_id):
                process.send_signal(signal.SIGTERM)
                cancel_sent_at = time.monotonic()
            elif cancel_sent_at and time.monotonic() - cancel_sent_at > CANCEL_GRACE_SECONDS:
                process.kill()
        except Exception:  # noqa: BLE001 - a DB hiccup must not kill the heartbeat
            log.exception("heartbeat for %s failed", job_id)
    from django.db import connection

    connection.close()
