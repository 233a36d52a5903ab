"""Sweeps scored by an eval (metric eval): each trial's adapter gets a run of the sweep's eval,
Optuna maximizes the run's statistic, and the best trial's adapter goes through its family's
deploy gate when the sweep deploys it.

The trials' jobs are driven by the fake GPU worker and the eval runs are ended as the evals
worker ends them (their statistics from the graders' own interval code): tests/evals runs them
for real against the engine, here the sweep's side is under test."""

from __future__ import annotations

import pytest
from django.utils import timezone
from optuna.trial import TrialState

from jobs.grading import stats
from tests.conftest import bearer
from tests.sweeps.conftest import create_sweep
from tests.sweeps.test_steps import optuna_trials, trials
from tuneplex.adapters.models import Adapter
from tuneplex.evals.models import EvalRun, GateDecision
from tuneplex.finetuning.models import JobEvent
from tuneplex.sweeps import steps
from tuneplex.sweeps.models import Sweep

pytestmark = pytest.mark.django_db

MODEL = "SmolLM2-135M-Instruct"
SOURCE = {"source": {"type": "file_content", "content": [{"item": {"question": "Capital of France?"}}]},
          "input_messages": {"type": "template", "template": [
              {"role": "user", "content": "{{item.question}}"}]},
          "sampling_params": {"temperature": 0, "max_completion_tokens": 8}}


def make_eval(tenant) -> str:
    made = bearer(tenant.owner_key).post("/v1/evals", {
        "name": "capital", "data_source_config": {"type": "custom", "item_schema": {
            "type": "object", "properties": {"question": {"type": "string"}}}},
        "testing_criteria": [{"type": "string_check", "name": "names Paris", "operation": "ilike",
                              "input": "{{sample.output_text}}", "reference": "paris"}]},
        format="json")
    assert made.status_code == 200, made.content
    return made.json()["id"]


def by_eval(eval_id: str, **changes) -> dict:
    return {"metric": "eval", "eval": {"eval_id": eval_id, "data_source": SOURCE, **changes}}


def end_run(run: EvalRun, *, passed: int, of: int, status: str = "completed") -> None:
    """As the evals worker ends a run: its status and the criterion's statistics."""
    run.status = status
    run.finished_at = timezone.now()
    run.statistics = {"names Paris": {"pass_rate": stats.proportion(passed, of).to_dict(),
                                      "mean_score": stats.mean([]).to_dict(), "errored": 0}}
    if status != "completed":
        run.error = {"code": "engine_unavailable", "message": "no replica answered"}
    run.save()


def test_a_sweep_scored_by_an_eval_is_checked_and_shown(org_a, files_of_a):
    eval_id = make_eval(org_a)
    made = create_sweep(org_a, files_of_a, **by_eval(eval_id, statistic="pass_rate"))
    assert made.status_code == 200, made.content
    body = made.json()
    assert body["metric"] == "eval" and body["direction"] == "maximize"
    assert body["eval"] == {"eval_id": eval_id, "data_source": SOURCE, "criterion": "names Paris",
                            "statistic": "pass_rate"}
    plain = create_sweep(org_a, files_of_a).json()
    assert plain["eval"] is None and plain["direction"] == "minimize"  # the positive control


@pytest.mark.parametrize(("changes", "status", "code", "param"), [
    ({"metric": "eval"}, 400, "eval_required", "eval"),
    ({"eval": {"eval_id": "x", "data_source": SOURCE}}, 400, "invalid_value", "eval"),
    ({"metric": "eval", "eval": {"eval_id": "eval_nope", "data_source": SOURCE}}, 404,
     "not_found", "eval.eval_id"),
    ("criterion", 400, "invalid_value", "eval.criterion"),
    ("model", 400, "invalid_value", "eval.data_source.model"),
    ("item", 400, None, "eval.data_source.source.content[0].item.question"),
])
def test_each_field_of_the_eval_is_checked_and_named(org_a, files_of_a, changes, status, code, param):
    eval_id = make_eval(org_a)
    if changes == "criterion":
        changes = by_eval(eval_id, criterion="names Rome")
    elif changes == "model":
        changes = by_eval(eval_id, data_source={**SOURCE, "model": MODEL})
    elif changes == "item":
        changes = by_eval(eval_id, data_source={**SOURCE, "source": {
            "type": "file_content", "content": [{"item": {"question": 3}}]}})
    answer = create_sweep(org_a, files_of_a, **changes)
    assert answer.status_code == status, answer.content
    error = answer.json()["error"]
    assert error["param"] == param and (code is None or error["code"] == code)
    assert not Sweep.objects.exists()


def test_another_organizations_eval_cannot_score_a_sweep(org_a, org_b, files_of_a):
    theirs = make_eval(org_b)
    answer = create_sweep(org_a, files_of_a, **by_eval(theirs))
    assert answer.status_code == 404 and answer.json()["error"]["param"] == "eval.eval_id"


def run_trials(fake_worker, sweep_id: str, losses: list[float]) -> None:
    for trial, loss in zip(trials(sweep_id), losses, strict=True):
        job = fake_worker.start(trial.job)
        fake_worker.evaluate(job, 1, loss)
        fake_worker.succeed(job)


def one_trial_being_scored(tenant, files, fake_worker) -> tuple[str, str, EvalRun]:
    """A one-trial sweep scored by an eval, its job succeeded: (eval, sweep, the trial's run)."""
    eval_id = make_eval(tenant)
    sweep_id = create_sweep(tenant, files, max_trials=1, **by_eval(eval_id)).json()["id"]
    steps.step_all()
    run_trials(fake_worker, sweep_id, [0.5])
    steps.step_all()
    return eval_id, sweep_id, EvalRun.objects.get(pk=trials(sweep_id)[0].eval_run_id)


def test_each_trials_adapter_is_scored_by_a_run_and_the_highest_statistic_wins(
        org_a, files_of_a, fake_worker, settings):
    settings.ORG_MAX_CONCURRENT_JOBS = 2
    eval_id = make_eval(org_a)
    sweep_id = create_sweep(org_a, files_of_a, max_trials=2, **by_eval(eval_id)).json()["id"]
    steps.step_all()
    # The first trial has the lower validation loss; the eval prefers the second.
    run_trials(fake_worker, sweep_id, [0.5, 0.9])
    steps.step_all()
    first, second = trials(sweep_id)
    runs = [EvalRun.objects.get(pk=t.eval_run_id) for t in (first, second)]
    adapters = [Adapter.objects.get(job=t.job) for t in (first, second)]
    assert [r.model for r in runs] == [a.name for a in adapters]
    assert all(r.undeployed_ok and r.eval_id == eval_id and r.status == "queued" for r in runs)
    assert {first.state, second.state} == {"running"}  # scored only once their runs end
    assert not any(a.deployed for a in adapters)
    steps.step_all()  # nothing new: no second run for the same trial
    assert EvalRun.objects.filter(eval_id=eval_id).count() == 2

    end_run(runs[0], passed=3, of=10)
    end_run(runs[1], passed=8, of=10)
    steps.step_all()
    first, second = trials(sweep_id)
    assert (first.state, first.value) == ("complete", pytest.approx(0.3))
    assert (second.state, second.value) == ("complete", pytest.approx(0.8))
    sweep = Sweep.objects.get(pk=sweep_id)
    assert sweep.status == "completed" and sweep.best_trial_id == second.id
    assert [t.value for t in optuna_trials(sweep_id)] == [pytest.approx(0.3), pytest.approx(0.8)]
    assert JobEvent.objects.filter(job=second.job, message__startswith="Scoring trial 1").exists()


def test_a_trial_whose_run_fails_fails_and_a_sweep_of_none_scored_fails(org_a, files_of_a,
                                                                          fake_worker):
    _, sweep_id, run = one_trial_being_scored(org_a, files_of_a, fake_worker)
    end_run(run, passed=0, of=0, status="failed")
    steps.step_all()
    trial = trials(sweep_id)[0]
    assert trial.state == "failed" and trial.error["code"] == "eval_run_failed"
    assert "no replica answered" in trial.error["message"]
    sweep = Sweep.objects.get(pk=sweep_id)
    assert sweep.status == "failed" and sweep.error["message"] == "No trial's eval run completed."


def test_pruning_still_follows_the_validation_loss(org_a, files_of_a, fake_worker):
    """The study maximizes; the pruner is told the losses negated, so the trial with the higher
    loss is the one stopped."""
    eval_id = make_eval(org_a)
    sweep_id = create_sweep(org_a, files_of_a, max_trials=3, pruner_startup_trials=1,
                            **by_eval(eval_id)).json()["id"]
    steps.step_all()
    first = fake_worker.start(trials(sweep_id)[0].job)
    fake_worker.evaluate(first, 1, 1.0)
    fake_worker.evaluate(first, 2, 0.8)
    fake_worker.succeed(first)
    steps.step_all()
    end_run(EvalRun.objects.get(pk=trials(sweep_id)[0].eval_run_id), passed=5, of=10)
    steps.step_all()
    assert trials(sweep_id)[0].state == "complete"
    second = fake_worker.start(trials(sweep_id)[1].job)
    fake_worker.evaluate(second, 1, 0.9)  # ahead of the first trial at step 1: goes on
    steps.step_all()
    assert trials(sweep_id)[1].state == "running"
    fake_worker.evaluate(second, 2, 2.0)  # behind the first's 0.8 at step 2
    steps.step_all()
    trial = trials(sweep_id)[1]
    assert trial.state == "pruned" and trial.value == 2.0  # the loss, not Optuna's -2.0
    assert optuna_trials(sweep_id)[1].state == TrialState.PRUNED


def test_cancelling_the_sweep_cancels_a_trials_eval_run(org_a, files_of_a, fake_worker):
    _, sweep_id, run = one_trial_being_scored(org_a, files_of_a, fake_worker)
    assert run.status == "queued"
    answer = bearer(org_a.owner_key).post(f"/v1/sweeps/{sweep_id}/cancel")
    assert answer.status_code == 200, answer.content
    run.refresh_from_db()
    assert run.status == "canceled" and trials(sweep_id)[0].state == "cancelled"


def test_the_best_trial_goes_through_its_familys_deploy_gate(org_a, files_of_a, fake_worker):
    """A gate on the base model: the sweep's best adapter is not deployed at once but handed to
    the gate (which, with no engine serving here, records that it could not evaluate)."""
    eval_id = make_eval(org_a)
    gate = bearer(org_a.owner_key).post("/v1/deploy_gates", {
        "eval_id": eval_id, "base_model": MODEL, "data_source": SOURCE}, format="json")
    assert gate.status_code == 200, gate.content
    sweep_id = create_sweep(org_a, files_of_a, max_trials=1, deploy_best=True).json()["id"]
    steps.step_all()
    run_trials(fake_worker, sweep_id, [0.5])
    steps.step_all()
    best = trials(sweep_id)[0]
    adapter = Adapter.objects.get(job=best.job)
    decision = GateDecision.objects.get(adapter=adapter)
    assert decision.gate_id == gate.json()["id"] and not Adapter.objects.get(pk=adapter.pk).deployed
    assert "No engine replica serves" not in Sweep.objects.get(pk=sweep_id).deploy_error
    assert JobEvent.objects.filter(job=best.job, message__contains="goes through deploy gate").exists()


def test_the_sweep_page_says_what_scores_the_trials_and_links_their_runs(org_a, files_of_a,
                                                                          fake_worker):
    from tests.frontend.conftest import browser

    eval_id, sweep_id, run = one_trial_being_scored(org_a, files_of_a, fake_worker)
    end_run(run, passed=7, of=10)
    steps.step_all()
    html = browser(org_a.owner).get(f"/sweeps/{sweep_id}/").content.decode()
    assert "pass rate on &#x27;names Paris&#x27; of eval" in html and "(highest is best)" in html
    assert f'href="/evals/{eval_id}/runs/{run.id}/"' in html
    assert "Best: trial 0, pass rate on &#x27;names Paris&#x27; 0.7000" in html
    plain = create_sweep(org_a, files_of_a).json()["id"]  # the positive control
    assert "validation loss (lowest is best)" in browser(org_a.owner).get(
        f"/sweeps/{plain}/").content.decode()
