"""The sweep's step (ask-and-tell driven by the platform) on the real database and Optuna study:
trials' jobs are real rows made by job_create and taken through their states by the services a
GPU worker calls (nothing trains here: tests/sweeps/test_sweep_e2e.py trains)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from django.utils import timezone
from optuna.trial import TrialState
from tuneplex.finetuning.models import FineTuningJob, JobEvent
from tuneplex.sweeps import steps, study
from tuneplex.sweeps.models import Sweep, SweepTrial

from tests.conftest import bearer
from tests.sweeps.conftest import create_sweep

pytestmark = pytest.mark.django_db
REPO = Path(__file__).resolve().parents[2]


def trials(sweep_id: str) -> list[SweepTrial]:
    return list(SweepTrial.objects.filter(sweep_id=sweep_id).select_related("job").order_by("number"))


def in_flight(sweep_id: str) -> list[SweepTrial]:
    return [t for t in trials(sweep_id) if t.job and t.job.status in FineTuningJob.ACTIVE]


def optuna_trials(sweep_id: str) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=sweep_id, storage=study.storage()).trials


def loss_of(params: dict) -> float:
    """A made-up validation loss, best near a learning rate of 1e-3."""
    return 0.5 + abs(math.log10(params["learning_rate"]) + 3)


def test_trials_run_within_the_organizations_limit_until_the_budget_is_spent(
        org_a, files_of_a, fake_worker, settings):
    settings.ORG_MAX_CONCURRENT_JOBS = 2
    sweep_id = create_sweep(org_a, files_of_a, max_trials=5, pruner="none").json()["id"]
    seen_in_flight = []
    for _ in range(10):
        steps.step_all()
        running = in_flight(sweep_id)
        seen_in_flight.append(len(running))
        for trial in running:
            job = fake_worker.start(trial.job)
            fake_worker.evaluate(job, 1, loss_of(trial.params) + 1)
            fake_worker.evaluate(job, 2, loss_of(trial.params))
            fake_worker.succeed(job)
        if not running:
            break
    assert seen_in_flight == [2, 2, 1, 0]
    sweep = Sweep.objects.get(id=sweep_id)
    rows = trials(sweep_id)
    assert sweep.status == "completed" and [t.number for t in rows] == [0, 1, 2, 3, 4]
    assert all(t.state == "complete" and t.job.status == "succeeded" for t in rows)
    for trial in rows:
        assert trial.value == pytest.approx(loss_of(trial.params))
        assert trial.intermediate_values == [[1, pytest.approx(trial.value + 1)],
                                             [2, pytest.approx(trial.value)]]
        # A normal job: the template, this trial's params, a suffix and metadata naming it.
        assert trial.job.hyperparameters == {"n_epochs": 1, "eval_every_steps": 1, **trial.params}
        assert trial.job.suffix == f"sweep-t{trial.number}"
        assert trial.job.metadata == {"sweep_id": sweep_id, "sweep_trial": str(trial.number)}
        assert trial.job.validation_file == files_of_a["validation_file"]
    best = min(rows, key=lambda t: t.value)
    assert sweep.best_trial_id == best.id
    told = optuna_trials(sweep_id)
    assert [t.state for t in told] == [TrialState.COMPLETE] * 5
    assert [t.value for t in told] == [pytest.approx(t.value) for t in rows]
    assert [t.params for t in told] == [t.params for t in rows]
    body = bearer(org_a.owner_key).get(f"/v1/sweeps/{sweep_id}").json()
    assert body["best_trial"]["number"] == best.number and body["best_trial"]["job_id"] == best.job_id
    assert body["trials"][0]["intermediate_values"][1] == {"step": 2, "value": rows[0].value}
    assert body["best_trial"]["fine_tuned_model"] == best.job.fine_tuned_model
    assert body["finished_at"] is not None
    steps.step_all()  # a finished sweep takes no more steps
    assert len(trials(sweep_id)) == 5


@pytest.mark.parametrize(("limit", "max_parallel", "allowed"), [(1, 5, 1), (3, None, 3), (3, 2, 2)])
def test_trials_in_flight_are_max_parallel_capped_by_the_organizations_limit(
        org_a, files_of_a, settings, limit, max_parallel, allowed):
    settings.ORG_MAX_CONCURRENT_JOBS = limit
    sweep_id = create_sweep(org_a, files_of_a, max_trials=6, max_parallel=max_parallel).json()["id"]
    steps.step_all()
    steps.step_all()
    assert len(in_flight(sweep_id)) == allowed
    assert FineTuningJob.objects.filter(organization=org_a.organization).count() == allowed


@pytest.mark.parametrize("pruner", ["median", "none"])
def test_a_trial_that_falls_behind_is_pruned_and_its_job_cancelled(org_a, files_of_a, fake_worker,
                                                                   pruner):
    sweep_id = create_sweep(org_a, files_of_a, max_trials=3, pruner=pruner,
                            pruner_startup_trials=1).json()["id"]
    steps.step_all()
    first = fake_worker.start(trials(sweep_id)[0].job)
    fake_worker.evaluate(first, 1, 1.0)
    fake_worker.evaluate(first, 2, 0.8)
    fake_worker.succeed(first)
    steps.step_all()
    second = fake_worker.start(trials(sweep_id)[1].job)
    fake_worker.evaluate(second, 1, 0.9)  # ahead of the first trial at step 1: goes on
    steps.step_all()
    assert trials(sweep_id)[1].state == "running"
    fake_worker.evaluate(second, 2, 2.0)  # its best, 0.9, is behind the first's 0.8 at step 2
    steps.step_all()
    second.refresh_from_db()
    trial = trials(sweep_id)[1]
    if pruner == "none":
        assert trial.state == "running" and not second.cancel_requested
        return
    assert trial.state == "pruned" and trial.value == 2.0
    assert trial.intermediate_values == [[1, 0.9], [2, 2.0]]
    assert second.cancel_requested and second.status == "running"
    assert optuna_trials(sweep_id)[1].state == TrialState.PRUNED
    assert JobEvent.objects.filter(job=second, message__startswith=f"Pruned by sweep {sweep_id}").exists()
    # Its job still holds the organization's one slot until its worker has stopped it.
    steps.step_all()
    assert len(trials(sweep_id)) == 2
    fake_worker.stop_cancelled(second)
    steps.step_all()
    assert len(trials(sweep_id)) == 3 and trials(sweep_id)[1].state == "pruned"


def test_a_failed_job_fails_its_trial_and_a_sweep_with_no_value_fails(org_a, files_of_a,
                                                                      fake_worker, settings):
    settings.ORG_MAX_CONCURRENT_JOBS = 2
    sweep_id = create_sweep(org_a, files_of_a, max_trials=2).json()["id"]
    steps.step_all()
    broken, quiet = (fake_worker.start(t.job) for t in trials(sweep_id))
    fake_worker.fail(broken)
    fake_worker.train(quiet, 1)
    fake_worker.succeed(quiet)  # no evaluation: nothing to score it by
    steps.step_all()
    failed, unscored = trials(sweep_id)
    assert (failed.state, failed.error["code"]) == ("failed", "training_error")
    assert (unscored.state, unscored.error["code"]) == ("failed", "no_validation_loss")
    assert [t.state for t in optuna_trials(sweep_id)] == [TrialState.FAIL] * 2
    sweep = Sweep.objects.get(id=sweep_id)
    assert (sweep.status, sweep.error["code"], sweep.best_trial) == (
        "failed", "no_trial_completed", None)


def test_a_job_refused_at_creation_fails_its_trial_and_the_sweep_goes_on(org_a, files_of_a,
                                                                         settings):
    sweep_id = create_sweep(org_a, files_of_a, max_trials=2).json()["id"]
    settings.TRAINING_MEMORY = 1  # every trial's job is now refused: insufficient_memory
    steps.step_all()
    rows = trials(sweep_id)
    assert [(t.state, t.error["code"], t.job) for t in rows] == [
        ("failed", "insufficient_memory", None)] * 2
    assert Sweep.objects.get(id=sweep_id).status == "failed"


def test_a_full_queue_leaves_the_trial_waiting_for_the_next_step(org_a, files_of_a, settings):
    sweep_id = create_sweep(org_a, files_of_a, max_trials=2).json()["id"]
    settings.ORG_MAX_QUEUED_JOBS = 1
    bearer(org_a.owner_key).post("/v1/fine_tuning/jobs", {
        "model": "SmolLM2-135M-Instruct", "training_file": files_of_a["training_file"]},
        format="json")  # the organization's one waiting place
    steps.step_all()
    (waiting,) = trials(sweep_id)
    assert (waiting.state, waiting.job) == ("waiting", None)
    settings.ORG_MAX_QUEUED_JOBS = 2
    steps.step_all()
    (started,) = trials(sweep_id)
    assert started.state == "running" and started.job.metadata["sweep_trial"] == "0"


def test_cancelling_a_sweep_cancels_its_trials_jobs(org_a, files_of_a, fake_worker, settings):
    settings.ORG_MAX_CONCURRENT_JOBS = 2
    sweep_id = create_sweep(org_a, files_of_a, max_trials=4).json()["id"]
    steps.step_all()
    running = fake_worker.start(trials(sweep_id)[0].job)
    response = bearer(org_a.owner_key).post(f"/v1/sweeps/{sweep_id}/cancel")
    assert response.status_code == 200 and response.json()["status"] == "cancelled"
    assert [t["state"] for t in response.json()["trials"]] == ["cancelled", "cancelled"]
    first, second = trials(sweep_id)
    assert first.job.cancel_requested and first.job.status == "running"  # stopped by its worker
    assert second.job.status == "cancelled"  # it was still waiting for its files' check
    assert [t.state for t in optuna_trials(sweep_id)] == [TrialState.FAIL] * 2
    fake_worker.stop_cancelled(running)
    steps.step_all()
    assert len(trials(sweep_id)) == 2
    again = bearer(org_a.owner_key).post(f"/v1/sweeps/{sweep_id}/cancel")
    assert again.status_code == 409 and again.json()["error"]["code"] == "sweep_finished"


def test_a_job_created_by_a_step_that_stopped_is_adopted_not_created_again(org_a, files_of_a):
    sweep_id = create_sweep(org_a, files_of_a).json()["id"]
    steps.step_all()
    (trial,) = trials(sweep_id)
    job_id = trial.job_id
    # As if the step had stopped right after job_create, before recording the job on its trial.
    SweepTrial.objects.filter(pk=trial.pk).update(state="waiting", job=None)
    steps.step_all()
    (trial,) = trials(sweep_id)
    assert (trial.state, trial.job_id) == ("running", job_id)
    assert FineTuningJob.objects.filter(organization=org_a.organization).count() == 1


def test_a_trial_asked_but_never_recorded_is_told_it_failed(org_a, files_of_a):
    sweep_id = create_sweep(org_a, files_of_a).json()["id"]
    sweep = Sweep.objects.get(id=sweep_id)
    study.study_for(sweep).ask()  # the step stopped before recording it
    steps.step_all()
    told = optuna_trials(sweep_id)
    assert [t.state for t in told] == [TrialState.FAIL, TrialState.RUNNING]
    assert [t.number for t in trials(sweep_id)] == [1]


def test_a_sweep_is_stepped_by_one_step_at_a_time(org_a, files_of_a):
    sweep_id = create_sweep(org_a, files_of_a).json()["id"]
    assert steps._claim(sweep_id)  # another worker's step holds it
    assert steps.step_all() == {sweep_id: "busy"} and trials(sweep_id) == []
    Sweep.objects.filter(id=sweep_id).update(step_lease_until=timezone.now()
                                             - steps.STEP_LEASE)  # that worker died
    assert steps.step_all() == {sweep_id: "running"} and len(trials(sweep_id)) == 1
    assert Sweep.objects.get(id=sweep_id).step_lease_until is None


def test_the_grid_sampler_tries_each_point_once(org_a, files_of_a, settings):
    settings.ORG_MAX_CONCURRENT_JOBS = 4
    space = {"lora_rank": {"type": "categorical", "choices": [4, 8]},
             "lora_alpha": {"type": "int", "low": 16, "high": 32, "step": 16}}
    sweep_id = create_sweep(org_a, files_of_a, sampler="grid", search_space=space,
                            max_trials=4).json()["id"]
    steps.step_all()
    points = sorted((t.params["lora_rank"], t.params["lora_alpha"]) for t in trials(sweep_id))
    assert points == [(4, 16), (4, 32), (8, 16), (8, 32)]


@pytest.mark.parametrize("sampler", ["random", "tpe"])
def test_trials_asked_at_different_steps_try_different_values(org_a, files_of_a, fake_worker,
                                                              sampler):
    """Samplers are made again at each step: seeded by the trial's number, not the sweep's seed
    alone, or each step would suggest the same values."""
    sweep_id = create_sweep(org_a, files_of_a, max_trials=3, sampler=sampler,
                            pruner="none").json()["id"]
    for _ in range(3):
        steps.step_all()
        (trial,) = in_flight(sweep_id)
        job = fake_worker.start(trial.job)
        fake_worker.evaluate(job, 1, loss_of(trial.params))
        fake_worker.succeed(job)
    rates = [t.params["learning_rate"] for t in trials(sweep_id)]
    assert len(set(rates)) == 3 and all(1e-5 <= r <= 1e-2 for r in rates), rates


class RecordingPool:
    """The serving pool's one stand-in: what it was asked to deploy."""

    slots = 4

    def __init__(self) -> None:
        self.deployed: list[str] = []

    def deploy(self, name, adapter_id):
        self.deployed.append(name)

    def release(self, route):
        pass

    def follow_deployed(self):
        pass


def test_the_best_trials_adapter_is_deployed_when_asked(org_a, files_of_a, fake_worker, settings,
                                                        monkeypatch):
    from tuneplex.adapters.models import Adapter
    from tuneplex.inference import services

    pool = RecordingPool()
    monkeypatch.setattr(services, "pool_for", lambda name: pool)
    settings.ORG_MAX_CONCURRENT_JOBS = 2
    sweep_id = create_sweep(org_a, files_of_a, max_trials=2, deploy_best=True).json()["id"]
    steps.step_all()
    for trial, loss in zip(trials(sweep_id), (0.9, 0.6)):
        job = fake_worker.start(trial.job)
        fake_worker.evaluate(job, 1, loss)
        fake_worker.succeed(job)
    steps.step_all()
    sweep = Sweep.objects.get(id=sweep_id)
    best = trials(sweep_id)[1]
    assert sweep.status == "completed" and sweep.best_trial_id == best.id
    assert pool.deployed == [best.job.fine_tuned_model] and sweep.deploy_error == ""
    assert list(Adapter.objects.filter(deployed=True).values_list("job_id", flat=True)) == [best.job_id]


def test_a_best_adapter_that_cannot_be_deployed_leaves_the_reason(org_a, files_of_a, fake_worker):
    """No engine serves in this test: the sweep still completes and says why."""
    sweep_id = create_sweep(org_a, files_of_a, max_trials=1, deploy_best=True).json()["id"]
    steps.step_all()
    job = fake_worker.start(trials(sweep_id)[0].job)
    fake_worker.evaluate(job, 1, 0.7)
    fake_worker.succeed(job)
    steps.step_all()
    sweep = Sweep.objects.get(id=sweep_id)
    assert sweep.status == "completed" and sweep.best_trial.number == 0
    assert "No engine replica serves SmolLM2-135M-Instruct" in sweep.deploy_error


SQLITE_SWEEP = """
import django, optuna
django.setup()
from django.core.management import call_command
call_command("migrate", verbosity=0)
from tuneplex.sweeps import steps, study
from tuneplex.sweeps.models import Sweep
from tuneplex.tenancy.models import User
from tuneplex.tenancy.services import organization_create

org = organization_create(name="Embedded", owner=User.objects.create_user("e", password="pw-123456789"))
sweep = Sweep.objects.create(organization=org, model="not-registered", training_file="file-x",
                             validation_file="file-y", max_trials=2, sampler="tpe", pruner="median",
                             seed=1, search_space={"lora_rank": {"type": "categorical", "choices": [4, 8]}})
print(steps.step_all())
sweep.refresh_from_db()
told = optuna.load_study(study_name=sweep.id, storage=study.storage()).trials
print(sweep.status, [t.state.name for t in told], [t.state for t in sweep.trials.order_by("number")])
"""


def test_the_embedded_sqlite_database_holds_the_study(tmp_path):
    """The embedded default: migrate makes Optuna's tables in the SQLite file, and a step asks,
    tells and finishes a sweep there while Django's own connection uses the same file."""
    environ = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}
    environ.update(TUNEPLEX_DATA_DIR=str(tmp_path), DJANGO_SETTINGS_MODULE="tuneplex.settings",
                   PYTHONPATH=f"{REPO / 'platform'}:{REPO}")
    result = subprocess.run([sys.executable, "-c", SQLITE_SWEEP], cwd=REPO, env=environ,
                            capture_output=True, text=True, timeout=180, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    outcome, states = result.stdout.strip().splitlines()[-2:]
    # Each trial's job is refused (no such model): both trials fail, and so does the sweep.
    assert outcome.endswith("'failed'}") and (tmp_path / "db.sqlite3").exists()
    assert states == "failed ['FAIL', 'FAIL'] ['failed', 'failed']"
