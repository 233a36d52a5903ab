"""The GPU worker's runner around the trainer: blips, worker errors, and the import boundary."""

from __future__ import annotations

import ast
import sys
from pathlib import Path
from unittest import mock

import pytest
from django.db import OperationalError
from django.utils import timezone
from tuneplex.finetuning import runner, scheduler
from tuneplex.finetuning.models import FineTuningJob, JobCheckpoint
from tuneplex.finetuning.services.worker_writes import StaleAttempt

from jobs.training import protocol

REPO = Path(__file__).resolve().parents[2]


def test_a_write_is_retried_through_database_errors(monkeypatch):
    monkeypatch.setattr(runner.time, "sleep", lambda seconds: None)
    outcomes = [OperationalError("server closed the connection"), OperationalError("again"), "ok"]

    def write():
        outcome = outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    assert runner.persist(write, what="metrics", give_up_after=60) == "ok"
    assert outcomes == []


def test_a_progress_write_is_dropped_after_its_deadline_but_the_run_goes_on(monkeypatch):
    clock = iter(range(0, 1000, 30))
    monkeypatch.setattr(runner.time, "monotonic", lambda: next(clock))
    monkeypatch.setattr(runner.time, "sleep", lambda seconds: None)
    calls = []

    def write():
        calls.append(1)
        raise OperationalError("down")

    assert runner.persist(write, what="metrics", give_up_after=60) is None
    assert len(calls) == 3  # t=30 and t=60 retried, t=90 past the deadline


def test_a_superseded_attempt_is_never_retried():
    calls = []

    def write():
        calls.append(1)
        raise StaleAttempt("attempt 1")

    with pytest.raises(StaleAttempt):
        runner.persist(write, what="success", give_up_after=None)
    assert calls == [1]


@pytest.fixture
def claimed_job(org_a, default_model):
    job = FineTuningJob.objects.create(organization=org_a.organization, base_model=default_model,
                                       training_file="file-x", seed=1, status="queued",
                                       dispatched_at=timezone.now())
    return job


@pytest.mark.django_db
def test_a_worker_error_after_a_checkpoint_requeues_the_job(claimed_job, monkeypatch,
                                                            django_capture_on_commit_callbacks):
    def broken_setup(self, scope):
        JobCheckpoint.objects.create(job=self.job, step=4, attempt=self.attempt, blob_prefix="p")
        raise OSError("No space left on device")

    monkeypatch.setattr(runner.JobRun, "setup", broken_setup)
    with django_capture_on_commit_callbacks(execute=False):
        assert runner.run_job(claimed_job.id) == "queued"
    job = FineTuningJob.objects.get(id=claimed_job.id)
    assert job.status == "queued" and job.error is None
    message = job.events.get(level="warn").message
    assert "resumes from the checkpoint at step 4" in message
    assert "No space left" not in message  # the worker's internals stay in its log


@pytest.mark.django_db
def test_a_worker_error_without_a_checkpoint_fails_the_job(claimed_job, monkeypatch,
                                                           django_capture_on_commit_callbacks):
    monkeypatch.setattr(runner.JobRun, "setup", mock.Mock(side_effect=OSError("disk gone")))
    with django_capture_on_commit_callbacks(execute=False):
        assert runner.run_job(claimed_job.id) == "failed"
    job = FineTuningJob.objects.get(id=claimed_job.id)
    assert job.status == "failed" and job.error["code"] == "worker_error"
    assert "disk gone" not in job.error["message"]


# A trainer that says what the real one says, in its protocol, between lines of other shapes.
FAKE_TRAINER = """
import sys
from jobs.training import protocol

print("Loading weights: 100%|##########| 272/272")  # library chatter that reached stdout
print(protocol.Event("Memory plan: whole micro-batches.", data={"split": False}).to_json())
print('{"type": "metrics", "data": {"step": 9, "total_st')  # a line cut short
print(protocol.Metrics({"step": 1, "total_steps": 4, "train_loss": 2.5, "tokens_per_second": 80.0,
                        "trained_tokens": 120}).to_json())
print('{"type": "telemetry", "data": {}}')
print(protocol.Error(code="out_of_memory", message="Out of memory on the CPU: an allocation of "
                     "16 GiB failed. Lower batch_size or max_seq_len.").to_json())
sys.exit(protocol.EXIT_ERROR)
"""


@pytest.mark.django_db
def test_the_runner_acts_on_the_trainers_messages_and_skips_other_lines(
        claimed_job, monkeypatch, settings, tmp_path, django_capture_on_commit_callbacks):
    settings.WORK_DIR = tmp_path
    monkeypatch.setattr(runner, "trainer_command",
                        lambda module, *args, processes=1: [sys.executable, "-c", FAKE_TRAINER])
    job = scheduler.claim(job_id=claimed_job.id, worker="test-worker")
    run = runner.JobRun(job, "test-worker")
    run.work.mkdir(parents=True)
    with django_capture_on_commit_callbacks(execute=False):
        result, error, returncode = run.supervise(run.work / "config.json")
        assert (result, returncode) == (None, protocol.EXIT_ERROR), (run.work / "trainer.log"
                                                                    ).read_text()
        assert isinstance(error, protocol.Error) and error.code == "out_of_memory"
        assert run.finish(result, error, returncode) == "failed"
    job.refresh_from_db()
    assert job.status == "failed" and job.error["code"] == "out_of_memory"
    assert job.error["message"].startswith("Out of memory on the CPU: an allocation of 16 GiB")
    assert (job.step, job.total_steps, job.trained_tokens) == (1, 4, 120)
    events = list(job.events.values_list("type", "message", "data"))
    assert ("message", "Memory plan: whole micro-batches.", {"split": False}) in events
    assert [data["step"] for kind, _, data in events if kind == "metrics"] == [1]


def test_the_platform_never_imports_jobs_tasks():
    """Work is enqueued by task name (tuneplex.core.queue); jobs/tasks.py may import the
    platform, never the other way round."""
    offenders = []
    for folder in ("platform", "frontend", "serving"):
        for path in (REPO / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                         [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
                if isinstance(node, ast.ImportFrom) and node.module == "jobs":
                    names += [f"jobs.{a.name}" for a in node.names]
                offenders += [f"{path.relative_to(REPO)}: {n}" for n in names
                              if n == "jobs.tasks" or n.startswith("jobs.tasks.")]
    assert offenders == []


@pytest.mark.django_db
def test_a_polled_chart_reads_a_bounded_sample_with_the_newest_point(claimed_job):
    from tuneplex.finetuning.models import JobEvent
    from tuneplex.finetuning.selectors import job_metrics_sampled

    JobEvent.objects.bulk_create([JobEvent(job=claimed_job, type="metrics", message=f"s{i}",
                                           data={"step": i}) for i in range(1, 1001)])
    sampled = job_metrics_sampled(job=claimed_job, at_most=200)
    steps = [row["step"] for row in sampled]
    assert len(steps) <= 201 and steps[0] == 1 and steps[-1] == 1000
    assert steps == sorted(steps) and steps[1] - steps[0] == 5
    assert [r["step"] for r in job_metrics_sampled(job=claimed_job, at_most=5000)] == list(
        range(1, 1001))


@pytest.mark.django_db
def test_the_quota_counts_adapters_merged_exports_and_checkpoints(org_a, default_model, settings):
    from tests.conftest import bearer
    from tests.fixtures.adapter_rows import adapter_row
    from tuneplex.adapters.models import Adapter
    from tuneplex.files.selectors import storage_used

    from tests.finetuning.conftest import upload
    from tests.fixtures.datasets import lines_to_bytes, pirate_lines

    file_id = upload(org_a, lines_to_bytes(pirate_lines(24)))
    datasets = storage_used(organization=org_a.organization)
    adapter = adapter_row(org_a.organization, default_model)
    Adapter.objects.filter(id=adapter.id).update(bytes=1000, merged_bytes=5000)
    JobCheckpoint.objects.create(job=adapter.job, step=2, attempt=1, blob_prefix="p", bytes=300)
    assert storage_used(organization=org_a.organization) == datasets + 6300
    org_a.organization.storage_quota_bytes = datasets + 6300
    org_a.organization.save()
    client = bearer(org_a.owner_key)
    merge = client.post(f"/v1/adapters/{adapter.id}/merge")
    assert merge.status_code == 403 and merge.json()["error"]["code"] == "storage_quota_exceeded"
    job = client.post("/v1/fine_tuning/jobs", {"model": default_model.name,
                                               "training_file": file_id}, format="json")
    assert job.status_code == 403 and job.json()["error"]["code"] == "storage_quota_exceeded"
    assert Adapter.objects.get(id=adapter.id).merge_status == "none"
    assert list(FineTuningJob.objects.filter(organization=org_a.organization)) == [adapter.job]
