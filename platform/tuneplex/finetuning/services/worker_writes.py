"""A running attempt's writes: heartbeat, events, metrics, checkpoints and success, each
fenced by the attempt's number, so that a paused worker that comes back changes nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from django.conf import settings
from django.db import transaction
from django.db.models.functions import Now

from tuneplex.adapters.services import adapter_prepare
from tuneplex.core.storage import delete_prefix
from tuneplex.finetuning.models import FineTuningJob, JobCheckpoint
from tuneplex.finetuning.services.lifecycle import enqueue_dispatch, job_event
from tuneplex.finetuning.signals import adapter_trained


class StaleAttempt(Exception):
    """The worker's claim was superseded: the job was re-queued (and maybe claimed again) or it
    finished. Nothing the old attempt reports may change the job any more."""


def _touch(job_id: str, attempt: int, **fields: Any) -> None:
    """Within the caller's transaction: refresh the heartbeat (the database's clock) and set
    ``fields``, only while ``attempt`` still holds the running job. The UPDATE's row lock keeps
    the reaper from re-queuing the job until the caller's transaction ends."""
    held = FineTuningJob.objects.filter(id=job_id, status=FineTuningJob.Status.RUNNING,
                                        attempts=attempt).update(heartbeat_at=Now(), **fields)
    if not held:
        raise StaleAttempt(f"attempt {attempt} of {job_id} no longer holds the job")


def job_holds(*, job_id: str, attempt: int) -> bool:
    """Heartbeat: True (and the heartbeat recorded) while ``attempt`` still holds the job."""
    try:
        _touch(job_id, attempt)
    except StaleAttempt:
        return False
    return True


def job_report_event(*, job: FineTuningJob, attempt: int, message: str, level: str = "info",
                     data: dict | None = None) -> None:
    with transaction.atomic():
        _touch(job.id, attempt)
        job_event(job, message, level=level, data=data)


def job_report_warning_of_attempt(*, job: FineTuningJob, attempt: int, message: str,
                                  data: dict | None = None) -> bool:
    """A warning about an attempt that may have ended already (its experiment tracking fails
    after the job succeeded): recorded while ``attempt`` is still the job's latest claim,
    whatever its status; dropped (False) once a later attempt holds the job."""
    with transaction.atomic():
        held = FineTuningJob.objects.select_for_update().filter(id=job.id, attempts=attempt)
        if not held.exists():
            return False
        job_event(job, message, level="warning", data=data)
    return True


def job_record_metrics(*, job: FineTuningJob, attempt: int, metrics: dict[str, Any]) -> None:
    parts = [f"Step {metrics['step']}/{metrics['total_steps']}: training loss={metrics['train_loss']:.4f}"]
    if "eval_loss" in metrics:
        parts.append(f"eval loss={metrics['eval_loss']:.4f}")
    with transaction.atomic():
        _touch(job.id, attempt, step=metrics["step"], total_steps=metrics["total_steps"],
               eta_seconds=metrics.get("eta_seconds"), trained_tokens=metrics.get("trained_tokens"))
        job_event(job, ", ".join(parts), type="metrics", data=metrics)



def job_record_checkpoint(*, job: FineTuningJob, attempt: int, step: int, blob_prefix: str,
                          metrics: dict, size: int = 0) -> None:
    """Record a checkpoint whose files are already in artifact storage, then drop the ones beyond
    the newest TUNEPLEX_JOB_KEEP_CHECKPOINTS (their rows in this transaction, their files after).
    A checkpoint that an unfinished job continues from is kept until that job has finished."""
    with transaction.atomic(durable=True):
        _touch(job.id, attempt)
        replaced = list(JobCheckpoint.objects.filter(job=job, step__gte=step)
                        .exclude(blob_prefix=blob_prefix).values_list("blob_prefix", flat=True))
        JobCheckpoint.objects.filter(job=job, step__gte=step).delete()
        JobCheckpoint.objects.create(job=job, step=step, attempt=attempt, blob_prefix=blob_prefix,
                                     metrics=metrics, bytes=size)
        in_use = (FineTuningJob.objects.filter(parent_checkpoint__job=job)
                  .exclude(status__in=FineTuningJob.FINISHED).values("parent_checkpoint"))
        stale = list(JobCheckpoint.objects.filter(job=job).exclude(id__in=in_use).order_by("-step")
                     [settings.JOB_KEEP_CHECKPOINTS:].values_list("id", "blob_prefix"))
        JobCheckpoint.objects.filter(id__in=[checkpoint_id for checkpoint_id, _ in stale]).delete()
        job_event(job, f"Checkpoint saved at step {step}.", data={"step": step})
        dropped = replaced + [prefix for _, prefix in stale]
        transaction.on_commit(lambda: _delete_checkpoint_files(dropped), robust=True)


def _delete_checkpoint_files(prefixes: list[str]) -> None:
    for prefix in prefixes:
        if prefix:
            delete_prefix(prefix)



def job_succeed(*, job: FineTuningJob, attempt: int, adapter_dir: Path,
                result: dict[str, Any]) -> bool:
    """Store the adapter, then mark the job succeeded with its Adapter row in one short
    transaction (fenced by ``attempt``); auto-deploy runs after the commit.

    False (and nothing stored) if this attempt no longer holds the job.
    """
    if not job_holds(job_id=job.id, attempt=attempt):
        return False
    job = FineTuningJob.objects.select_related("organization", "base_model").get(pk=job.pk)
    adapter = adapter_prepare(job=job, adapter_dir=adapter_dir, sha256=result["sha256"])
    try:
        with transaction.atomic(durable=True):
            _touch(job.id, attempt, status=FineTuningJob.Status.SUCCEEDED, finished_at=Now(),
                   eta_seconds=None, fine_tuned_model=adapter.name,
                   trained_tokens=result.get("trained_tokens"),
                   step=result.get("steps", job.step))
            adapter.save(force_insert=True)
            job_event(job, f"Job succeeded: adapter {adapter.name} is ready.",
                      data={"adapter_id": adapter.id, "sha256": adapter.sha256})
            transaction.on_commit(enqueue_dispatch)
            # Deployed, gated by an eval, or left as the organization's settings say, here
            # after the commit (tuneplex.finetuning.signals).
            transaction.on_commit(lambda: adapter_trained.send(sender=FineTuningJob,
                                                               adapter_id=adapter.id), robust=True)
    except BaseException as exc:
        delete_prefix(adapter.blob_prefix)  # nothing half-written: no files without the row
        if isinstance(exc, StaleAttempt):
            return False
        raise
    return True



