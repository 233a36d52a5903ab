"""Every read of sweeps and their trials: always within one organization (another's is a 404)."""

from __future__ import annotations

from django.conf import settings
from django.db.models import Q, QuerySet

from tuneplex.core.errors import NotFound
from tuneplex.finetuning.models import FineTuningJob, JobEvent
from tuneplex.sweeps.models import Sweep, SweepTrial
from tuneplex.tenancy.models import Organization


def sweep_list(*, organization: Organization) -> QuerySet[Sweep]:
    return Sweep.objects.filter(organization=organization).select_related("best_trial__job")


def sweep_get(*, organization: Organization, sweep_id: str) -> Sweep:
    found = sweep_list(organization=organization).filter(id=sweep_id).first()
    if found is None:
        raise NotFound(f"No such sweep: {sweep_id}.", param="sweep_id")
    return found


def trial_list(*, sweep: Sweep) -> QuerySet[SweepTrial]:
    return (SweepTrial.objects.filter(organization_id=sweep.organization_id, sweep=sweep)
            .select_related("job").order_by("number"))


def active_sweeps(*, organization: Organization) -> int:
    return Sweep.objects.filter(organization=organization, status=Sweep.Status.RUNNING).count()


def trials_in_flight(*, sweep: Sweep) -> int:
    """Trials waiting for their job, or whose job has not ended (a pruned trial's job counts
    until its worker has stopped it)."""
    return trial_list(sweep=sweep).filter(
        Q(state__in=SweepTrial.ACTIVE) | Q(job__status__in=FineTuningJob.ACTIVE)).count()


def parallel_limit(*, sweep: Sweep) -> int:
    """Trials the sweep may have in flight: as requested, never more than the organization's
    concurrency limit (the scheduler's TUNEPLEX_ORG_MAX_CONCURRENT_JOBS)."""
    return min(sweep.max_parallel or settings.ORG_MAX_CONCURRENT_JOBS,
               settings.ORG_MAX_CONCURRENT_JOBS)


def validation_losses(*, job: FineTuningJob) -> list[tuple[int, float]]:
    """(step, validation loss) of each evaluation the job's trainer reported, oldest first; a
    step reported again by a resumed attempt counts once (its first report)."""
    rows = (JobEvent.objects.filter(job=job, job__organization_id=job.organization_id,
                                    type="metrics", data__has_key="eval_loss")
            .order_by("created_at", "id").values_list("data", flat=True))
    seen: dict[int, float] = {}
    for data in rows:
        step, loss = data.get("step"), data.get("eval_loss")
        if isinstance(step, int) and isinstance(loss, (int, float)) and step not in seen:
            seen[step] = float(loss)
    return list(seen.items())


def job_of_trial(*, sweep: Sweep, number: int) -> FineTuningJob | None:
    """The job a step created for trial ``number`` (its metadata says so), if the step stopped
    before it could record it on the trial."""
    return (FineTuningJob.objects.filter(organization_id=sweep.organization_id,
                                         metadata__sweep_id=sweep.id,
                                         metadata__sweep_trial=str(number))
            .order_by("created_at").first())
