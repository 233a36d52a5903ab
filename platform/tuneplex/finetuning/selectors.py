from __future__ import annotations

from datetime import timedelta

from django.conf import settings
from django.db.models import F, Q, QuerySet, Sum, Window
from django.db.models.fields.json import KeyTextTransform
from django.db.models.functions import Coalesce, Mod, Now, RowNumber

from tuneplex.core.errors import NotFound
from tuneplex.core.storage import list_prefix
from tuneplex.core.storage_layout import tensorboard_prefix, wandb_prefix
from tuneplex.finetuning.models import FineTuningJob, GpuWorker, JobCheckpoint, JobEvent
from tuneplex.tenancy.models import Organization


def job_list(*, organization: Organization, metadata: dict[str, str] | None = None,
             without_metadata: bool = False) -> QuerySet[FineTuningJob]:
    """The organization's jobs; those whose metadata has every pair of ``metadata``, or with
    ``without_metadata`` those that have none."""
    jobs = FineTuningJob.objects.filter(organization=organization).select_related("base_model")
    if without_metadata:
        jobs = jobs.filter(metadata__isnull=True)
    for index, (key, value) in enumerate((metadata or {}).items()):
        # The key taken literally (no "__" path), its value compared as text.
        jobs = jobs.alias(**{f"metadata_{index}": KeyTextTransform(key, "metadata")}).filter(
            **{f"metadata_{index}": value})
    return jobs


def job_get(*, organization: Organization, job_id: str) -> FineTuningJob:
    job = job_list(organization=organization).filter(id=job_id).first()
    if job is None:
        raise NotFound(f"No such fine-tuning job: {job_id}.", param="fine_tuning_job_id")
    return job


def job_events(*, job: FineTuningJob) -> QuerySet[JobEvent]:
    return JobEvent.objects.filter(job=job)


def job_checkpoints(*, job: FineTuningJob) -> QuerySet[JobCheckpoint]:
    return JobCheckpoint.objects.filter(job=job)


def job_tensorboard_files(*, job: FineTuningJob) -> list[str]:
    """The job's TensorBoard event files in artifact storage (one per attempt), oldest first."""
    return sorted(list_prefix(tensorboard_prefix(job.organization_id, job.id)))


def job_wandb_files(*, job: FineTuningJob) -> list[tuple[str, str]]:
    """The job's stored W&B run files: (blob name, path under the job's wandb folder), sorted."""
    prefix = wandb_prefix(job.organization_id, job.id)
    return sorted((blob, blob[len(prefix) + 1:]) for blob in list_prefix(prefix))


def active_job_using_file(*, file) -> str | None:
    job = (FineTuningJob.objects.filter(organization_id=file.organization_id,
                                        status__in=FineTuningJob.ACTIVE)
           .filter(Q(training_file=file.id) | Q(validation_file=file.id)).first())
    return job.id if job else None


def job_metrics(*, job: FineTuningJob) -> QuerySet:
    """The metrics the trainer reported (step, train_loss, eval_loss, ...), oldest first."""
    return (JobEvent.objects.filter(job=job, type="metrics").order_by("created_at", "id")
            .values_list("data", flat=True))


def job_metrics_sampled(*, job: FineTuningJob, at_most: int) -> list[dict]:
    """At most about ``at_most`` metric rows, evenly spread, always with the newest: what a
    polled chart reads, whatever the job's length (the database samples; no row is read twice)."""
    rows = JobEvent.objects.filter(job=job, type="metrics")
    total = rows.count()
    if total <= at_most:
        return list(job_metrics(job=job))
    stride = -(-total // at_most)
    numbered = rows.annotate(n=Window(RowNumber(), order_by=[F("created_at").asc(), F("id").asc()]))
    picked = numbered.annotate(phase=Mod(F("n") - 1, stride)).filter(Q(phase=0) | Q(n=total))
    return list(picked.order_by("created_at", "id").values_list("data", flat=True))


# --- GPU workers: the platform's, not an organization's (the scheduler's and operators' view) --


def _gpu_worker_window():
    """The oldest heartbeat still counted, on the database's clock."""
    beats = settings.GPU_WORKER_HEARTBEAT_SECONDS * GpuWorker.MISSED_BEATS
    return Now() - timedelta(seconds=beats)


def gpu_workers_live() -> QuerySet[GpuWorker]:
    """The GPU workers that beat within their last MISSED_BEATS beats."""
    return GpuWorker.objects.filter(heartbeat_at__gte=_gpu_worker_window())


def gpu_workers_silent() -> QuerySet[GpuWorker]:
    """Registered workers that missed MISSED_BEATS beats (killed, or cut off): not counted."""
    return GpuWorker.objects.filter(heartbeat_at__lt=_gpu_worker_window())


def gpu_capacity() -> int:
    """The GPU slots the scheduler fills: TUNEPLEX_GPU_SLOTS when the operator set it, else the
    GPUs of the live GPU workers (0 while none is registered: work then waits queued)."""
    if settings.GPU_SLOTS is not None:
        return settings.GPU_SLOTS
    return gpu_workers_live().aggregate(gpus=Coalesce(Sum("gpus"), 0))["gpus"]
