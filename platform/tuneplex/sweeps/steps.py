"""The sweeps' periodic step (Celery beat, task ``tuneplex.sweeps.step``, every
TUNEPLEX_SWEEP_STEP_SECONDS): Optuna's ask-and-tell, driven by the platform.

Each running sweep, one step at a time (claimed with a conditional UPDATE on the database's
clock, so two beats or a slow worker never step one sweep twice at once):

1. follow its trials in flight: the job's new validation losses are reported to Optuna
   (``trial.report``); a trial the pruner finds behind (``trial.should_prune``) has its job
   cancelled through the job services and is told PRUNED; a job that ended is told COMPLETE
   with its last validation loss, or FAIL;
2. start trials while fewer than min(max_parallel, the organization's concurrency limit) are in
   flight and the budget lasts: ask Optuna (``study.ask`` with the search space), and create a
   normal fine-tuning job for it through ``job_create``, which the scheduler runs like any other;
3. once every trial has ended: complete with the best trial (``study.best_trial``), deploying
   its adapter when the sweep asked for that.

A step that stops half-way (a worker killed) leaves nothing lost: a trial asked but not recorded
is told FAIL at the next step, and a job created but not recorded on its trial is found by its
metadata (``sweep_id``, ``sweep_trial``) and adopted.
"""

from __future__ import annotations

import logging
from datetime import timedelta

import optuna
from django.db import transaction
from django.db.models import DateTimeField, ExpressionWrapper, Q
from django.db.models.functions import Now
from optuna.trial import TrialState

from tuneplex.adapters.selectors import adapter_list
from tuneplex.core.actors import Principal
from tuneplex.core.errors import ApiError, Conflict
from tuneplex.evals.models import EvalRun
from tuneplex.evals.gates import gate_for, gate_start
from tuneplex.evals.services import comparison_run
from tuneplex.finetuning.models import FineTuningJob
from tuneplex.finetuning.services.lifecycle import job_cancel, job_create, job_event
from tuneplex.inference.services import adapter_deploy
from tuneplex.sweeps import selectors
from tuneplex.sweeps.models import Sweep, SweepTrial
from tuneplex.sweeps.services import trial_cancel, trial_record_end, trial_suffix
from tuneplex.sweeps.study import distributions, intermediate, sampler_for, study_for, tell

log = logging.getLogger(__name__)
# A step takes seconds; one whose worker died is taken over after this long.
STEP_LEASE = timedelta(minutes=5)
State = SweepTrial.State


def step_all() -> dict[str, str]:
    """The beat task's body: one step of every running sweep; what each step did."""
    outcomes = {}
    running = Sweep.objects.filter(status=Sweep.Status.RUNNING).order_by("created_at")
    for sweep_id in running.values_list("id", flat=True):
        if not _claim(sweep_id):
            outcomes[sweep_id] = "busy"
            continue
        try:
            outcomes[sweep_id] = str(sweep_step(sweep_id))
        except Exception:  # one sweep's trouble (a database hiccup) must not stall the others
            log.exception("sweep %s: the step failed; the next one tries again", sweep_id)
            outcomes[sweep_id] = "error"
        finally:
            Sweep.objects.filter(pk=sweep_id).update(step_lease_until=None)
    return outcomes


def _claim(sweep_id: str) -> bool:
    until = ExpressionWrapper(Now() + STEP_LEASE, output_field=DateTimeField())
    return bool(Sweep.objects.filter(Q(step_lease_until__isnull=True)
                                     | Q(step_lease_until__lt=Now()),
                                     pk=sweep_id, status=Sweep.Status.RUNNING)
                .update(step_lease_until=until))


def _system(sweep: Sweep) -> Principal:
    """The step acts for the organization, not for a person (audit rows say "system")."""
    return Principal(organization=sweep.organization, scopes=frozenset())


def sweep_step(sweep_id: str) -> str:
    """One step of one sweep (the caller holds its lease); the sweep's status after it."""
    sweep = Sweep.objects.select_related("organization", "eval").get(pk=sweep_id)
    if sweep.status != Sweep.Status.RUNNING:
        return sweep.status
    study = study_for(sweep)
    _fail_unrecorded(sweep, study)
    for trial in (selectors.trial_list(sweep=sweep).filter(state__in=SweepTrial.ACTIVE)
                  .select_related("eval_run")):
        trial.sweep = sweep
        if trial.state == State.WAITING:
            _start_job(sweep, study, trial)
        else:
            _follow(sweep, study, trial)
    _start_trials(sweep, study)
    return _finish_if_done(sweep, study)


def _fail_unrecorded(sweep: Sweep, study: optuna.Study) -> None:
    """Trials Optuna handed out that no row records (the step that asked stopped at once)."""
    recorded = set(sweep.trials.values_list("number", flat=True))
    for frozen in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if frozen.number not in recorded:
            log.warning("sweep %s: trial %s was asked but never recorded; told FAIL",
                        sweep.id, frozen.number)
            study.tell(frozen.number, state=TrialState.FAIL, skip_if_finished=True)


# --- starting trials -------------------------------------------------------------------------------


def _start_trials(sweep: Sweep, study: optuna.Study) -> None:
    while (sweep.trials.count() < sweep.max_trials
           and selectors.trials_in_flight(sweep=sweep) < selectors.parallel_limit(sweep=sweep)
           and Sweep.objects.filter(pk=sweep.pk, status=Sweep.Status.RUNNING).exists()):
        study.sampler = sampler_for(sweep, next_number=len(study.get_trials(deepcopy=False)))
        asked = study.ask(distributions(sweep))
        trial = SweepTrial.objects.create(
            sweep=sweep, organization=sweep.organization, number=asked.number,
            optuna_trial_id=asked._trial_id, params=asked.params)
        if _start_job(sweep, study, trial) == State.WAITING:
            return  # the organization's queue is full: the next step tries again


def _start_job(sweep: Sweep, study: optuna.Study, trial: SweepTrial) -> str:
    """Create the trial's job (or adopt the one a stopped step created); the trial's state."""
    job = selectors.job_of_trial(sweep=sweep, number=trial.number)
    if job is None:
        try:
            job = job_create(
                organization=sweep.organization, actor=_system(sweep), model=sweep.model,
                training_file=sweep.training_file, validation_file=sweep.validation_file or None,
                hyperparameters={**sweep.hyperparameters, **trial.params},
                suffix=trial_suffix(sweep, trial.number),
                metadata={"sweep_id": sweep.id, "sweep_trial": str(trial.number)})
        except ApiError as exc:
            if exc.status == 429:  # too many jobs waiting: not this trial's fault
                return State.WAITING
            told = tell(study, trial, state=TrialState.FAIL)
            trial_record_end(trial, told, meant=State.FAILED,
                             error={"code": exc.code, "message": exc.message, "param": exc.param})
            return State.FAILED
    SweepTrial.objects.filter(pk=trial.pk, state=State.WAITING).update(job=job, state=State.RUNNING)
    trial.job, trial.state = job, State.RUNNING
    if Sweep.objects.filter(pk=sweep.pk, status=Sweep.Status.CANCELLED).exists():
        # Cancelled while this job was being created, after the cancellation listed the
        # sweep's jobs: this one is stopped here.
        trial_cancel(trial, actor=_system(sweep))
        return State.CANCELLED
    return State.RUNNING


# --- following trials ------------------------------------------------------------------------------


def _follow(sweep: Sweep, study: optuna.Study, trial: SweepTrial) -> None:
    job = trial.job
    if job is None:  # its job row is gone (cannot happen while jobs are never deleted)
        told = tell(study, trial, state=TrialState.FAIL)
        trial_record_end(trial, told, meant=State.FAILED,
                         error={"code": "job_missing", "message": "The trial's job is gone."})
        return
    optuna_trial = _report(sweep, study, trial, job)
    if job.status == FineTuningJob.Status.SUCCEEDED:
        if sweep.metric == Sweep.Metric.EVAL:
            _score_by_eval(sweep, study, trial, job)
            return
        if not trial.intermediate_values:
            told = tell(study, trial, state=TrialState.FAIL)
            trial_record_end(trial, told, meant=State.FAILED, error={
                "code": "no_validation_loss",
                "message": "The job succeeded without reporting a validation loss."})
            return
        _, last_loss = max(trial.intermediate_values)
        told = tell(study, trial, state=TrialState.COMPLETE, value=last_loss)
        trial_record_end(trial, told, meant=State.COMPLETE)
    elif job.status in FineTuningJob.FINISHED:
        told = tell(study, trial, state=TrialState.FAIL)
        trial_record_end(trial, told, meant=State.FAILED, error=job.error or {
            "code": "job_cancelled", "message": f"The trial's job was {job.status}."})
    elif optuna_trial is not None and optuna_trial.should_prune():
        _prune(sweep, study, trial, job)


def _report(sweep: Sweep, study: optuna.Study, trial: SweepTrial, job: FineTuningJob):
    """Report the job's evaluations Optuna was not told yet; the trial (None before the first).

    The trial outlives the step that asked it (Optuna's ask-and-tell examples keep it in
    memory), so it is opened again by its id."""
    told = {step for step, _ in trial.intermediate_values}
    new = [(step, loss) for step, loss in selectors.validation_losses(job=job) if step not in told]
    if not new and not told:
        return None
    optuna_trial = optuna.trial.Trial(study, trial.optuna_trial_id)
    for step, loss in new:
        optuna_trial.report(intermediate(sweep, loss), step)
    if new:
        trial.intermediate_values = sorted([tuple(pair) for pair in trial.intermediate_values]
                                           + new)
        SweepTrial.objects.filter(pk=trial.pk).update(
            intermediate_values=[list(pair) for pair in trial.intermediate_values])
    return optuna_trial


def _prune(sweep: Sweep, study: optuna.Study, trial: SweepTrial, job: FineTuningJob) -> None:
    step, loss = max(trial.intermediate_values)
    try:
        job_cancel(organization=sweep.organization, actor=_system(sweep), job=job)
    except Conflict:
        return  # it ended meanwhile: the next step tells Optuna how
    told = tell(study, trial, state=TrialState.PRUNED)
    trial_record_end(trial, told, meant=State.PRUNED, value=loss)
    job_event(job, f"Pruned by sweep {sweep.id}: validation loss {loss:.4f} at step {step} is "
                   f"behind the sweep's other trials ({sweep.pruner} pruner).",
              data={"sweep_id": sweep.id, "pruned": True})


def _score_by_eval(sweep: Sweep, study: optuna.Study, trial: SweepTrial,
                   job: FineTuningJob) -> None:
    """Metric eval: a run of the sweep's eval on the trial's adapter (served for the run only,
    as a deploy gate's candidate), then its statistic told to Optuna once the run has ended."""
    def fail(code: str, message: str) -> None:
        told = tell(study, trial, state=TrialState.FAIL)
        trial_record_end(trial, told, meant=State.FAILED, error={"code": code, "message": message})

    if sweep.eval_id is None:
        return fail("eval_missing", "The sweep's eval was deleted.")
    run = trial.eval_run
    if run is None:
        adapter = adapter_list(organization=sweep.organization).filter(job_id=job.id).first()
        if adapter is None:
            return fail("adapter_missing", "The trial's job has no adapter.")
        try:
            run = comparison_run(
                organization=sweep.organization, eval=sweep.eval,
                data_source=sweep.eval_data_source, model=adapter.name,
                name=f"sweep {sweep.id}: trial {trial.number} {adapter.name}",
                metadata={"sweep": sweep.id, "trial": str(trial.number)}, undeployed_ok=True)
        except ApiError as exc:
            if exc.status in (429, 503):  # limits or no replica for now: the next step tries again
                return None
            return fail(exc.code, f"Its eval run could not start: {exc.message}")
        SweepTrial.objects.filter(pk=trial.pk).update(eval_run=run)
        job_event(job, f"Scoring trial {trial.number} of sweep {sweep.id} with eval "
                       f"'{sweep.eval.name or sweep.eval_id}' (run {run.id}).",
                  data={"sweep_id": sweep.id, "eval_run": run.id})
        return None
    if run.status in EvalRun.ACTIVE:
        return None
    if run.status != EvalRun.Status.COMPLETED:
        reason = (run.error or {}).get("message") or run.status
        return fail("eval_run_failed", f"Its eval run {run.id} ended {run.status} ({reason}).")
    figure = (run.statistics.get(sweep.eval_criterion) or {}).get(sweep.eval_statistic) or {}
    if figure.get("estimate") is None:
        return fail("eval_no_score", f"Its eval run {run.id} graded no item on "
                                     f"'{sweep.eval_criterion}'.")
    told = tell(study, trial, state=TrialState.COMPLETE, value=float(figure["estimate"]))
    trial_record_end(trial, told, meant=State.COMPLETE)
    return None


# --- the end ---------------------------------------------------------------------------------------


def _finish_if_done(sweep: Sweep, study: optuna.Study) -> str:
    if (sweep.trials.count() < sweep.max_trials
            or selectors.trials_in_flight(sweep=sweep)):
        return Sweep.Status.RUNNING
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    best = (SweepTrial.objects.get(sweep=sweep, number=study.best_trial.number)
            if complete else None)
    status = Sweep.Status.COMPLETED if best is not None else Sweep.Status.FAILED
    with transaction.atomic(durable=True):
        ended = Sweep.objects.filter(pk=sweep.pk, status=Sweep.Status.RUNNING).update(
            status=status, best_trial=best, finished_at=Now(),
            error=None if best else {"code": "no_trial_completed", "message": (
                "No trial completed with a validation loss." if sweep.metric
                == Sweep.Metric.VALIDATION_LOSS else "No trial's eval run completed.")})
    if ended and best is not None and sweep.deploy_best:
        _deploy_best(sweep, best)
    return status if ended else Sweep.objects.get(pk=sweep.pk).status


def _deploy_best(sweep: Sweep, best: SweepTrial) -> None:
    """Deploy the best trial's adapter, through its family's deploy gate where there is one
    (the gate's eval against the adapter serving now: the sweep's best is not necessarily
    better than that), else at once."""
    adapter = adapter_list(organization=sweep.organization).filter(job_id=best.job_id).first()
    try:
        if adapter is None:
            raise ApiError("The best trial's job has no adapter.", code="adapter_missing")
        gate = gate_for(adapter, suffix=sweep.suffix)
        if gate is not None:
            outcome = gate_start(gate, adapter)
            job_event(best.job, f"The best trial of sweep {sweep.id}: its adapter goes through "
                                f"deploy gate {gate.id} ({outcome}).",
                      data={"sweep_id": sweep.id, "gate": gate.id})
            return
        adapter_deploy(organization=sweep.organization, actor=_system(sweep), adapter=adapter)
    except ApiError as exc:
        log.warning("sweep %s: the best adapter was not deployed: %s", sweep.id, exc.message)
        Sweep.objects.filter(pk=sweep.pk).update(deploy_error=exc.message[:2000])
