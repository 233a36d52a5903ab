"""A fine-tuning job's lifecycle: created (from a checked plan), files validated, queued,
paused and resumed, cancelled, failed, re-queued; and its events. Scheduling lives in
:mod:`tuneplex.finetuning.scheduler`, a running attempt's own writes in :mod:`.worker_writes`.

The services here act after their commit (enqueue, dispatch), so their transactions are durable
(as are the scheduler's dispatch, the worker's checkpoint and success, a merge request and a
file's deletion): called inside another transaction they raise at once, instead of having their
side effects wait on the caller's commit, or vanish with its rollback."""

from __future__ import annotations

import dataclasses
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db import transaction
from django.db.models import DurationField, ExpressionWrapper, F, Value
from django.db.models.functions import Coalesce, Now
from django.utils import timezone

from jobs.training.memory import GIB
from tuneplex.audit.services import audit_record
from tuneplex.core import queue
from tuneplex.core.actors import Principal
from tuneplex.core.errors import ApiError, Conflict
from tuneplex.files.selectors import storage_quota_check
from tuneplex.finetuning.models import FineTuningJob, JobEvent
from tuneplex.finetuning.selectors import gpu_capacity
from tuneplex.finetuning.services.plan import WORKER_FIELDS, job_plan, usable_training_file
from tuneplex.tenancy.models import Organization


def job_create(*, organization: Organization, actor: Principal, model: str, training_file: str,
               validation_file: str | None = None, hyperparameters: dict | None = None,
               suffix: str | None = None, seed: int | None = None,
               metadata: dict | None = None, method_type: str = "supervised",
               integrations: list | None = None) -> FineTuningJob:
    plan = job_plan(organization=organization, model=model, training_file=training_file,
                    validation_file=validation_file, hyperparameters=hyperparameters,
                    suffix=suffix, seed=seed, method_type=method_type, integrations=integrations)
    base_model, train, validation, config, peak, parent = (
        plan.base_model, plan.train, plan.validation, plan.config, plan.memory, plan.parent)
    stored = {k: v for k, v in dataclasses.asdict(config).items() if k not in WORKER_FIELDS}
    # A job stores checkpoints and an adapter: none may start once the quota is used up.
    storage_quota_check(organization, 0, what="a new job's checkpoints and adapter", param=None)
    job = FineTuningJob(
        organization=organization, base_model=base_model, training_file=train.id,
        validation_file=validation.id if validation else "", method=config.method,
        method_type=method_type, hyperparameters=hyperparameters or {}, config=stored,
        suffix=suffix or "", seed=config.seed, gpus=config.gpus, metadata=metadata,
        integrations=plan.integrations, estimated_memory_bytes=peak.total,
        created_by=actor.user if actor.api_key is None else actor.api_key.created_by)
    if parent is not None:
        job.parent_adapter, job.parent_checkpoint = parent.adapter, parent.checkpoint
        job.lineage = parent.lineage(job_id=job.id, training_file=train.id,
                                     validation_file=job.validation_file, method_type=method_type)
    with transaction.atomic(durable=True):
        _check_queue_room(organization)
        job.save(force_insert=True)
        job_event(job, f"Created fine-tuning job {job.id}. Estimated peak memory "
                       f"{peak.total / GIB:.2f} GiB.", data={"memory_estimate": peak.as_dict()})
        if parent is not None:
            job_event(job, f"Continues training from {parent.requested}.",
                      data={"lineage": job.lineage})
        audit_record(actor=actor, action="finetuning_job.create", obj=job,
                     metadata={"model": model, "training_file": train.id,
                               "method": method_type})
        transaction.on_commit(lambda: _enqueue_validation(job.id))
    return job


def _check_queue_room(organization: Organization) -> None:
    """At most TUNEPLEX_ORG_MAX_QUEUED_JOBS jobs of an organization wait (validating or queued):
    the scheduler's work stays bounded, and so does what one organization can pile up. The
    organization's row is locked, so that two creations cannot both take the last place."""
    Organization.objects.select_for_update().filter(pk=organization.pk).first()
    waiting = FineTuningJob.objects.filter(
        organization=organization, status__in=(FineTuningJob.Status.VALIDATING_FILES,
                                               FineTuningJob.Status.QUEUED)).count()
    if waiting >= settings.ORG_MAX_QUEUED_JOBS:
        raise ApiError(f"The organization already has {waiting} jobs waiting to run, its limit "
                       f"(TUNEPLEX_ORG_MAX_QUEUED_JOBS); cancel one or wait for some to start.",
                       code="too_many_queued_jobs", status=429)


def _enqueue_validation(job_id: str) -> None:
    queue.enqueue(queue.VALIDATE_JOB_FILES, job_id)


# --- events --------------------------------------------------------------------------------------


def job_event(job: FineTuningJob, message: str, *, level: str = "info", data: dict | None = None,
              type: str = "message") -> JobEvent:
    level = {"warning": "warn"}.get(level, level)  # OpenAI's levels: info, warn, error
    return JobEvent.objects.create(job=job, level=level, message=message, data=data or {}, type=type)


# --- lifecycle -----------------------------------------------------------------------------------


def job_files_validated(*, job_id: str) -> FineTuningJob | None:
    """validating_files → queued, after re-checking the files still exist and are valid."""
    job = FineTuningJob.objects.filter(id=job_id).select_related("organization").first()
    if job is None or job.status != FineTuningJob.Status.VALIDATING_FILES:
        return None
    try:
        usable_training_file(job.organization, job.training_file, "training_file",
                             job.method_type)
        if job.validation_file:
            usable_training_file(job.organization, job.validation_file, "validation_file",
                                 job.method_type)
    except ApiError as exc:
        job_fail(job=job, code=exc.code, message=exc.message, param=exc.param)
        return None
    with transaction.atomic():
        job = FineTuningJob.objects.select_for_update().get(pk=job.pk)
        if job.status != FineTuningJob.Status.VALIDATING_FILES:
            return None
        if job.pause_requested:  # asked while the files were checked: paused, not queued
            _pause(job, "Files validated; job paused.")
            return None
        job.status = FineTuningJob.Status.QUEUED
        job.save(update_fields=["status"])
        job_event(job, "Files validated; job queued." if gpu_capacity() else
                  "Files validated; job queued. No GPU worker is registered yet: the job waits "
                  "and starts when one joins.")
    return job


def job_cancel(*, organization: Organization, actor: Principal, job: FineTuningJob) -> FineTuningJob:
    with transaction.atomic(durable=True):
        job = FineTuningJob.objects.select_for_update().get(pk=job.pk, organization=organization)
        if job.status in FineTuningJob.FINISHED:
            raise Conflict(f"The job has already {job.status}.", code="job_finished")
        if job.status == FineTuningJob.Status.RUNNING:
            # The worker's heartbeat sees the flag and stops the trainer within seconds.
            job.cancel_requested = True
            job.save(update_fields=["cancel_requested"])
            job_event(job, "Cancellation requested; stopping the trainer.")
        else:
            _finish(job, FineTuningJob.Status.CANCELLED)
            job_event(job, "Job cancelled.")
        audit_record(actor=actor, action="finetuning_job.cancel", obj=job)
    return job


def job_pause(*, organization: Organization, actor: Principal, job: FineTuningJob) -> FineTuningJob:
    """Pause a job: a waiting one at once (it leaves the queue, its GPU slot if it was dispatched
    is free again); a running one once its trainer has saved a checkpoint and stopped (the
    worker's heartbeat sees the flag; the job shows "pausing" meanwhile); one validating its
    files once they are checked. Asking again while it pauses or is paused changes nothing."""
    with transaction.atomic(durable=True):
        job = FineTuningJob.objects.select_for_update().get(pk=job.pk, organization=organization)
        if job.status in FineTuningJob.FINISHED:
            raise Conflict(f"The job has already {job.status}; only an unfinished job can be "
                           "paused.", code="job_finished")
        if job.cancel_requested:
            raise Conflict("The job is being cancelled; it cannot be paused.",
                           code="job_cancelling")
        if job.status == FineTuningJob.Status.PAUSED or job.pause_requested:
            return job
        if job.status == FineTuningJob.Status.QUEUED:
            _pause(job, "Job paused.")
            transaction.on_commit(enqueue_dispatch)  # a dispatched job's slot is free again
        else:
            job.pause_requested = True
            job.save(update_fields=["pause_requested"])
            job_event(job, "Pause requested; the trainer saves a checkpoint and stops."
                      if job.status == FineTuningJob.Status.RUNNING else
                      "Pause requested; the job pauses once its files are validated.")
        audit_record(actor=actor, action="finetuning_job.pause", obj=job)
    return job


def job_resume(*, organization: Organization, actor: Principal, job: FineTuningJob) -> FineTuningJob:
    """paused → queued: the job waits its turn under the scheduler's fairness and the
    organization's limits (it takes a place among its waiting jobs again, 429 when there is
    none), and its next attempt continues from its newest checkpoint on any node."""
    with transaction.atomic(durable=True):
        job = FineTuningJob.objects.select_for_update().get(pk=job.pk, organization=organization)
        if job.status != FineTuningJob.Status.PAUSED:
            raise Conflict(f"Only a paused job can be resumed; this one is {job.api_status}.",
                           code="job_not_paused")
        _check_queue_room(organization)
        FineTuningJob.objects.filter(pk=job.pk).update(
            status=FineTuningJob.Status.QUEUED, dispatched_at=None, pause_requested=False,
            attempts_at_resume=F("attempts"), paused_at=None,
            paused_for=F("paused_for") + Coalesce(
                ExpressionWrapper(Now() - F("paused_at"), output_field=DurationField()),
                Value(timedelta(0))))
        job.refresh_from_db()
        newest = job.checkpoints.order_by("-step").first()
        job_event(job, "Job resumed; " + (
            f"it continues from the checkpoint at step {newest.step}." if newest else
            "it starts from the beginning (no checkpoint was saved)."),
            data={"resume_from_step": newest.step if newest else None})
        audit_record(actor=actor, action="finetuning_job.resume", obj=job)
        transaction.on_commit(enqueue_dispatch)
    return job


def job_mark_paused(*, job: FineTuningJob, attempt: int) -> bool:
    """The attempt's trainer stopped for a pause (its checkpoint recorded first): paused, or
    cancelled if a cancel came meanwhile. False if the attempt no longer holds the job."""
    with transaction.atomic(durable=True):
        job = FineTuningJob.objects.select_for_update().get(pk=job.pk)
        if not _still_holds(job, attempt):
            return False
        if job.cancel_requested:
            _finish(job, FineTuningJob.Status.CANCELLED)
            job_event(job, "Job cancelled; training stopped.")
        else:
            _pause(job, "Job paused.")
            transaction.on_commit(enqueue_dispatch)  # its GPU slot is free
    return True


def _pause(job: FineTuningJob, message: str) -> None:
    """Within the caller's transaction, the job row locked: paused (since now on the database's
    clock), out of the queue and off its worker; the event says where a resume continues from."""
    FineTuningJob.objects.filter(pk=job.pk).update(
        status=FineTuningJob.Status.PAUSED, pause_requested=False, paused_at=Now(),
        dispatched_at=None, worker="", eta_seconds=None)
    job.refresh_from_db()
    newest = job.checkpoints.order_by("-step").first()
    job_event(job, f"{message} " + (
        f"Resuming continues from the checkpoint at step {newest.step}." if newest else
        "No checkpoint was saved yet: resuming starts from the beginning."),
        data={"step": job.step, "resume_from_step": newest.step if newest else None})


def _finish(job: FineTuningJob, status: str, **fields: Any) -> None:
    job.status = status
    job.finished_at = timezone.now()
    job.eta_seconds = None
    for name, value in fields.items():
        setattr(job, name, value)
    job.save()
    transaction.on_commit(enqueue_dispatch)


def enqueue_dispatch() -> None:
    queue.enqueue(queue.DISPATCH_JOBS)


def job_fail(*, job: FineTuningJob, code: str, message: str, param: str | None = None,
             attempt: int | None = None) -> bool:
    """Fail the job unless it has finished; with ``attempt``, only while that claim holds it."""
    with transaction.atomic(durable=True):
        job = FineTuningJob.objects.select_for_update().get(pk=job.pk)
        if job.status in FineTuningJob.FINISHED or not _still_holds(job, attempt):
            return False
        _fail(job, code=code, message=message, param=param)
    return True


def _fail(job: FineTuningJob, *, code: str, message: str, param: str | None = None) -> None:
    _finish(job, FineTuningJob.Status.FAILED,
            error={"code": code, "message": message, "param": param})
    job_event(job, f"Job failed: {message}", level="error")


def job_mark_cancelled(*, job: FineTuningJob, attempt: int | None = None) -> None:
    with transaction.atomic(durable=True):
        job = FineTuningJob.objects.select_for_update().get(pk=job.pk)
        if job.status not in FineTuningJob.FINISHED and _still_holds(job, attempt):
            _finish(job, FineTuningJob.Status.CANCELLED)
            job_event(job, "Job cancelled; training stopped.")


def _still_holds(job: FineTuningJob, attempt: int | None) -> bool:
    return attempt is None or (job.status == FineTuningJob.Status.RUNNING and job.attempts == attempt)


def job_requeue(*, job: FineTuningJob, attempt: int | None, reason: str) -> str:
    """running → queued (to resume from the newest checkpoint in storage on any node), or failed
    once TUNEPLEX_JOB_MAX_ATTEMPTS claims were spent since the job was created or last resumed;
    paused instead when a pause was asked for (the worker was lost while pausing). ``attempt``
    None: whichever attempt holds it (the reaper, which has checked the heartbeat against the
    database's clock). Returns "requeued", "paused", "failed", or "" when the job was no longer
    running (as that attempt)."""
    with transaction.atomic(durable=True):
        job = FineTuningJob.objects.select_for_update().get(pk=job.pk)
        if job.status != FineTuningJob.Status.RUNNING or (attempt is not None
                                                          and job.attempts != attempt):
            return ""
        if job.pause_requested:
            _pause(job, f"{reason} Job paused, as asked.")
            transaction.on_commit(enqueue_dispatch)
            return "paused"
        spent = job.attempts - job.attempts_at_resume
        if spent >= settings.JOB_MAX_ATTEMPTS:
            _fail(job, code="worker_lost",
                  message=f"{reason} This happened on each of {spent} attempts; giving up.")
            return "failed"
        job.status, job.dispatched_at, job.worker, job.eta_seconds = (
            FineTuningJob.Status.QUEUED, None, "", None)
        job.save(update_fields=["status", "dispatched_at", "worker", "eta_seconds"])
        newest = job.checkpoints.order_by("-step").first()
        then = (f"the next attempt resumes from the checkpoint at step {newest.step} in storage"
                if newest else "no checkpoint was saved yet, so the next attempt starts over")
        job_event(job, f"{reason} Job re-queued; {then}.", level="warning")
        transaction.on_commit(enqueue_dispatch)
    return "requeued"
