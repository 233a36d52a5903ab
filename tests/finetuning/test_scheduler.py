"""Fair dispatch, idempotent claims and the reaper, on the real database."""

from __future__ import annotations

from datetime import timedelta
from unittest import mock

import pytest
from django.utils import timezone
from tuneplex.adapters.merging import merge_claim
from tuneplex.adapters.models import Adapter
from tuneplex.core.storage import list_prefix, upload_directory
from tuneplex.finetuning import scheduler
from tuneplex.finetuning.models import FineTuningJob, JobCheckpoint
from tuneplex.core.storage_layout import checkpoint_prefix
from tuneplex.finetuning.services.lifecycle import job_fail
from tuneplex.finetuning.services.worker_writes import (
    StaleAttempt,
    job_holds,
    job_record_checkpoint,
    job_record_metrics,
    job_succeed,
)

from tests.conftest import make_tenant

pytestmark = pytest.mark.django_db


def queued_job(tenant, base_model, **fields) -> FineTuningJob:
    fields.setdefault("status", "queued")
    return FineTuningJob.objects.create(organization=tenant.organization, base_model=base_model,
                                        training_file="file-x", seed=1, **fields)


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


def test_the_scheduler_counts_gpus_and_a_big_job_is_not_overtaken(default_model, settings,
                                                                  django_capture_on_commit_callbacks):
    settings.GPU_SLOTS, settings.ORG_MAX_CONCURRENT_JOBS = 4, 4
    first, big_org, small_org = make_tenant("First"), make_tenant("Big"), make_tenant("Small")
    running = queued_job(first, default_model, gpus=3)
    with django_capture_on_commit_callbacks(execute=False):
        assert scheduler.dispatch() == [running.id]
    assert scheduler.gpu_slots_in_use() == 3
    big = queued_job(big_org, default_model, gpus=2)
    small = queued_job(small_org, default_model, gpus=1)
    with django_capture_on_commit_callbacks(execute=False):
        # One GPU is free: the fair next job needs two, and the one-GPU job behind it waits too.
        assert scheduler.dispatch() == []
        finish(running.id)
        assert scheduler.dispatch() == [big.id, small.id]
    assert scheduler.gpu_slots_in_use() == 3


def test_a_redelivered_message_is_claimed_once(org_a, default_model):
    job = queued_job(org_a, default_model, dispatched_at=timezone.now())
    assert scheduler.claim(job_id=job.id, worker="w1") is not None
    assert scheduler.claim(job_id=job.id, worker="w2") is None
    job.refresh_from_db()
    assert (job.status, job.worker, job.attempts) == ("running", "w1", 1)


def silence(job_id: str) -> None:
    FineTuningJob.objects.filter(id=job_id).update(heartbeat_at=timezone.now() - timedelta(minutes=5))


def test_the_reaper_requeues_a_silent_job_then_gives_up(org_a, default_model, settings,
                                                        django_capture_on_commit_callbacks):
    settings.JOB_MAX_ATTEMPTS, settings.JOB_HEARTBEAT_TIMEOUT = 2, 30
    job = queued_job(org_a, default_model, dispatched_at=timezone.now())
    scheduler.claim(job_id=job.id, worker="w1")
    JobCheckpoint.objects.create(job=job, step=4, attempt=1, blob_prefix="p/step-4-a1")
    silence(job.id)
    with django_capture_on_commit_callbacks(execute=False):
        done = scheduler.sweep()
    assert done["requeued"] == [job.id]
    job.refresh_from_db()
    assert job.status == "queued" and job.worker == ""
    assert job.dispatched_at is not None  # the sweep dispatched it again at once
    assert job.events.filter(message__contains="resumes from the checkpoint at step 4 in storage"
                             ).exists()
    scheduler.claim(job_id=job.id, worker="w2")  # attempt 2 of 2
    silence(job.id)
    with django_capture_on_commit_callbacks(execute=False):
        assert scheduler.reap()["failed"] == [job.id]
    job.refresh_from_db()
    assert job.status == "failed" and job.error["code"] == "worker_lost"


def test_a_live_job_is_left_alone(org_a, default_model, django_capture_on_commit_callbacks):
    job = queued_job(org_a, default_model, dispatched_at=timezone.now())
    scheduler.claim(job_id=job.id, worker="w1")
    with django_capture_on_commit_callbacks(execute=False):
        assert scheduler.reap() == {"requeued": [], "paused": [], "failed": []}
    assert FineTuningJob.objects.get(id=job.id).status == "running"


def test_timeouts_use_the_database_clock_not_the_workers(org_a, default_model, settings,
                                                         django_capture_on_commit_callbacks):
    """A worker (or reaper) whose clock runs an hour fast neither looks alive nor kills live jobs."""
    settings.JOB_HEARTBEAT_TIMEOUT = 30
    job = queued_job(org_a, default_model, dispatched_at=timezone.now())
    scheduler.claim(job_id=job.id, worker="w1")
    fast = timezone.now() + timedelta(hours=1)
    with mock.patch("django.utils.timezone.now", return_value=fast), \
            django_capture_on_commit_callbacks(execute=False):
        assert scheduler.reap()["requeued"] == []  # the heartbeat is fresh by the database's clock
        assert job_holds(job_id=job.id, attempt=1)
    heartbeat = FineTuningJob.objects.get(id=job.id).heartbeat_at
    assert abs(heartbeat - timezone.now()) < timedelta(minutes=1)  # stamped by the database


def test_a_superseded_attempt_changes_nothing(org_a, default_model, settings, tmp_path,
                                              django_capture_on_commit_callbacks):
    """Attempt 1 was re-queued and attempt 2 holds the job: 1's writes are all refused."""
    job = queued_job(org_a, default_model, dispatched_at=timezone.now())
    scheduler.claim(job_id=job.id, worker="w1")
    silence(job.id)
    with django_capture_on_commit_callbacks(execute=False):
        assert scheduler.sweep()["requeued"] == [job.id]
    assert scheduler.claim(job_id=job.id, worker="w2").attempts == 2
    events_before = job.events.count()

    assert not job_holds(job_id=job.id, attempt=1)
    with pytest.raises(StaleAttempt):
        job_record_metrics(job=job, attempt=1, metrics={"step": 9, "total_steps": 10,
                                                        "train_loss": 0.1})
    with pytest.raises(StaleAttempt):
        job_record_checkpoint(job=job, attempt=1, step=9, blob_prefix="p/step-9-a1", metrics={})
    adapter_dir = tmp_path / "adapter"
    adapter_dir.mkdir()
    (adapter_dir / "adapter_config.json").write_text('{"r": 8}')
    (adapter_dir / "adapter_model.safetensors").write_bytes(b"x")
    assert job_succeed(job=job, attempt=1, adapter_dir=adapter_dir, result={"sha256": "0" * 64}) is False
    job_fail(job=job, code="training_error", message="late", attempt=1)

    job.refresh_from_db()
    assert (job.status, job.worker, job.attempts, job.step) == ("running", "w2", 2, 0)
    assert job.events.count() == events_before and not job.checkpoints.exists()
    assert not Adapter.objects.filter(job=job).exists()
    assert list_prefix(f"orgs/{org_a.organization.id}/adapters") == []
    # The holder's writes still count.
    job_record_metrics(job=job, attempt=2, metrics={"step": 1, "total_steps": 10, "train_loss": 1.0})
    assert FineTuningJob.objects.get(id=job.id).step == 1


def test_only_the_newest_checkpoints_are_kept_in_storage(org_a, default_model, settings, tmp_path,
                                                         django_capture_on_commit_callbacks):
    settings.JOB_KEEP_CHECKPOINTS = 2
    job = queued_job(org_a, default_model, dispatched_at=timezone.now())
    scheduler.claim(job_id=job.id, worker="w1")
    for step in (2, 4, 6):
        prefix = checkpoint_prefix(job.organization_id, job.id, attempt=1, step=step)
        (tmp_path / "trainer_state.json").write_text("{}")
        upload_directory(tmp_path, prefix, ["trainer_state.json"])
        with django_capture_on_commit_callbacks(execute=True):
            job_record_checkpoint(job=job, attempt=1, step=step, blob_prefix=prefix, metrics={})
    assert sorted(job.checkpoints.values_list("step", flat=True)) == [4, 6]
    stored = list_prefix(f"orgs/{org_a.organization.id}/jobs/{job.id}/checkpoints")
    assert [name.split("/")[-2] for name in stored] == ["step-4-a1", "step-6-a1"]

    # A job continued from the step-4 checkpoint keeps it (beyond the newest two) while it is
    # unfinished; once it has finished, the next checkpoint drops it.
    child = queued_job(org_a, default_model)
    FineTuningJob.objects.filter(id=child.id).update(parent_checkpoint=job.checkpoints.get(step=4))

    def save(step: int) -> None:
        prefix = checkpoint_prefix(job.organization_id, job.id, attempt=1, step=step)
        upload_directory(tmp_path, prefix, ["trainer_state.json"])
        with django_capture_on_commit_callbacks(execute=True):
            job_record_checkpoint(job=job, attempt=1, step=step, blob_prefix=prefix, metrics={})

    save(8)
    assert sorted(job.checkpoints.values_list("step", flat=True)) == [4, 6, 8]
    assert list_prefix(checkpoint_prefix(job.organization_id, job.id, attempt=1, step=4))
    FineTuningJob.objects.filter(id=child.id).update(status="succeeded")
    save(10)
    assert sorted(job.checkpoints.values_list("step", flat=True)) == [8, 10]
    assert not list_prefix(checkpoint_prefix(job.organization_id, job.id, attempt=1, step=4))


def test_a_merge_takes_a_gpu_slot(org_a, default_model, settings,
                                  django_capture_on_commit_callbacks):
    settings.GPU_SLOTS = 1
    done = queued_job(org_a, default_model, status="succeeded")
    adapter = Adapter.objects.create(organization=org_a.organization, job=done,
                                     base_model=default_model, name="ft:x", blob_prefix="p",
                                     sha256="0", bytes=1, rank=8, merge_status="queued")
    waiting = queued_job(org_a, default_model)
    with django_capture_on_commit_callbacks(execute=False):
        assert scheduler.dispatch() == [adapter.id]  # the organization's oldest waiting work
        assert scheduler.dispatch() == []  # the slot is taken by the merge
    assert merge_claim(adapter.id) is not None and merge_claim(adapter.id) is None
    Adapter.objects.filter(id=adapter.id).update(merge_status="succeeded")
    with django_capture_on_commit_callbacks(execute=False):
        assert scheduler.dispatch() == [waiting.id]


def test_the_sweep_fails_a_merge_whose_worker_died(org_a, default_model, settings,
                                                   django_capture_on_commit_callbacks):
    settings.MERGE_DEADLINE_SECONDS = 60
    done = queued_job(org_a, default_model, status="succeeded")
    adapter = Adapter.objects.create(organization=org_a.organization, job=done,
                                     base_model=default_model, name="ft:y", blob_prefix="p",
                                     sha256="0", bytes=1, rank=8, merge_status="running",
                                     merge_started_at=timezone.now() - timedelta(minutes=5))
    with django_capture_on_commit_callbacks(execute=False):
        assert scheduler.sweep()["merges_failed"] == [adapter.id]
    adapter.refresh_from_db()
    assert adapter.merge_status == "failed" and adapter.merge_error.startswith("merge_stalled")


def test_the_sweep_resends_lost_validation_then_fails_it(org_a, default_model, settings,
                                                         django_capture_on_commit_callbacks):
    settings.VALIDATION_DEADLINE_SECONDS = 600
    job = queued_job(org_a, default_model, status="validating_files")
    old = queued_job(org_a, default_model, status="validating_files")
    FineTuningJob.objects.filter(id=job.id).update(created_at=timezone.now() - timedelta(minutes=2))
    FineTuningJob.objects.filter(id=old.id).update(created_at=timezone.now() - timedelta(hours=1))
    with mock.patch("tuneplex.core.queue.enqueue") as enqueue, \
            django_capture_on_commit_callbacks(execute=False):
        first, second = scheduler.sweep(), scheduler.sweep()
    assert first["validation_resent"] == [job.id] and second["validation_resent"] == []
    enqueue.assert_any_call("tuneplex.jobs.validate_files", job.id)
    assert first["validation_failed"] == [old.id]
    old.refresh_from_db()
    assert old.status == "failed" and old.error["code"] == "validation_stalled"


def test_the_sweep_resends_lost_statistics_then_fails_them(org_a, settings,
                                                           django_capture_on_commit_callbacks):
    from tuneplex.files.models import File

    def a_file(age: timedelta, status: str) -> File:
        file = File.objects.create(organization=org_a.organization, filename="f.jsonl",
                                   purpose="fine-tune", bytes=1, sha256="0", blob_name=f"b-{status}-{age}",
                                   status="processed", statistics_status=status)
        File.objects.filter(id=file.id).update(created_at=timezone.now() - age)
        return file

    lost = a_file(timedelta(minutes=2), "pending")
    fresh = a_file(timedelta(seconds=1), "pending")
    abandoned = a_file(timedelta(days=1), "running")
    with mock.patch("tuneplex.core.queue.enqueue") as enqueue, \
            django_capture_on_commit_callbacks(execute=False):
        done = scheduler.sweep()
    assert done["statistics_resent"] == [lost.id] and fresh.id not in done["statistics_resent"]
    enqueue.assert_any_call("tuneplex.files.statistics", lost.id)
    assert done["statistics_failed"] == [abandoned.id]
    abandoned.refresh_from_db()
    assert abandoned.statistics_status == "failed"


def test_a_job_past_its_runtime_limit_is_failed(org_a, default_model, settings,
                                                django_capture_on_commit_callbacks):
    settings.JOB_MAX_RUNTIME_SECONDS = 3600
    job = queued_job(org_a, default_model, dispatched_at=timezone.now())
    scheduler.claim(job_id=job.id, worker="w1")
    young = queued_job(org_a, default_model, dispatched_at=timezone.now())
    scheduler.claim(job_id=young.id, worker="w2")
    FineTuningJob.objects.filter(id=job.id).update(started_at=timezone.now() - timedelta(hours=2))
    with django_capture_on_commit_callbacks(execute=False):
        assert scheduler.reap()["failed"] == [job.id]
    job.refresh_from_db()
    assert job.status == "failed" and job.error["code"] == "runtime_limit_exceeded"
    assert not job_holds(job_id=job.id, attempt=1)  # its worker stops at the next heartbeat
    assert FineTuningJob.objects.get(id=young.id).status == "running"


def _merge_waiting(tenant, base_model, name: str) -> Adapter:
    done = queued_job(tenant, base_model, status="succeeded")
    return Adapter.objects.create(organization=tenant.organization, job=done, base_model=base_model,
                                  name=name, blob_prefix="p", sha256="0", bytes=1, rank=8,
                                  merge_status="queued", merge_requested_at=timezone.now())


def test_merges_count_against_their_organization_and_take_turns_with_other_jobs(
        default_model, settings, django_capture_on_commit_callbacks):
    """Before, merges went first with no limit: one organization's merges took every GPU."""
    settings.GPU_SLOTS, settings.ORG_MAX_CONCURRENT_JOBS = 2, 1
    merger, trainer = make_tenant("Merger"), make_tenant("Trainer")
    merges = [_merge_waiting(merger, default_model, f"ft:m{i}") for i in range(3)]
    job = queued_job(trainer, default_model)
    with django_capture_on_commit_callbacks(execute=False):
        assert sorted(scheduler.dispatch()) == sorted([merges[0].id, job.id])
        assert scheduler.dispatch() == []  # the merger is at its limit; no GPU is free anyway
    settings.GPU_SLOTS = 3
    with django_capture_on_commit_callbacks(execute=False):
        assert scheduler.dispatch() == []  # a free GPU, but the merger is at its limit


def test_a_dispatch_reads_a_row_per_organization_not_the_whole_queue(
        default_model, settings, django_capture_on_commit_callbacks):
    """Before, every dispatch loaded every waiting job of every organization."""
    from django.db import connection

    settings.GPU_SLOTS = 1
    crowd, other = make_tenant("Crowd"), make_tenant("Other")
    FineTuningJob.objects.bulk_create(
        FineTuningJob(organization=crowd.organization, base_model=default_model, status="queued",
                      training_file="file-x", seed=1) for _ in range(300))
    queued_job(other, default_model)
    rows: list[int] = []

    def count_rows(execute, sql, params, many, context):
        result = execute(sql, params, many, context)
        rows.append(context["cursor"].rowcount)
        return result

    with connection.execute_wrapper(count_rows), django_capture_on_commit_callbacks(execute=False):
        assert len(scheduler.dispatch()) == 1
    assert rows and max(rows) <= 3, rows
