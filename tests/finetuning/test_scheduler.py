"""Fair dispatch, idempotent claims and the reaper, on the real database."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from tests.conftest import make_tenant
from tuneplex.finetuning import scheduler
from tuneplex.finetuning.models import FineTuningJob, JobCheckpoint

pytestmark = pytest.mark.django_db


def queued_job(tenant, base_model, **fields) -> FineTuningJob:
    return FineTuningJob.objects.create(organization=tenant.organization, base_model=base_model,
                                        training_file="file-x", seed=1, status="queued", **fields)


def finish(job_id: str) -> None:
    FineTuningJob.objects.filter(id=job_id).update(status="succeeded", finished_at=timezone.now())


def test_one_organization_cannot_starve_the_others(default_model, settings,
                                                   django_capture_on_commit_callbacks):
    settings.GPU_SLOTS = 1
    busy, quiet, late = make_tenant("Busy"), make_tenant("Quiet"), make_tenant("Late")
    busy_jobs = [queued_job(busy, default_model) for _ in range(4)]
    quiet_job = queued_job(quiet, default_model)
    order = []
    for round_ in range(6):
        if round_ == 2:
            late_job = queued_job(late, default_model)
        with django_capture_on_commit_callbacks(execute=False):
            sent = scheduler.dispatch()
        assert len(sent) == 1, "one free GPU slot, one dispatch"
        order.append(sent[0])
        finish(sent[0])
    owner = {j.id: "busy" for j in busy_jobs} | {quiet_job.id: "quiet", late_job.id: "late"}
    # An organization that has waited longest since its last dispatch (or never had one) goes first.
    assert [owner[j] for j in order] == ["busy", "quiet", "late", "busy", "busy", "busy"]


def test_per_organization_concurrency_limit(default_model, settings,
                                            django_capture_on_commit_callbacks):
    settings.GPU_SLOTS, settings.ORG_MAX_CONCURRENT_JOBS = 4, 2
    tenant = make_tenant("Greedy")
    for _ in range(5):
        queued_job(tenant, default_model)
    with django_capture_on_commit_callbacks(execute=False):
        assert len(scheduler.dispatch()) == 2
        assert scheduler.dispatch() == []


def test_a_redelivered_message_is_claimed_once(org_a, default_model):
    job = queued_job(org_a, default_model, dispatched_at=timezone.now())
    assert scheduler.claim(job_id=job.id, worker="w1") is not None
    assert scheduler.claim(job_id=job.id, worker="w2") is None
    job.refresh_from_db()
    assert (job.status, job.worker, job.attempts) == ("running", "w1", 1)


def test_the_reaper_requeues_a_silent_job_then_gives_up(org_a, default_model, settings,
                                                        django_capture_on_commit_callbacks):
    settings.JOB_MAX_ATTEMPTS, settings.JOB_HEARTBEAT_TIMEOUT = 2, 30
    job = queued_job(org_a, default_model, dispatched_at=timezone.now())
    scheduler.claim(job_id=job.id, worker="w1")
    JobCheckpoint.objects.create(job=job, step=4, path="/x")
    FineTuningJob.objects.filter(id=job.id).update(heartbeat_at=timezone.now() - timedelta(minutes=5))
    with django_capture_on_commit_callbacks(execute=False):
        assert scheduler.reap()["requeued"] == [job.id]
    job.refresh_from_db()
    assert job.status == "queued" and job.worker == ""
    assert job.dispatched_at is not None  # the reaper dispatched it again at once
    assert job.events.filter(message__contains="resuming from the checkpoint at step 4").exists()
    scheduler.claim(job_id=job.id, worker="w2")  # attempt 2 of 2
    FineTuningJob.objects.filter(id=job.id).update(heartbeat_at=timezone.now() - timedelta(minutes=5))
    with django_capture_on_commit_callbacks(execute=False):
        assert scheduler.reap()["failed"] == [job.id]
    job.refresh_from_db()
    assert job.status == "failed" and job.error["code"] == "worker_lost"


def test_a_live_job_is_left_alone(org_a, default_model, django_capture_on_commit_callbacks):
    job = queued_job(org_a, default_model, dispatched_at=timezone.now())
    scheduler.claim(job_id=job.id, worker="w1")
    with django_capture_on_commit_callbacks(execute=False):
        assert scheduler.reap() == {"requeued": [], "failed": []}
    assert FineTuningJob.objects.get(id=job.id).status == "running"
