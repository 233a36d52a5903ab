"""End to end on the CPU: a 4-trial sweep of SmolLM2-135M, stepped by a real Celery beat, its
trials trained by a real GPU-queue worker as normal jobs, on real Redis and PostgreSQL."""

from __future__ import annotations

import time

import optuna
import pytest
from django.core.management import call_command
from tuneplex.finetuning.models import FineTuningJob, JobEvent
from tuneplex.sweeps import study
from tuneplex.sweeps.models import Sweep

from tests.conftest import bearer
from tests.finetuning.conftest import upload
from tests.fixtures.datasets import lines_to_bytes, pirate_lines
from tests.sweeps.conftest import MODEL

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


def most_at_once(intervals: list[tuple[float, float]]) -> int:
    """The most intervals that overlap at any instant (one ending as another starts: not both)."""
    edges = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    most = now = 0
    for _, change in edges:
        now += change
        most = max(most, now)
    return most


@pytest.fixture
def ready(celery_worker, db):
    call_command("prepare_default_model")


def test_a_sweep_runs_its_trials_within_the_limit_and_marks_the_best(ready, gpu_workers, beat,
                                                                    org_a, settings):
    settings.DATASET_MIN_EXAMPLES = 2  # tiny files, checked here at upload
    gpu_workers()
    beat(TUNEPLEX_SWEEP_STEP_SECONDS="2")
    client = bearer(org_a.owner_key)
    created = client.post("/v1/sweeps", {
        "model": MODEL, "suffix": "pirate",
        "training_file": upload(org_a, lines_to_bytes(pirate_lines(4))),
        "validation_file": upload(org_a, lines_to_bytes(pirate_lines(2, seed=1))),
        # Tiny trials: two steps of two short examples, each evaluated on two more.
        "hyperparameters": {"n_epochs": 1, "batch_size": 2, "max_seq_len": 64,
                            "eval_every_steps": 1},
        "search_space": {"learning_rate": {"type": "float", "low": 1e-5, "high": 3e-3, "log": True},
                         "lora_rank": {"type": "categorical", "choices": [4, 8]}},
        "sampler": "tpe", "pruner": "median", "pruner_startup_trials": 1, "max_trials": 4,
        "seed": 3}, format="json")
    assert created.status_code == 200, created.content
    sweep_id, allowed = created.json()["id"], created.json()["parallel"]
    assert allowed == 1  # the organization's concurrency limit (TUNEPLEX_ORG_MAX_CONCURRENT_JOBS)

    # Watch the sweep's jobs while it runs: never more alive (created, not ended) than allowed.
    most_alive = most_running = 0
    deadline = time.monotonic() + 300
    while Sweep.objects.get(id=sweep_id).status == "running":
        assert time.monotonic() < deadline, client.get(f"/v1/sweeps/{sweep_id}").json()
        jobs = FineTuningJob.objects.filter(metadata__sweep_id=sweep_id)
        most_alive = max(most_alive, jobs.filter(status__in=FineTuningJob.ACTIVE).count())
        most_running = max(most_running, jobs.filter(status="running").count())
        time.sleep(0.5)

    body = client.get(f"/v1/sweeps/{sweep_id}").json()
    assert body["status"] == "completed", body
    trials = body["trials"]
    assert [t["number"] for t in trials] == [0, 1, 2, 3]
    assert {t["state"] for t in trials} <= {"complete", "pruned"}, trials
    assert most_alive == most_running == 1
    # The same from the jobs' own times afterwards (created → finished, started → finished).
    jobs = {job.id: job for job in FineTuningJob.objects.filter(metadata__sweep_id=sweep_id)}
    assert sorted(jobs) == sorted(t["job_id"] for t in trials)
    assert most_at_once([(j.created_at, j.finished_at) for j in jobs.values()]) <= allowed
    assert most_at_once([(j.started_at, j.finished_at) for j in jobs.values()]) <= allowed

    complete = [t for t in trials if t["state"] == "complete"]
    assert complete, trials
    for trial in trials:
        job = jobs[trial["job_id"]]
        evaluations = [(e["step"], e["eval_loss"]) for e in JobEvent.objects.filter(
            job=job, type="metrics", data__has_key="eval_loss").order_by("created_at")
            .values_list("data", flat=True)]
        told = [(v["step"], v["value"]) for v in trial["intermediate_values"]]
        if trial["state"] == "complete":
            assert told == evaluations and evaluations[-1][0] == 2
            assert job.status == "succeeded" and trial["value"] == evaluations[-1][1]
        else:  # pruned; its job was cancelled (or had just ended)
            assert told and told == evaluations[:len(told)] and trial["value"] == told[-1][1]
            assert job.cancel_requested and job.status in ("cancelled", "succeeded")
    best = min(complete, key=lambda t: t["value"])
    assert body["best_trial"]["number"] == best["number"]
    assert body["best_trial"]["fine_tuned_model"].startswith(f"ft:{MODEL}:")
    told = optuna.load_study(study_name=sweep_id, storage=study.storage())
    assert told.best_trial.number == best["number"]
    assert [t.state.name.lower() for t in told.trials] == [t["state"] for t in trials]
