"""The GPU worker's runner around the trainer: blips, worker errors, and the import boundary."""

from __future__ import annotations

import ast
from pathlib import Path
from unittest import mock

import pytest
from django.db import OperationalError
from django.utils import timezone

from tuneplex.finetuning import runner
from tuneplex.finetuning.models import FineTuningJob, JobCheckpoint
from tuneplex.finetuning.services import StaleAttempt

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
