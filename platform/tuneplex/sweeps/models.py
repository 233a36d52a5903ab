"""Hyperparameter sweeps: a job template, a search space and a budget of trials, searched with
Optuna. Each trial is a normal fine-tuning job under the scheduler.

Optuna's study (one per sweep, named by the sweep's id) lives in the platform's own database
(:mod:`tuneplex.sweeps.study`) and decides: what each trial tries, whether it is pruned, which
trial is best. These rows are the platform's side: which job runs which trial, and a copy of
what Optuna was told (params, intermediate values, the final value) for the API and the
dashboard, which never read Optuna's tables.
"""

from django.conf import settings
from django.db import models

from tuneplex.core.ids import id_field_length, new_id


def _sweep_id() -> str:
    return new_id("sweep_")


class Sweep(models.Model):
    class Status(models.TextChoices):
        RUNNING = "running"
        COMPLETED = "completed"  # every trial ended; the best is marked
        FAILED = "failed"  # every trial ended, none with a value
        CANCELLED = "cancelled"

    class Sampler(models.TextChoices):
        GRID = "grid"
        RANDOM = "random"
        TPE = "tpe"

    class Pruner(models.TextChoices):
        MEDIAN = "median"
        SUCCESSIVE_HALVING = "successive_halving"
        NONE = "none"

    class Metric(models.TextChoices):
        VALIDATION_LOSS = "validation_loss"  # the last one reported: lower is better
        EVAL = "eval"  # an eval run on the trial's adapter: higher is better

    id = models.CharField(primary_key=True, max_length=id_field_length("sweep_"), default=_sweep_id,
                          editable=False)
    organization = models.ForeignKey("tenancy.Organization", on_delete=models.CASCADE,
                                     related_name="sweeps")
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True,
                                   on_delete=models.SET_NULL, related_name="+")
    name = models.CharField(max_length=300, blank=True, default="")
    # The job template: what every trial's job is created with, plus its trial's params.
    model = models.CharField(max_length=400)
    training_file = models.CharField(max_length=64)
    validation_file = models.CharField(max_length=64, blank=True, default="")
    hyperparameters = models.JSONField(default=dict, blank=True)
    suffix = models.CharField(max_length=64, blank=True, default="")
    search_space = models.JSONField(help_text="As checked: {name: {type, low, high, log, step, choices}}.")
    sampler = models.CharField(max_length=24, choices=Sampler.choices)
    pruner = models.CharField(max_length=24, choices=Pruner.choices)
    pruner_startup_trials = models.PositiveIntegerField(default=2, help_text=(
        "Trials that must have completed before the median pruner stops any."))
    pruner_warmup_steps = models.PositiveIntegerField(default=0, help_text=(
        "Steps of a trial during which it is never pruned."))
    metric = models.CharField(max_length=24, choices=Metric.choices,
                              default=Metric.VALIDATION_LOSS)
    # metric "eval": each trial's adapter is scored by a run of this eval (as a deploy gate's:
    # a completions data source without its model, a criterion and its statistic).
    eval = models.ForeignKey("evals.Eval", null=True, blank=True, on_delete=models.SET_NULL,
                             related_name="sweeps")
    eval_data_source = models.JSONField(null=True, blank=True)
    eval_criterion = models.CharField(max_length=300, blank=True, default="")
    eval_statistic = models.CharField(max_length=16, blank=True, default="")
    max_trials = models.PositiveIntegerField()
    max_parallel = models.PositiveIntegerField(null=True, blank=True,
                                               help_text="As requested; the organization's "
                                                         "concurrency limit caps it.")
    deploy_best = models.BooleanField(default=False)
    seed = models.PositiveIntegerField(help_text="The samplers' seed.")
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.RUNNING,
                              db_index=True)
    best_trial = models.ForeignKey("SweepTrial", null=True, blank=True, on_delete=models.SET_NULL,
                                   related_name="+")
    error = models.JSONField(null=True, blank=True)
    deploy_error = models.TextField(blank=True, default="")
    # One step at a time per sweep, whatever the number of beat processes or workers: a step
    # claims the sweep until this time (the database's clock) with a conditional UPDATE.
    step_lease_until = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        indexes = [models.Index(fields=["organization", "-created_at"])]

    @property
    def study_name(self) -> str:
        return self.id


class SweepTrial(models.Model):
    class State(models.TextChoices):
        WAITING = "waiting"  # asked of Optuna, its job not created yet (or refused for now)
        RUNNING = "running"  # its job exists and has not ended
        COMPLETE = "complete"
        PRUNED = "pruned"
        FAILED = "failed"
        CANCELLED = "cancelled"

    ACTIVE = (State.WAITING, State.RUNNING)

    sweep = models.ForeignKey(Sweep, on_delete=models.CASCADE, related_name="trials")
    organization = models.ForeignKey("tenancy.Organization", on_delete=models.CASCADE,
                                     related_name="+")
    number = models.PositiveIntegerField(help_text="Optuna's trial number in the sweep's study.")
    optuna_trial_id = models.BigIntegerField()
    job = models.OneToOneField("finetuning.FineTuningJob", null=True, blank=True,
                               on_delete=models.SET_NULL, related_name="sweep_trial")
    params = models.JSONField(help_text="What Optuna asked this trial to try.")
    state = models.CharField(max_length=16, choices=State.choices, default=State.WAITING)
    value = models.FloatField(null=True, blank=True,
                              help_text="The score Optuna was told: the final validation loss, "
                                        "or the eval's statistic (complete); the last reported "
                                        "validation loss (pruned).")
    eval_run = models.ForeignKey("evals.EvalRun", null=True, blank=True, on_delete=models.SET_NULL,
                                 related_name="+", help_text="The run that scores the trial's "
                                                             "adapter (metric eval).")
    intermediate_values = models.JSONField(default=list, blank=True, help_text=(
        "What Optuna was told while the job ran: [[step, validation loss], ...], by step."))
    error = models.JSONField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["sweep", "number"],
                                               name="sweeps_one_row_per_trial")]
        indexes = [models.Index(fields=["sweep", "state"])]
