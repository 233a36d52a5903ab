"""GPU work: which queued job or merge runs next, worker claims, heartbeats, and the sweeps.

Dispatch sends work to the ``gpu`` queue only while GPUs are free (``selectors.gpu_capacity``:
the GPUs of the GPU workers registered and heartbeating, or TUNEPLEX_GPU_SLOTS where the operator
set it; a job takes its ``gpus``, a merge one), so the broker never holds a backlog that would be
served first-come-first-served. While no GPU worker is registered, work waits queued; a worker
that registers sends a dispatch. Jobs and merges are one kind of work here:
both count against their organization's concurrency limit (TUNEPLEX_ORG_MAX_CONCURRENT_JOBS), and
the pick is fair between organizations: among those under their limit, the one whose last work
was dispatched longest ago first, and its oldest waiting work. One organization's hundred queued
jobs or merges therefore alternate with another's single job. Work that needs more GPUs than are
free waits at the head of the line (smaller work does not overtake it, or a many-GPU job could
wait forever). Each pick reads one row per organization with waiting work and then one row of
work, never the whole queue (which TUNEPLEX_ORG_MAX_QUEUED_JOBS bounds per organization too).

Every claim increments the job's ``attempts``, the fencing token that its worker's writes carry
(see ``services.StaleAttempt``). Timeouts are measured with the database's clock, never a
worker's. The sweep (Celery beat, every 10 s) re-queues a running job whose worker stopped
heartbeating, to resume from the newest checkpoint in artifact storage on any node, or fails it
after TUNEPLEX_JOB_MAX_ATTEMPTS attempts; it also re-sends or fails work whose message was lost
(jobs validating their files, dataset statistics, merges). Nothing stays "running" forever.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.conf import settings
from django.core.cache import cache
from django.db import connection, transaction
from django.db.models import Count, DateTimeField, ExpressionWrapper, F, Max, Min, Q, Sum
from django.db.models.functions import Coalesce, Now
from django.utils import timezone

from tuneplex.adapters.models import Adapter
from tuneplex.core import queue
from tuneplex.files.models import File
from tuneplex.files.services import file_statistics_finish
from tuneplex.finetuning.models import FineTuningJob
from tuneplex.finetuning.selectors import gpu_capacity
from tuneplex.finetuning.services.gpu_workers import gpu_workers_sweep
from tuneplex.finetuning.services.lifecycle import (
    job_event,
    job_fail,
    job_files_validated,
    job_mark_cancelled,
    job_requeue,
)

log = logging.getLogger(__name__)
Status = FineTuningJob.Status
Merge = Adapter.MergeStatus
# A dispatched message no worker claimed within this long is dispatched again.
DISPATCH_CLAIM_TIMEOUT = timedelta(minutes=10)
# Work whose message may have been lost is sent again after this long, at most this often.
RESEND_AFTER = timedelta(seconds=60)


def _ago(delta: timedelta):
    """A point in time on the database's clock."""
    return Now() - delta


def _lock_scheduler() -> None:
    """Serialise dispatchers (SQLite already serialises writers)."""
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(7351)")


def _in_flight() -> Q:
    return Q(status=Status.RUNNING) | Q(status=Status.QUEUED, dispatched_at__isnull=False)


def _merges_in_flight() -> Q:
    return Q(merge_status=Merge.RUNNING) | Q(merge_status=Merge.QUEUED, merge_dispatched_at__isnull=False)


def gpu_slots_in_use() -> int:
    """GPUs held by dispatched or running jobs and merges."""
    merges = Adapter.objects.filter(_merges_in_flight()).count()
    jobs = FineTuningJob.objects.filter(_in_flight()).aggregate(gpus=Coalesce(Sum("gpus"), 0))
    return jobs["gpus"] + merges


@dataclass(frozen=True)
class Work:
    """One piece of waiting GPU work: a job (``gpus`` of them) or a merge (one)."""

    kind: str  # TRAIN_JOB or MERGE_ADAPTER (its task's name)
    id: str
    gpus: int


def _per_organization(rows) -> dict[str, object]:
    return {row[0]: row[1] for row in rows}


def _busy() -> dict[str, int]:
    """Jobs and merges dispatched or running, per organization."""
    busy = _per_organization(FineTuningJob.objects.filter(_in_flight()).values("organization")
                             .annotate(n=Count("id")).values_list("organization", "n"))
    for org, merges in (Adapter.objects.filter(_merges_in_flight()).values("organization")
                        .annotate(n=Count("id")).values_list("organization", "n")):
        busy[org] = busy.get(org, 0) + merges
    return busy


def _last_dispatched() -> dict[str, datetime]:
    last = _per_organization(FineTuningJob.objects.filter(dispatched_at__isnull=False)
                             .values("organization").annotate(t=Max("dispatched_at"))
                             .values_list("organization", "t"))
    for org, at in (Adapter.objects.filter(merge_dispatched_at__isnull=False).values("organization")
                    .annotate(t=Max("merge_dispatched_at")).values_list("organization", "t")):
        last[org] = max(at, last.get(org, at))
    return last


def _waiting_jobs():
    return FineTuningJob.objects.filter(status=Status.QUEUED, dispatched_at__isnull=True)


def _waiting_merges():
    return (Adapter.objects.filter(merge_status=Merge.QUEUED, merge_dispatched_at__isnull=True)
            .annotate(since=Coalesce("merge_requested_at", "created_at")))


def next_work() -> Work | None:
    """The fair choice among undispatched jobs and merges, or None."""
    oldest: dict[str, tuple[datetime, str]] = {}  # organization -> (oldest waiting, kind)
    for org, since in (_waiting_jobs().values("organization").annotate(t=Min("created_at"))
                       .values_list("organization", "t")):
        oldest[org] = (since, queue.TRAIN_JOB)
    for org, since in (_waiting_merges().values("organization").annotate(t=Min("since"))
                       .values_list("organization", "t")):
        if org not in oldest or since < oldest[org][0]:
            oldest[org] = (since, queue.MERGE_ADAPTER)
    busy = _busy()
    candidates = [org for org in oldest if busy.get(org, 0) < settings.ORG_MAX_CONCURRENT_JOBS]
    if not candidates:
        return None
    last, epoch = _last_dispatched(), timezone.now() - timedelta(days=365 * 100)
    org = min(candidates, key=lambda o: (last.get(o) or epoch, oldest[o][0]))
    if oldest[org][1] == queue.MERGE_ADAPTER:
        merge = _waiting_merges().filter(organization=org).order_by("since", "id").first()
        return Work(queue.MERGE_ADAPTER, merge.id, 1)
    job = _waiting_jobs().filter(organization=org).order_by("created_at", "id").first()
    return Work(queue.TRAIN_JOB, job.id, job.gpus)


def _mark_dispatched(work: Work) -> bool:
    if work.kind == queue.MERGE_ADAPTER:
        return bool(Adapter.objects.filter(id=work.id, merge_status=Merge.QUEUED,
                                           merge_dispatched_at__isnull=True
                                           ).update(merge_dispatched_at=Now()))
    return bool(FineTuningJob.objects.filter(id=work.id, status=Status.QUEUED,
                                             dispatched_at__isnull=True).update(dispatched_at=Now()))


def validated_then_dispatch(job_id: str) -> None:
    """The file validation task: validating_files → queued, then dispatch into free GPU slots."""
    if job_files_validated(job_id=job_id) is not None:
        dispatch()


def dispatch() -> list[str]:
    """Send fairly chosen jobs and merges to the gpu queue for as long as GPU slots are free."""
    sent: list[Work] = []
    with transaction.atomic(durable=True):
        _lock_scheduler()
        free = gpu_capacity() - gpu_slots_in_use()
        while free > 0:
            work = next_work()
            if work is None or work.gpus > free:
                break
            if _mark_dispatched(work):
                sent.append(work)
                free -= work.gpus
        for work in sent:
            transaction.on_commit(lambda w=work: queue.enqueue(w.kind, w.id))
    return [work.id for work in sent]


def claim(*, job_id: str, worker: str) -> FineTuningJob | None:
    """queued (and dispatched) → running, exactly once: a redelivered message gets None.

    The returned job's ``attempts`` is this claim's fencing token.
    """
    job = FineTuningJob.objects.filter(id=job_id).first()
    if job is None:
        return None
    claimed = FineTuningJob.objects.filter(
        id=job_id, status=Status.QUEUED, dispatched_at__isnull=False, attempts=job.attempts,
    ).update(status=Status.RUNNING, worker=worker, heartbeat_at=Now(), attempts=job.attempts + 1,
             started_at=Coalesce("started_at", Now()))
    if not claimed:
        return None
    job.refresh_from_db()
    log.info("job %s attempt %s claimed by %s", job.id, job.attempts, worker)
    job_event(job, f"Running (attempt {job.attempts - job.attempts_at_resume} of "
                   f"{settings.JOB_MAX_ATTEMPTS}).")
    return job


def cancel_requested(*, job_id: str) -> bool:
    return FineTuningJob.objects.filter(id=job_id, cancel_requested=True).exists()


def stop_requested(*, job_id: str) -> str | None:
    """What the job's owner asked of its running attempt: "cancel" (which wins over a pause),
    "pause", or None."""
    flags = (FineTuningJob.objects.filter(id=job_id)
             .values_list("cancel_requested", "pause_requested").first())
    if flags is None:
        return None
    return "cancel" if flags[0] else "pause" if flags[1] else None


# --- sweeps ----------------------------------------------------------------------------------------


def sweep() -> dict[str, list[str]]:
    """Everything beat runs every 10 s; returns what it did, by kind."""
    done = reap()
    done.update(sweep_merges())
    done["validation_resent"], done["validation_failed"] = sweep_job_validation()
    done["statistics_resent"], done["statistics_failed"] = sweep_statistics()
    done["gpu_workers_gone"] = gpu_workers_sweep()  # also when no GPU worker is left to do it
    dispatch()
    return done


def reap() -> dict[str, list[str]]:
    """Re-queue (or pause, when asked to) or fail running jobs whose worker went silent;
    re-dispatch unclaimed messages."""
    stale = _ago(timedelta(seconds=settings.JOB_HEARTBEAT_TIMEOUT))
    requeued, paused, failed = [], [], []
    for job in FineTuningJob.objects.filter(status=Status.RUNNING, heartbeat_at__lt=stale):
        if job.cancel_requested:
            job_mark_cancelled(job=job, attempt=job.attempts)
            continue
        log.warning("job %s: worker %s stopped heartbeating", job.id, job.worker)
        # Paused instead when it was pausing: it resumes from its newest stored checkpoint.
        outcome = job_requeue(job=job, attempt=job.attempts,
                              reason=f"The worker running attempt {job.attempts} stopped "
                                     "responding.")
        {"requeued": requeued, "paused": paused, "failed": failed}.get(outcome, []).append(job.id)
    limit = timedelta(seconds=settings.JOB_MAX_RUNTIME_SECONDS)
    # Time spent paused does not count: the limit is on training, however often it is paused.
    over = ExpressionWrapper(_ago(limit) - F("paused_for"), output_field=DateTimeField())
    for job in FineTuningJob.objects.filter(status=Status.RUNNING, started_at__lt=over):
        # The worker's next heartbeat finds the job finished and stops its trainer.
        if job_fail(job=job, code="runtime_limit_exceeded",
                    message=f"The job ran longer than its limit of {limit.total_seconds() / 3600:g} "
                            "hours (TUNEPLEX_JOB_MAX_RUNTIME_SECONDS) and was stopped."):
            failed.append(job.id)
    FineTuningJob.objects.filter(status=Status.QUEUED,
                                 dispatched_at__lt=_ago(DISPATCH_CLAIM_TIMEOUT)
                                 ).update(dispatched_at=None)
    return {"requeued": requeued, "paused": paused, "failed": failed}


def sweep_merges() -> dict[str, list[str]]:
    """Merges dispatched but never claimed go back to the queue; merges running past
    TUNEPLEX_MERGE_DEADLINE_SECONDS (their worker died) fail with merge_stalled."""
    Adapter.objects.filter(merge_status=Merge.QUEUED,
                           merge_dispatched_at__lt=_ago(DISPATCH_CLAIM_TIMEOUT)
                           ).update(merge_dispatched_at=None)
    deadline = _ago(timedelta(seconds=settings.MERGE_DEADLINE_SECONDS + 60))
    stalled = list(Adapter.objects.filter(merge_status=Merge.RUNNING, merge_started_at__lt=deadline)
                   .values_list("id", flat=True))
    Adapter.objects.filter(id__in=stalled, merge_status=Merge.RUNNING).update(
        merge_status=Merge.FAILED,
        merge_error=f"merge_stalled: the merge did not finish within "
                    f"{settings.MERGE_DEADLINE_SECONDS} s (its worker stopped); request it again.")
    return {"merges_failed": stalled}


def _resend_once(kind: str, object_id: str) -> bool:
    """True at most once per RESEND_AFTER for this object, across every beat process."""
    return cache.add(f"tuneplex:resent:{kind}:{object_id}", 1, RESEND_AFTER.total_seconds())


def sweep_job_validation() -> tuple[list[str], list[str]]:
    """Jobs still validating their files: the (idempotent) task is sent again after RESEND_AFTER,
    and after TUNEPLEX_VALIDATION_DEADLINE_SECONDS the job fails with validation_stalled."""
    resent, failed = [], []
    waiting = FineTuningJob.objects.filter(status=Status.VALIDATING_FILES,
                                           created_at__lt=_ago(RESEND_AFTER))
    deadline = timedelta(seconds=settings.VALIDATION_DEADLINE_SECONDS)
    for job in waiting.filter(created_at__lt=_ago(deadline)):
        if job_fail(job=job, code="validation_stalled",
                    message=f"The job's files were not checked within {int(deadline.total_seconds())} s "
                            "(no default worker took the task). Create the job again."):
            failed.append(job.id)
    for job_id in waiting.exclude(id__in=failed).values_list("id", flat=True):
        if _resend_once("validate", job_id):
            queue.enqueue(queue.VALIDATE_JOB_FILES, job_id)
            resent.append(job_id)
    return resent, failed


def sweep_statistics() -> tuple[list[str], list[str]]:
    """Statistics pending (message lost) or running on a worker that died are sent again (the
    claim takes over a stale one); after TUNEPLEX_STATISTICS_DEADLINE_SECONDS they fail."""
    Stats = File.StatisticsStatus
    unfinished = File.objects.filter(statistics_status__in=(Stats.PENDING, Stats.RUNNING),
                                     created_at__lt=_ago(RESEND_AFTER))
    deadline = timedelta(seconds=settings.STATISTICS_DEADLINE_SECONDS)
    failed = []
    for file in unfinished.filter(created_at__lt=_ago(deadline)):
        file_statistics_finish(file=file, statistics=None,
                               error=f"statistics_stalled: not computed within "
                                     f"{int(deadline.total_seconds())} s.")
        failed.append(file.id)
    resent = []
    stale_claim = _ago(timedelta(seconds=settings.STATISTICS_TIMEOUT_SECONDS + 60))
    candidates = unfinished.exclude(id__in=failed).filter(
        Q(statistics_status=Stats.PENDING) | Q(statistics_claimed_at__lt=stale_claim))
    for file_id in candidates.values_list("id", flat=True):
        if _resend_once("statistics", file_id):
            queue.enqueue(queue.FILE_STATISTICS, file_id)
            resent.append(file_id)
    return resent, failed
