"""Runs one claimed job on this worker: the trainer as a child process in its own environment.

The steps, in order (``JobRun``):
  setup      a fresh work folder for this attempt (a cache: any node's can be wiped), local
             copies of the datasets, and the newest checkpoint restored from artifact storage;
  supervise  the trainer's messages (jobs.training.protocol) become events, metrics and
             checkpoints; each checkpoint is uploaded to artifact storage by a background
             thread (training never waits for it);
             a heartbeat thread keeps the claim alive, turns a cancel request into SIGTERM and
             a pause request into the trainer's pause file (protocol.PAUSE_REQUEST: it saves a
             checkpoint at the end of its step and stops), and stops the trainer if this
             worker's Celery parent disappears or the claim is lost;
  finish     success stores the adapter then marks the job (fenced); a pause waits for its
             checkpoint to be stored, then frees the GPU; cancel, failure, or a re-queue when
             the worker itself failed and a checkpoint exists.

The job's experiment trackers (MLflow, W&B: ``tracking``) get its settings once set up, each
step's metrics, the adapter on success and the attempt's status at the end, without ever holding
up the training; W&B's run files are stored beside the TensorBoard files.

Every write carries this claim's attempt number: once the reaper has re-queued the job (this
worker was paused or cut off past the heartbeat timeout), nothing this attempt reports changes
the job (``services.StaleAttempt``). A database blip does not end the run: writes are retried.
The trainer is tied to this process with PR_SET_PDEATHSIG, so a killed worker never leaves a
training process behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from django.conf import settings
from django.db import DatabaseError, close_old_connections, connection

from jobs.training import protocol
from jobs.training.layout import ADAPTER_FILES, CHECKPOINT_FILES, staged_directory
from jobs.training.tensorboard import EventWriter
from tuneplex.core import metrics
from tuneplex.core.redact import client_message
from tuneplex.core.storage import (
    delete_prefix,
    download_directory,
    local_copy,
    upload_directory,
    upload_file,
)
from tuneplex.core.storage_layout import checkpoint_prefix, tensorboard_prefix, wandb_prefix
from tuneplex.core.trainer_env import trainer_command, trainer_environment
from tuneplex.files.models import File
from tuneplex.finetuning import gpus, scheduler, tracking
from tuneplex.finetuning.models import FineTuningJob, JobCheckpoint
from tuneplex.finetuning.services.lifecycle import (
    job_fail,
    job_mark_cancelled,
    job_mark_paused,
    job_requeue,
)
from tuneplex.finetuning.services.worker_writes import (
    StaleAttempt,
    job_holds,
    job_record_checkpoint,
    job_record_metrics,
    job_report_event,
    job_report_warning_of_attempt,
    job_succeed,
)

log = logging.getLogger(__name__)
PR_SET_PDEATHSIG = 1
CANCEL_GRACE_SECONDS = 30
UPLOAD_DRAIN_SECONDS = 300  # how long success waits for the last checkpoint upload
T = TypeVar("T")


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass


def _signal_group(process: subprocess.Popen, signum: int) -> None:
    """Signal the trainer's process group (torchrun and its ranks, or the one trainer)."""
    try:
        os.killpg(process.pid, signum)
    except ProcessLookupError:
        pass


def job_work_dir(job: FineTuningJob) -> Path:
    return settings.WORK_DIR / job.id


def persist(write: Callable[[], T], *, what: str, give_up_after: float | None) -> T | None:
    """Run a database write, retrying through connection errors with back-off.

    StaleAttempt is never retried. After ``give_up_after`` seconds the write is dropped (None);
    with None it is retried until it succeeds or the claim is lost.
    """
    started, delay = time.monotonic(), 0.5
    while True:
        try:
            return write()
        except StaleAttempt:
            raise
        except DatabaseError as exc:
            waited = time.monotonic() - started
            if give_up_after is not None and waited > give_up_after:
                log.error("dropping %s after %.0f s of database errors: %s", what, waited, exc)
                return None
            log.warning("%s failed (%s); retrying in %.1f s", what, exc, delay)
            with contextlib.suppress(DatabaseError):
                connection.close()
            time.sleep(delay)
            delay = min(delay * 2, 10.0)


def run_job(job_id: str) -> str:
    """Claim and train; returns the final status, 'skipped' if the claim failed, or
    'superseded' if the job was re-queued while this worker ran it."""
    worker = worker_name()
    job = scheduler.claim(job_id=job_id, worker=worker)
    if job is None:
        log.info("job %s not claimable (already taken, cancelled or gone)", job_id)
        return "skipped"
    if job.attempts == 1 and job.started_at is not None:
        metrics.JOB_WAIT.observe(max(0.0, (job.started_at - job.created_at).total_seconds()))
    run = JobRun(job, worker)
    started = time.monotonic()
    outcome = "failed"
    metrics.GPU_WORK.inc()
    try:
        outcome = run.run()
    except ParentMissing as exc:
        job_fail(job=job, code="model_not_found", message=str(exc), param="model",
                 attempt=run.attempt)
    except StaleAttempt:
        log.warning("job %s attempt %s was superseded; stopped", job_id, run.attempt)
        outcome = "superseded"
    except Exception:  # noqa: BLE001 - the job row must never stay "running"
        log.exception("job %s crashed in the worker", job_id)
        outcome = run.after_worker_error()
    finally:
        metrics.GPU_WORK.dec()
        metrics.TRAINING_THROUGHPUT.set(0)
        metrics.JOB_DURATION.labels(outcome).observe(time.monotonic() - started)
        # A paused attempt's tracked run goes on with the job's next attempt, as a re-queued one's.
        run.end_tracking({"queued": tracking.REQUEUED, "paused": tracking.REQUEUED}
                         .get(outcome, outcome))
    return outcome


class ParentMissing(Exception):
    """The adapter or checkpoint a continued job starts from no longer exists."""


class JobRun:
    def __init__(self, job: FineTuningJob, worker: str) -> None:
        self.job = job
        self.worker = worker
        self.attempt = job.attempts  # the fencing token of this claim
        self.work = job_work_dir(job) / f"attempt-{self.attempt}"
        self.superseded = threading.Event()
        self.process: subprocess.Popen | None = None  # the trainer, once started
        self.tracking: tracking.Tracking | None = None  # once set up, until the attempt ends

    def run(self) -> str:
        # The heartbeat runs from the claim on: downloading a large dataset or checkpoint must
        # not look like a dead worker.
        stop = threading.Event()
        keeper = threading.Thread(target=self.keep_alive, args=(stop,),
                                  name=f"heartbeat-{self.job.id}", daemon=True)
        keeper.start()
        try:
            with contextlib.ExitStack() as scope:
                config_path = self.setup(scope)
                if scheduler.stop_requested(job_id=self.job.id) == "pause":
                    # Asked while this attempt set up: stop before the trainer loads anything.
                    result, error, returncode = protocol.Result(status="paused"), None, 0
                else:
                    self.start_tracking()
                    devices = self.lease_gpus(scope)
                    result, error, returncode = self.supervise(config_path, devices)
        finally:
            stop.set()
            keeper.join(timeout=10)
        return self.finish(result, error, returncode)

    # --- setup -------------------------------------------------------------------------------

    def setup(self, scope: contextlib.ExitStack) -> Path:
        job = self.job
        # Other attempts' folders on this node are stale caches.
        shutil.rmtree(job_work_dir(job), ignore_errors=True)
        self.work.mkdir(parents=True)
        train = File.objects.get(organization=job.organization_id, id=job.training_file)
        validation = (File.objects.get(organization=job.organization_id, id=job.validation_file)
                      if job.validation_file else None)
        train_path = scope.enter_context(local_copy(train.blob_name))
        validation_path = scope.enter_context(local_copy(validation.blob_name)) if validation else None
        resume = self.restore_checkpoint()
        parent = self.restore_parent()
        config = {**job.config, "base_model_dir": job.base_model.directory,
                  "init_adapter_dir": str(parent) if parent else None,
                  "train_file": str(train_path), "output_dir": str(self.work),
                  "validation_file": str(validation_path) if validation_path else None,
                  "device": settings.TRAINING_DEVICE,
                  "memory_limit_gib": settings.TRAINING_MEMORY / 2**30,
                  "resume_from": str(resume) if resume else None}
        config_path = self.work / "config.json"
        config_path.write_text(json.dumps(config, indent=1))
        return config_path

    def lease_gpus(self, scope: contextlib.ExitStack) -> list[str] | None:
        """The job's GPUs on this node, held until the trainer has stopped (None on the CPU)."""
        if settings.TRAINING_DEVICE != "cuda":
            return None
        count = self.job.gpus
        return scope.enter_context(gpus.lease(
            count, give_up=self.superseded.is_set,
            on_wait=lambda free: self.event(f"Waiting for {count} free GPU(s) on this node "
                                            f"({free} free now).")))

    def restore_parent(self) -> Path | None:
        """Continued training: the parent adapter's (or checkpoint's) weights, downloaded from
        artifact storage. Raises ParentMissing when the parent was deleted since creation."""
        job = self.job
        if not job.lineage:
            return None
        source = job.parent_checkpoint or job.parent_adapter
        if source is None:
            raise ParentMissing(f"{job.lineage.get('model')} was deleted after the job was created; "
                                "there are no weights to continue from.")
        target = self.work / "parent"
        with staged_directory(target) as staging:
            download_directory(source.blob_prefix, ADAPTER_FILES, staging)
        return target

    def restore_checkpoint(self) -> Path | None:
        """The newest checkpoint recorded for the job, downloaded from artifact storage."""
        newest = JobCheckpoint.objects.filter(job=self.job).order_by("-step").first()
        if newest is None:
            if self.attempt > 1:
                self.event("No checkpoint was saved by an earlier attempt: starting from the "
                           "beginning.")
            return None
        target = self.work / "checkpoints" / f"step-{newest.step}"
        with staged_directory(target) as staging:
            download_directory(newest.blob_prefix, CHECKPOINT_FILES, staging)
        self.event(f"Resuming from the checkpoint at step {newest.step} (saved by attempt "
                   f"{newest.attempt}), restored from artifact storage.",
                   data={"resumed_from_step": newest.step})
        return target

    # --- supervise ----------------------------------------------------------------------------

    def supervise(self, config_path: Path, devices: list[str] | None = None
                  ) -> tuple[protocol.Result | None, protocol.Error | None, int]:
        if self.superseded.is_set():
            raise StaleAttempt(f"attempt {self.attempt} of {self.job.id}")
        stderr_log = (self.work / "trainer.log").open("ab")
        # Its own process group: a multi-GPU job is torchrun plus one process per GPU, and a
        # signal (cancel, kill) goes to all of them.
        process = self.process = subprocess.Popen(
            trainer_command("jobs.training.run", str(config_path), processes=self.job.gpus),
            cwd=settings.REPO_DIR, env=trainer_environment(home=self.work, devices=devices),
            stdout=subprocess.PIPE,
            stderr=stderr_log, preexec_fn=_die_with_parent, start_new_session=True)
        uploader = CheckpointUploader(self)
        curves = EventWriter(self.work / "tensorboard", suffix=f"a{self.attempt}")
        result: protocol.Result | None = None
        error: protocol.Error | None = None
        try:
            assert process.stdout is not None
            for line in process.stdout:
                message = protocol.parse(line)  # None: a line of another shape, skipped
                match message:
                    case protocol.Metrics(data=data):
                        metrics.TRAINING_THROUGHPUT.set(data.get("tokens_per_second") or 0)
                        curves.metrics(data)
                        if self.tracking is not None:
                            self.tracking.metrics(data)
                        persist(lambda: job_record_metrics(job=self.job, attempt=self.attempt,
                                                           metrics=data),
                                what="metrics", give_up_after=settings.JOB_WRITE_RETRY_SECONDS)
                    case protocol.Event():
                        self.event(message.message, level=message.level, data=message.data)
                    case protocol.Checkpoint():
                        uploader.submit(message.step, Path(message.path), message.metrics)
                    case protocol.Result():
                        result = message
                    case protocol.Error():
                        error = message
            process.wait()
            if result is not None and (result.succeeded or result.paused):
                uploader.drain(UPLOAD_DRAIN_SECONDS)  # a pause resumes from its checkpoint
        except StaleAttempt:
            self.superseded.set()
        finally:
            uploader.close()
            if process.poll() is None:
                _signal_group(process, signal.SIGKILL)
                process.wait()
            stderr_log.close()
            curves.close()
            self.store_curves(curves.path)
        if self.superseded.is_set():
            raise StaleAttempt(f"attempt {self.attempt} of {self.job.id}")
        return result, error, process.returncode

    def store_curves(self, path: Path) -> None:
        """This attempt's TensorBoard event file, beside the others of the job in storage."""
        try:
            prefix = tensorboard_prefix(self.job.organization_id, self.job.id)
            upload_file(path, f"{prefix}/{path.name}")
        except Exception:  # noqa: BLE001 - the curves are also in the job's events
            log.exception("storing the training curves of %s failed", self.job.id)

    # --- experiment tracking --------------------------------------------------------------------

    def start_tracking(self) -> None:
        trackers = tracking.open_trackers(self.job, directory=self.work / "tracking")
        if not trackers:
            return
        self.tracking = tracking.Tracking(trackers, report=self.tracking_failed,
                                          job_id=self.job.id)
        self.tracking.params(tracking.job_parameters(self.job))

    def end_tracking(self, status: str, *, adapter_dir: Path | None = None) -> None:
        """Send the adapter (on success) and the attempt's status, wait for the trackers at most
        TUNEPLEX_TRACKING_DRAIN_SECONDS, and store W&B's run files. Once; never raises."""
        feeding, self.tracking = self.tracking, None
        if feeding is None:
            return
        try:
            if adapter_dir is not None:
                feeding.adapter(adapter_dir)
            feeding.close(status, timeout=settings.TRACKING_DRAIN_SECONDS)
            prefix = wandb_prefix(self.job.organization_id, self.job.id)
            for run_dir, names in tracking.wandb_run_files(self.work / "tracking"):
                upload_directory(run_dir, f"{prefix}/{run_dir.name}", names)
        except Exception:  # noqa: BLE001 - tracking never changes the job's outcome
            log.exception("ending the experiment tracking of %s failed", self.job.id)

    def tracking_failed(self, message: str, data: dict) -> None:
        """A tracker's failure, once, as a warning event: from its thread while the attempt
        runs, or from the runner after the job has succeeded (fenced by the attempt all the
        same)."""
        persist(lambda: job_report_warning_of_attempt(job=self.job, attempt=self.attempt,
                                                      message=message, data=data),
                what="tracking event", give_up_after=settings.JOB_WRITE_RETRY_SECONDS)

    def event(self, message: str, *, level: str = "info", data: dict | None = None) -> None:
        persist(lambda: job_report_event(job=self.job, attempt=self.attempt, message=message,
                                         level=level, data=data),
                what="event", give_up_after=settings.JOB_WRITE_RETRY_SECONDS)

    def keep_alive(self, stop: threading.Event) -> None:
        parent = os.getppid()
        cancel_sent_at: float | None = None
        while not stop.wait(settings.JOB_HEARTBEAT_SECONDS):
            process = self.process
            try:
                close_old_connections()
                if os.getppid() != parent:  # our Celery worker died: do not train as an orphan
                    log.error("worker parent gone; stopping the trainer of %s", self.job.id)
                    self._kill()
                    return
                if not job_holds(job_id=self.job.id, attempt=self.attempt):
                    # Re-queued (this worker was silent too long) or finished: stop at once.
                    self.superseded.set()
                    self._kill()
                    return
                if process is None:
                    continue  # still setting up; a cancel or pause is seen once the trainer runs
                if cancel_sent_at is not None:
                    if time.monotonic() - cancel_sent_at > CANCEL_GRACE_SECONDS:
                        _signal_group(process, signal.SIGKILL)
                    continue
                wanted = scheduler.stop_requested(job_id=self.job.id)
                if wanted == "cancel":
                    _signal_group(process, signal.SIGTERM)
                    cancel_sent_at = time.monotonic()
                elif wanted == "pause":
                    # Read at the end of each step (every rank); writing it again is harmless.
                    (self.work / protocol.PAUSE_REQUEST).touch()
            except Exception:  # noqa: BLE001 - a DB hiccup must not kill the heartbeat
                log.exception("heartbeat for %s failed", self.job.id)
        connection.close()

    def _kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            _signal_group(self.process, signal.SIGKILL)

    # --- finish -------------------------------------------------------------------------------

    def finish(self, result: protocol.Result | None, error: protocol.Error | None,
               returncode: int) -> str:
        job, attempt = self.job, self.attempt
        if result is not None and result.succeeded:
            adapter_dir = Path(result.adapter_dir)  # a succeeded result names it (protocol)
            done = persist(lambda: job_succeed(job=job, attempt=attempt, adapter_dir=adapter_dir,
                                               result=dataclasses.asdict(result)),
                           what="success", give_up_after=None)
            if not done:
                raise StaleAttempt(f"attempt {attempt} of {job.id}")
            metrics.JOB_TOKENS.inc(result.trained_tokens)
            self.end_tracking(tracking.SUCCEEDED, adapter_dir=adapter_dir)
            shutil.rmtree(self.work, ignore_errors=True)
            return "succeeded"
        if (result is not None and result.cancelled) or scheduler.cancel_requested(job_id=job.id):
            job_mark_cancelled(job=job, attempt=attempt)  # a cancel wins over a pause
            return "cancelled"
        if result is not None and result.paused:
            if not job_mark_paused(job=job, attempt=attempt):
                raise StaleAttempt(f"attempt {attempt} of {job.id}")
            shutil.rmtree(self.work, ignore_errors=True)
            return "paused"
        if error is not None:
            log.error("job %s attempt %s: trainer error %s: %s", job.id, attempt,
                      error.code, error.message)
            job_fail(job=job, code=error.code,
                     message=client_message(error.message) or "Training failed.",
                     attempt=attempt)
            return "failed"
        if returncode < 0:  # killed by a signal (the OOM killer, an operator): not the job's fault
            return self.after_worker_error(f"The trainer was stopped by signal {-returncode}.")
        job_fail(job=job, code="trainer_crashed", attempt=attempt,
                 message=f"The trainer exited with status {returncode}; see the worker's log.")
        return "failed"

    def after_worker_error(self, reason: str = "The worker failed while running the job.") -> str:
        """A failure of the worker, not of the training: resume elsewhere if a checkpoint exists."""
        job = FineTuningJob.objects.get(pk=self.job.pk)
        if job.checkpoints.exists():
            outcome = job_requeue(job=job, attempt=self.attempt, reason=reason)
            return {"requeued": "queued"}.get(outcome, outcome or "superseded")
        job_fail(job=job, code="worker_error", attempt=self.attempt,
                 message=f"{reason} No checkpoint had been saved; see the worker's log.")
        return "failed"


class CheckpointUploader:
    """Uploads the trainer's checkpoints to artifact storage in a background thread.

    Each checkpoint is first snapshotted with hard links (instant), so the trainer can prune its
    local copies meanwhile. If uploads fall behind, only the newest pending checkpoint is kept.
    A checkpoint is recorded (fenced by the attempt) only once all its files are in storage.
    """

    def __init__(self, run: JobRun) -> None:
        self.run = run
        self.snapshots = run.work / "uploading"
        self._pending: tuple[int, Path, dict] | None = None
        self._busy = False
        self._closed = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._loop, name=f"upload-{run.job.id}", daemon=True)
        self._thread.start()

    def submit(self, step: int, path: Path, metrics: dict) -> None:
        snapshot = self.snapshots / f"step-{step}"
        shutil.rmtree(snapshot, ignore_errors=True)
        snapshot.mkdir(parents=True)
        for name in CHECKPOINT_FILES:
            try:
                os.link(path / name, snapshot / name)
            except OSError:
                shutil.copy2(path / name, snapshot / name)
        with self._cond:
            if self._pending is not None:
                shutil.rmtree(self._pending[1], ignore_errors=True)
            self._pending = (step, snapshot, metrics)
            self._cond.notify_all()

    def drain(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while (self._pending is not None or self._busy) and time.monotonic() < deadline:
                self._cond.wait(timeout=1)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=UPLOAD_DRAIN_SECONDS)

    def _loop(self) -> None:
        try:
            while True:
                with self._cond:
                    while self._pending is None and not self._closed:
                        self._cond.wait()
                    if self._pending is None:
                        return
                    step, snapshot, metrics = self._pending
                    self._pending, self._busy = None, True
                try:
                    self._upload(step, snapshot, metrics)
                except StaleAttempt:
                    self.run.superseded.set()
                    return
                except Exception:  # noqa: BLE001 - the next checkpoint will try again
                    log.exception("upload of checkpoint %s of %s failed", step, self.run.job.id)
                finally:
                    shutil.rmtree(snapshot, ignore_errors=True)
                    with self._cond:
                        self._busy = False
                        self._cond.notify_all()
        finally:
            connection.close()

    def _upload(self, step: int, snapshot: Path, metrics: dict) -> None:
        run = self.run
        prefix = checkpoint_prefix(run.job.organization_id, run.job.id, attempt=run.attempt,
                                   step=step)
        size = upload_directory(snapshot, prefix, CHECKPOINT_FILES)
        try:
            persist(lambda: job_record_checkpoint(job=run.job, attempt=run.attempt, step=step,
                                                  blob_prefix=prefix, metrics=metrics, size=size),
                    what="checkpoint", give_up_after=None)
        except BaseException:
            delete_prefix(prefix)  # not recorded: nobody would ever resume from it
            raise
