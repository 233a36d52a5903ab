"""Evals in the shape of OpenAI's Evals API: an eval (what an item looks like and how it is
graded), its runs (a model's answers to a set of items, graded) and each run's output items.

The run row, not the broker, is the source of truth for a run's state; its items are stored
one row each, unique per run and item index, so a run resumed on another worker never grades an
item twice.
"""

from django.conf import settings
from django.db import models

from tuneplex.core.ids import id_field_length, new_id


def _eval_id() -> str:
    return new_id("eval_")


def _run_id() -> str:
    return new_id("evalrun_")


def _item_id() -> str:
    return new_id("outputitem_")


class Eval(models.Model):
    id = models.CharField(primary_key=True, max_length=id_field_length("eval_"), default=_eval_id,
                          editable=False)
    organization = models.ForeignKey("tenancy.Organization", on_delete=models.CASCADE,
                                     related_name="evals")
    name = models.CharField(max_length=300, blank=True, default="")
    data_source_config = models.JSONField(help_text=(
        "OpenAI's custom data source config as stored: type 'custom', the item's JSON schema "
        "and include_sample_schema."))
    testing_criteria = models.JSONField(help_text="The graders, validated, in order; names unique.")
    metadata = models.JSONField(default=dict, blank=True)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True,
                                   on_delete=models.SET_NULL, related_name="+")
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        indexes = [models.Index(fields=["organization", "-created_at"])]


class EvalRun(models.Model):
    class Status(models.TextChoices):
        QUEUED = "queued"
        IN_PROGRESS = "in_progress"
        COMPLETED = "completed"
        CANCELED = "canceled"  # OpenAI's spelling for runs
        FAILED = "failed"

    ACTIVE = (Status.QUEUED, Status.IN_PROGRESS)

    id = models.CharField(primary_key=True, max_length=id_field_length("evalrun_"), default=_run_id,
                          editable=False)
    organization = models.ForeignKey("tenancy.Organization", on_delete=models.CASCADE,
                                     related_name="eval_runs")
    eval = models.ForeignKey(Eval, on_delete=models.CASCADE, related_name="runs")
    name = models.CharField(max_length=300, blank=True, default="")
    metadata = models.JSONField(default=dict, blank=True)
    model = models.CharField(max_length=300, blank=True, default="",
                             help_text="The model that answers the items ('' for a jsonl source).")
    data_source = models.JSONField(help_text=(
        "As requested, without inline items (those are in the run's items blob)."))
    items_blob = models.CharField(max_length=300, help_text=(
        "The run's items, one JSON object {item, sample?} a line, in artifact storage: inline "
        "items and uploaded files alike are copied there when the run is created."))
    items_total = models.PositiveIntegerField(default=0)
    items_done = models.PositiveIntegerField(default=0)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.QUEUED,
                              db_index=True)
    error = models.JSONField(null=True, blank=True)
    result_counts = models.JSONField(default=dict, blank=True)
    per_testing_criteria_results = models.JSONField(default=list, blank=True)
    per_model_usage = models.JSONField(default=list, blank=True)
    statistics = models.JSONField(default=dict, blank=True, help_text=(
        "Ours: each criterion's pass rate and mean score with a 95% confidence interval."))
    # Liveness and fencing, as a fine-tuning job's: each claim increments attempts, and a worker's
    # writes count only while it holds the latest attempt.
    attempts = models.PositiveIntegerField(default=0)
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    enqueued_at = models.DateTimeField(null=True, blank=True)
    waiting_for = models.CharField(max_length=200, blank=True, default="", help_text=(
        "What the run is waiting for right now (the organization's budget, an engine), shown "
        "as its progress."))
    cancel_requested = models.BooleanField(default=False)
    undeployed_ok = models.BooleanField(default=False, help_text=(
        "The model is a candidate adapter a deploy gate evaluates before its deploy (set by the "
        "gate only, never through the API)."))
    events = models.JSONField(default=list, blank=True, help_text=(
        "What happened to the run, oldest first: {at, attempt, message} (attempts started and "
        "resumed, items each attempt graded, waits)."))
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True,
                                   on_delete=models.SET_NULL, related_name="+")
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        indexes = [models.Index(fields=["eval", "-created_at"]),
                   models.Index(fields=["organization", "-created_at"])]


class EvalOutputItem(models.Model):
    class Status(models.TextChoices):
        PASS = "pass"
        FAIL = "fail"
        ERROR = "error"  # the sample or a grader could not be made: counted as errored
        TIE = "tie"  # a pairwise run's item that neither model won

    id = models.CharField(primary_key=True, max_length=id_field_length("outputitem_"),
                          default=_item_id, editable=False)
    organization = models.ForeignKey("tenancy.Organization", on_delete=models.CASCADE,
                                     related_name="+")
    run = models.ForeignKey(EvalRun, on_delete=models.CASCADE, related_name="output_items")
    datasource_item_id = models.PositiveIntegerField(help_text="The item's index in the run's items.")
    datasource_item = models.JSONField()
    sample = models.JSONField(help_text="OpenAI's sample: input, output, usage, error, ...")
    results = models.JSONField(help_text="One result per testing criterion, in the eval's order.")
    status = models.CharField(max_length=8, choices=Status.choices)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["run", "datasource_item_id"],
                                               name="evals_one_output_per_item")]
        indexes = [models.Index(fields=["run", "status", "datasource_item_id"])]


def _gate_id() -> str:
    return new_id("gate_")


class DeployGate(models.Model):
    """Deploy only what is better: a newly trained adapter of ``base_model`` (and ``suffix``, when
    set) is evaluated with ``eval`` against the adapter of its family deployed most recently
    (or the base model), and deployed only if it wins by ``margin`` on ``statistic`` of
    ``criterion``. Ours; none of OpenAI's APIs has it."""

    class Statistic(models.TextChoices):
        PASS_RATE = "pass_rate"
        MEAN_SCORE = "mean_score"

    id = models.CharField(primary_key=True, max_length=id_field_length("gate_"), default=_gate_id,
                          editable=False)
    organization = models.ForeignKey("tenancy.Organization", on_delete=models.CASCADE,
                                     related_name="deploy_gates")
    eval = models.ForeignKey(Eval, on_delete=models.CASCADE, related_name="gates")
    base_model = models.ForeignKey("basemodels.BaseModel", on_delete=models.CASCADE,
                                   related_name="+")
    suffix = models.CharField(max_length=64, blank=True, default="", help_text=(
        "Only adapters trained with this suffix (the name family); empty: every adapter of the "
        "base model."))
    data_source = models.JSONField(help_text=(
        "A completions run's data source without its model: the items (a file of purpose "
        "evals), the message template and the sampling parameters."))
    criterion = models.CharField(max_length=300, help_text="The testing criterion compared.")
    statistic = models.CharField(max_length=16, choices=Statistic.choices,
                                 default=Statistic.PASS_RATE)
    margin = models.FloatField(default=0.0, help_text=(
        "How much higher the candidate's statistic must be (0.05: five points of pass rate); "
        "it must be higher in any case."))
    enabled = models.BooleanField(default=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["organization", "base_model", "suffix"],
                                               name="evals_one_gate_per_family")]
        indexes = [models.Index(fields=["organization", "-created_at"])]


class GateDecision(models.Model):
    """One candidate adapter through its gate: the two runs, then the decision and its figures."""

    class Status(models.TextChoices):
        EVALUATING = "evaluating"
        DEPLOYED = "deployed"
        REFUSED = "refused"  # not better by the margin: left undeployed
        FAILED = "failed"  # a run failed or was canceled: left undeployed

    gate = models.ForeignKey(DeployGate, on_delete=models.CASCADE, related_name="decisions")
    adapter = models.OneToOneField("adapters.Adapter", on_delete=models.CASCADE,
                                   related_name="gate_decision")
    incumbent = models.CharField(max_length=300, help_text="The model it was compared with.")
    candidate_run = models.ForeignKey(EvalRun, null=True, on_delete=models.SET_NULL,
                                      related_name="+")
    incumbent_run = models.ForeignKey(EvalRun, null=True, on_delete=models.SET_NULL,
                                      related_name="+")
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.EVALUATING)
    figures = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    decided_at = models.DateTimeField(null=True, blank=True)
