"""Every write a person makes to sweeps: create (checked in full, nothing stored on a refusal)
and cancel. The trials themselves are asked, started, followed and told by the periodic step,
:mod:`tuneplex.sweeps.steps`."""

from __future__ import annotations

import secrets
from typing import Any

from django.conf import settings
from django.db import transaction
from django.utils import timezone
from optuna.trial import FrozenTrial, TrialState

from tuneplex.audit.services import audit_record
from tuneplex.core.actors import Principal
from tuneplex.core.errors import ApiError, Conflict, NotFound
from tuneplex.evals.selectors import eval_get
from tuneplex.evals.services import comparison_check, eval_run_cancel
from tuneplex.evals.models import EvalRun
from tuneplex.finetuning.models import FineTuningJob
from tuneplex.finetuning.services.lifecycle import job_cancel
from tuneplex.finetuning.services.plan import SUFFIX_PATTERN, job_plan
from tuneplex.sweeps import space
from tuneplex.sweeps.models import Sweep, SweepTrial
from tuneplex.sweeps.selectors import active_sweeps, trial_list
from tuneplex.sweeps.study import ENDED, study_for, tell
from tuneplex.tenancy.models import Organization

# A trial's job is named by the sweep's suffix and its number: "<suffix>-t<number>".
MAX_SUFFIX = 40 - len("-t") - 4
DEFAULT_SUFFIX = "sweep"


def _choice(value: Any, choices: type, param: str) -> str:
    if value not in choices.values:
        raise ApiError(f"{param} must be one of {', '.join(choices.values)}.",
                       code="invalid_value", param=param)
    return value


def _count(value: Any, param: str, *, low: int, high: int | None = None) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < low or (
            high is not None and value > high):
        bound = f"from {low} to {high}" if high is not None else f"of at least {low}"
        raise ApiError(f"{param} must be an integer {bound}.", code="invalid_value", param=param)
    return value


def trial_suffix(sweep: Sweep, number: int) -> str:
    return f"{sweep.suffix or DEFAULT_SUFFIX}-t{number}"


def sweep_create(*, organization: Organization, actor: Principal, model: str, training_file: str,
                 search_space: Any, max_trials: int, validation_file: str | None = None,
                 hyperparameters: dict | None = None, sampler: str = "tpe",
                 pruner: str = "median", pruner_startup_trials: int = 2,
                 pruner_warmup_steps: int = 0, metric: str = "validation_loss",
                 max_parallel: int | None = None, deploy_best: bool = False,
                 seed: int | None = None, suffix: str | None = None,
                 name: str | None = None, eval: dict | None = None) -> Sweep:
    """Check the sweep as every trial's job would be checked, then store it: its first trials
    start at the next step (TUNEPLEX_SWEEP_STEP_SECONDS)."""
    sampler = _choice(sampler, Sweep.Sampler, "sampler")
    pruner = _choice(pruner, Sweep.Pruner, "pruner")
    metric = _choice(metric, Sweep.Metric, "metric")
    max_trials = _count(max_trials, "max_trials", low=1, high=settings.SWEEP_MAX_TRIALS)
    if max_parallel is not None:
        max_parallel = _count(max_parallel, "max_parallel", low=1)
    pruner_startup_trials = _count(pruner_startup_trials, "pruner_startup_trials", low=0,
                                   high=1000)
    pruner_warmup_steps = _count(pruner_warmup_steps, "pruner_warmup_steps", low=0, high=10**9)
    seed = secrets.randbelow(2**31) if seed is None else _count(seed, "seed", low=0,
                                                                  high=2**31 - 1)
    if suffix is not None and not (SUFFIX_PATTERN.match(suffix) and len(suffix) <= MAX_SUFFIX):
        raise ApiError(f"suffix must be 1-{MAX_SUFFIX} characters of lowercase letters, digits "
                       "and '-' (each trial's job adds -t<number>).", code="invalid_suffix",
                       param="suffix")
    template = dict(hyperparameters or {})
    parameters = space.parse(search_space, grid=sampler == Sweep.Sampler.GRID)
    for parameter in parameters:
        if parameter.name in template:
            raise ApiError(f"{parameter.name} is in both hyperparameters and search_space: give "
                           "it in one of them.", code="invalid_search_space",
                           param=f"search_space.{parameter.name}")
    if sampler == Sweep.Sampler.GRID and max_trials > space.grid_size(parameters):
        raise ApiError(f"The grid has {space.grid_size(parameters)} points, fewer than max_trials "
                       f"({max_trials}): each trial tries one point.", code="invalid_value",
                       param="max_trials")
    if metric == Sweep.Metric.VALIDATION_LOSS and not validation_file and not (
            template.get("validation_split") or 0) > 0:
        raise ApiError("Scoring by validation loss needs a validation_file (or "
                       "hyperparameters.validation_split above 0).", code="validation_required",
                       param="validation_file")
    scoring = _scoring(organization, metric, eval, model=model)
    _check_jobs(organization, model=model, training_file=training_file,
                validation_file=validation_file, template=template, parameters=parameters)
    sweep = Sweep(organization=organization, name=_name(name), model=model,
                  training_file=training_file, validation_file=validation_file or "",
                  hyperparameters=template, suffix=suffix or "",
                  search_space={p.name: p.stored() for p in parameters}, sampler=sampler,
                  pruner=pruner, pruner_startup_trials=pruner_startup_trials,
                  pruner_warmup_steps=pruner_warmup_steps, metric=metric, max_trials=max_trials,
                  max_parallel=max_parallel, deploy_best=deploy_best, seed=seed, **scoring,
                  created_by=actor.user if actor.api_key is None else actor.api_key.created_by)
    with transaction.atomic(durable=True):
        # The organization's row is locked, so that two creations cannot both take the last place.
        Organization.objects.select_for_update().filter(pk=organization.pk).first()
        if active_sweeps(organization=organization) >= settings.ORG_MAX_ACTIVE_SWEEPS:
            raise ApiError(f"The organization already has {settings.ORG_MAX_ACTIVE_SWEEPS} sweeps "
                           "running (TUNEPLEX_ORG_MAX_ACTIVE_SWEEPS); wait for one to end or "
                           "cancel one.", code="too_many_active_sweeps", status=429)
        sweep.save(force_insert=True)
        audit_record(actor=actor, action="sweep.create", obj=sweep,
                     metadata={"model": model, "max_trials": max_trials, "sampler": sampler,
                               "search_space": sorted(sweep.search_space)})
    return sweep


def _scoring(organization: Organization, metric: str, spec: Any, *, model: str) -> dict:
    """The eval that scores each trial (metric eval), checked as a deploy gate's: its fields."""
    if metric != Sweep.Metric.EVAL:
        if spec is not None:
            raise ApiError("eval scores trials only with metric eval.", code="invalid_value",
                           param="eval")
        return {}
    if not isinstance(spec, dict):
        raise ApiError("metric eval needs eval: {eval_id, data_source, criterion, statistic}.",
                       code="eval_required", param="eval")
    try:
        found = eval_get(organization=organization, eval_id=spec.get("eval_id"))
    except NotFound as exc:
        raise NotFound(exc.message, param="eval.eval_id") from None
    data_source, criterion, statistic = comparison_check(
        found, spec.get("data_source"), spec.get("criterion"), spec.get("statistic"),
        model=model, where="eval.")
    return {"eval": found, "eval_data_source": data_source, "eval_criterion": criterion,
            "eval_statistic": statistic}


def _name(value: Any) -> str:
    if value is None:
        return ""
    if not isinstance(value, str) or len(value) > 300:
        raise ApiError("name must be a string of at most 300 characters.", code="invalid_type",
                       param="name")
    return value


def _check_jobs(organization: Organization, *, model: str, training_file: str,
                validation_file: str | None, template: dict, parameters: list) -> None:
    """The template as a job, then with each parameter at each of its extremes (low and high,
    or each choice): a value no trial could run with is refused now, naming it."""
    request = {"organization": organization, "model": model, "training_file": training_file,
               "validation_file": validation_file}
    job_plan(**request, hyperparameters=template)
    for parameter in parameters:
        for field, value in parameter.extremes():
            try:
                job_plan(**request, hyperparameters={**template, parameter.name: value})
            except ApiError as exc:
                raise ApiError(f"With {parameter.name}={value!r}: {exc.message}", code=exc.code,
                               param=f"search_space.{parameter.name}.{field}") from None


def sweep_cancel(*, organization: Organization, actor: Principal, sweep: Sweep) -> Sweep:
    """Stop the sweep: no trial starts any more, the running trials' jobs are cancelled (their
    workers stop within seconds) and Optuna is told they failed."""
    with transaction.atomic(durable=True):
        locked = Sweep.objects.select_for_update().get(pk=sweep.pk, organization=organization)
        if locked.status != Sweep.Status.RUNNING:
            raise Conflict(f"The sweep has already {locked.status}.", code="sweep_finished")
        locked.status = Sweep.Status.CANCELLED
        locked.finished_at = timezone.now()
        locked.save(update_fields=["status", "finished_at"])
        audit_record(actor=actor, action="sweep.cancel", obj=locked)
    # After the commit: a step that creates a job from now on finds the sweep cancelled and
    # cancels that job itself (tuneplex.sweeps.steps).
    trials = list(trial_list(sweep=locked).filter(state__in=SweepTrial.ACTIVE)
                  .select_related("sweep", "job__organization", "eval_run__organization"))
    for trial in trials:
        trial_cancel(trial, actor=actor)
    return locked


def trial_cancel(trial: SweepTrial, *, actor: Principal) -> None:
    """Cancel the trial's job if it still runs, and tell Optuna the trial failed (or record what
    it was told first, when a step got there before)."""
    job = trial.job
    if job is not None and job.status in FineTuningJob.ACTIVE:
        try:
            job_cancel(organization=job.organization, actor=actor, job=job)
        except Conflict:
            pass  # it ended meanwhile
    run = trial.eval_run
    if run is not None and run.status in EvalRun.ACTIVE:
        eval_run_cancel(organization=run.organization, actor=actor, run=run)
    told = tell(study_for(trial.sweep), trial, state=TrialState.FAIL)
    trial_record_end(trial, told, meant=SweepTrial.State.CANCELLED,
                     error={"code": "cancelled", "message": "The sweep was cancelled."})


def trial_record_end(trial: SweepTrial, told: FrozenTrial, *, meant: str, error: dict | None = None,
                     value: float | None = None) -> None:
    """Copy how Optuna holds the trial now onto its row: ``meant`` where Optuna holds what was
    just told, else what it was told first. ``value``: what the row shows instead of Optuna's
    value (a pruned trial of an eval-scored sweep: its loss, not the negated one Optuna holds)."""
    state = ENDED[told.state]
    if meant == SweepTrial.State.CANCELLED and state == SweepTrial.State.FAILED:
        state = meant
    shown = value if value is not None and state == meant else told.value
    fields = {"state": state, "value": shown, "finished_at": timezone.now()}
    if state in (SweepTrial.State.FAILED, SweepTrial.State.CANCELLED):
        fields["error"] = error
    SweepTrial.objects.filter(pk=trial.pk).update(**fields)
