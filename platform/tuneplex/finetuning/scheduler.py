"""Which queued job runs next, worker claims, heartbeats, and the reaper.

Dispatch sends a job to the ``gpu`` queue only while a GPU slot is free (TUNEPLEX_GPU_SLOTS), so
the broker never holds a backlog that would be served first-come-first-served. Among queued jobs
it picks fairly: organizations under their concurrency limit (TUNEPLEX_ORG_MAX_CONCURRENT_JOBS),
the one whose last job was dispatched longest ago first, and its oldest job. One organization's
hundred queued jobs therefore alternate with another's single job.

The reaper (Celery beat) re-queues a running job whose worker stopped heartbeating, to resume
from its last checkpoint, or fails it after TUNEPLEX_JOB_MAX_ATTEMPTS attempts; a job is never
"running" forever.
"""

from __future__ import annotations

import logging
from datetime import timedelta

from django.conf import settings
from django.db import connection, transaction
from django.db.models import Count, Max, Q
from django.utils import timezone

from tuneplex.finetuning.models import FineTuningJob
from tuneplex.finetuning.services import job_event, job_fail

log = logging.getLogger(__name__)
Status = FineTuningJob.Status
# A dispatched message no worker claimed within this long is dispatched again.
DISPATCH_CLAIM_TIMEOUT = timedelta(minutes=10)


def _lock_scheduler() -> None:
    """Serialise dispatchers (SQLite already serialises writers)."""
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(7351)")


def _in_flight() -> Q:
    return Q(status=Status.RUNNING) | Q(status=Status.QUEUED, dispatched_at__isnull=False)


def next_job() -> FineTuningJob | None:
    """The fair choice among undispatched queued jobs, or None."""
    busy = dict(FineTuningJob.objects.filter(_in_flight()).values("organization")
                .annotate(n=Count("id")).values_list("organization", "n"))
    last_dispatch = dict(FineTuningJob.objects.filter(dispatched_at__isnull=False)
                         .values("organization").annotate(t=Max("dispatched_at"))
                         .values_list("organization", "t"))
    waiting = (FineTuningJob.objects.filter(status=Status.QUEUED, dispatched_at__isnull=True)
               .order_by("created_at", "id"))
    oldest_per_org: dict[str, FineTuningJob] = {}
    for job in waiting:
        if job.organization_id not in oldest_per_org:
            oldest_per_org[job.organization_id] = job
    candidates = [job for org, job in oldest_per_org.items()
                  if busy.get(org, 0) < settings.ORG_MAX_CONCURRENT_JOBS]
    if not candidates:
        return None
    epoch = timezone.now() - timedelta(days=365 * 100)
    return min(candidates, key=lambda j: (last_dispatch.get(j.organization_id) or epoch,
                                          j.created_at))


def dispatch() -> list[str]:
    """Send as many fairly chosen queued jobs to the gpu queue as there are free slots."""
    sent: list[str] = []
    with transaction.atomic():
        _lock_scheduler()
        free = settings.GPU_SLOTS - FineTuningJob.objects.filter(_in_flight()).count()
        while free > 0:
            job = next_job()
            if job is None:
                break
            now = timezone.now()
            if FineTuningJob.objects.filter(id=job.id, status=Status.QUEUED,
                                            dispatched_at__isnull=True).update(dispatched_at=now):
                sent.append(job.id)
                free -= 1
        for job_id in sent:
            transaction.on_commit(lambda job_id=job_id: _send(job_id))
    return sent


def _send(job_id: str) -> None:
    from jobs.tasks import train_job

    train_job.delay(job_id)


def claim(*, job_id: str, worker: str) -> FineTuningJob | None:
    """queued (and dispatched) → running, exactly once: a redelivered message gets None."""
    now = timezone.now()
    job = FineTuningJob.objects.filter(id=job_id).first()
    if job is None:
        return None
    claimed = FineTuningJob.objects.filter(
        id=job_id, status=Status.QUEUED, dispatched_at__isnull=False,
        attempts=job.attempts,
    ).update(status=Status.RUNNING, worker=worker, heartbeat_at=now, attempts=job.attempts + 1,
             started_at=job.started_at or now)
    if not claimed:
        return None
    job.refresh_from_db()
    job_event(job, f"Running on {worker} (attempt {job.attempts} of {settings.JOB_MAX_ATTEMPTS}).")
    return job


def heartbeat(*, job_id: str, worker: str) -> bool:
    """Record liveness; False if the job is no longer ours (re-queued or finished)."""
    return bool(FineTuningJob.objects.filter(id=job_id, status=Status.RUNNING, worker=worker)
                .update(heartbeat_at=timezone.now()))


def cancel_requested(*, job_id: str) -> bool:
    return FineTuningJob.objects.filter(id=job_id, cancel_requested=True).exists()


def reap() -> dict[str, list[str]]:
    """Re-queue or fail running jobs whose worker went silent; re-dispatch unclaimed messages."""
    now = timezone.now()
    stale = now - timedelta(seconds=settings.JOB_HEARTBEAT_TIMEOUT)
    requeued, failed = [], []
    for job in FineTuningJob.objects.filter(status=Status.RUNNING, heartbeat_at__lt=stale):
        last_checkpoint = job.checkpoints.order_by("-step").first()
        if job.cancel_requested:
            from tuneplex.finetuning.services import job_mark_cancelled

            job_mark_cancelled(job=job)
            continue
        if job.attempts >= settings.JOB_MAX_ATTEMPTS:
            job_fail(job=job, code="worker_lost",
                     message=f"The worker stopped responding {job.attempts} time(s); giving up.")
            failed.append(job.id)
            continue
        moved = FineTuningJob.objects.filter(id=job.id, status=Status.RUNNING,
                                             heartbeat_at__lt=stale).update(
            status=Status.QUEUED, dispatched_at=None, worker="", eta_seconds=None)
        if moved:
            resume = (f"resuming from the checkpoint at step {last_checkpoint.step}"
                      if last_checkpoint else "starting over (no checkpoint yet)")
            job_event(job, f"Worker {job.worker} stopped heartbeating; job re-queued, {resume}.",
                      level="warning")
            requeued.append(job.id)
    FineTuningJob.objects.filter(status=Status.QUEUED,
                                 dispatched_at__lt=now - DISPATCH_CLAIM_TIMEOUT
                                 ).update(dispatched_at=None)
    dispatch()
    return {"requeued": requeued, "failed": failed}
