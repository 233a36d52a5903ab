"""Hyperparameter sweeps API (ours; OpenAI has none):

    /v1/sweeps                  list, create
    /v1/sweeps/{sweep_id}       retrieve (with its trials)
    /v1/sweeps/{sweep_id}/cancel

A sweep is a fine-tuning job template, a search space and a budget of trials; each trial is a
fine-tuning job (GET /v1/fine_tuning/jobs/{job_id} shows it). docs/evaluation.md#sweeps.
"""

from __future__ import annotations

from django.conf import settings
from drf_spectacular.utils import extend_schema, extend_schema_field, extend_schema_serializer
from rest_framework import serializers
from rest_framework.response import Response

from tuneplex.core.apis import ApiObjectOutput, OrgApi, timestamp
from tuneplex.core.fields import StrictBooleanField, StrictCharField, StrictIntegerField, enum_field
from tuneplex.core.pagination import list_page
from tuneplex.core.scopes import READ, TRAIN
from tuneplex.evals.apis import GateDataSourceField
from tuneplex.sweeps import selectors, services, space
from tuneplex.sweeps.models import Sweep
from tuneplex.sweeps.study import direction

_RANGE = {"type": "object", "required": ["type", "low", "high"], "additionalProperties": False,
          "properties": {"type": {"type": "string", "enum": ["float", "int"]},
                         "low": {"type": "number"}, "high": {"type": "number"},
                         "log": {"type": "boolean"}, "step": {"type": "number", "minimum": 0, "exclusiveMinimum": True}}}
_CHOICES = {"type": "object", "required": ["type", "choices"], "additionalProperties": False,
            "properties": {"type": {"type": "string", "enum": ["categorical"]},
                           "choices": {"type": "array", "minItems": 1,
                                       "maxItems": space.MAX_CHOICES,
                                       "items": {"oneOf": [{"type": "string"}, {"type": "number"},
                                                           {"type": "boolean"}]}}}}


@extend_schema_field({"type": "object", "minProperties": 1, "maxProperties": space.MAX_PARAMETERS,
                      "additionalProperties": {"oneOf": [_RANGE, _CHOICES]}})
class SearchSpaceField(serializers.JSONField):
    """{hyperparameter: {type, low, high, log?, step?} or {type: categorical, choices}}, each
    name one of the fine-tuning API's hyperparameters (tuneplex.sweeps.space checks it, naming
    the field)."""


class TrialOutput(serializers.Serializer):
    number = serializers.IntegerField(help_text="Optuna's trial number, from 0.")
    job_id = serializers.CharField(allow_null=True, help_text="The trial's fine-tuning job.")
    params = serializers.JSONField(help_text="The hyperparameters this trial tries.")
    state = serializers.CharField(help_text="waiting, running, complete, pruned, failed or cancelled.")
    value = serializers.FloatField(allow_null=True, help_text=(
        "The score: the final validation loss, or the eval's statistic with metric eval "
        "(complete); the last reported validation loss (pruned)."))
    eval_run_id = serializers.CharField(allow_null=True, help_text=(
        "metric eval: the run that scores the trial's adapter (GET /v1/evals/{eval_id}/runs/"
        "{run_id})."))
    intermediate_values = serializers.SerializerMethodField(help_text=(
        "The validation losses reported to Optuna while the job ran, by step."))
    job_status = serializers.CharField(source="job.status", allow_null=True, default=None)
    fine_tuned_model = serializers.CharField(source="job.fine_tuned_model", allow_null=True,
                                             default=None)
    error = serializers.JSONField(allow_null=True)
    created_at = serializers.SerializerMethodField()
    finished_at = serializers.SerializerMethodField()

    def get_intermediate_values(self, obj) -> list[dict]:
        return [{"step": step, "value": value} for step, value in obj.intermediate_values]

    def get_created_at(self, obj) -> int:
        return timestamp(obj.created_at)

    def get_finished_at(self, obj) -> int | None:
        return timestamp(obj.finished_at)


class SweepEvalOutput(serializers.Serializer):
    eval_id = serializers.CharField(allow_null=True, help_text="null once the eval was deleted.")
    data_source = serializers.JSONField()
    criterion = serializers.CharField()
    statistic = serializers.CharField()


@extend_schema_serializer(component_name="SweepEvalInput")
class SweepEvalInput(serializers.Serializer):
    eval_id = StrictCharField(max_length=64)
    data_source = GateDataSourceField(help_text=(
        "A completions run's data source without its model (each trial's adapter is the model): "
        "the items, the message template and the sampling parameters."))
    criterion = StrictCharField(required=False, max_length=300, help_text=(
        "The testing criterion that scores (default: the eval's first)."))
    statistic = enum_field(["pass_rate", "mean_score"])(required=False, help_text=(
        "Of that criterion, maximized (default pass_rate)."))


class SweepOutput(ApiObjectOutput):
    object_name = "sweep"
    id = serializers.CharField()
    name = serializers.CharField()
    status = serializers.CharField(help_text="running, completed, failed or cancelled.")
    model = serializers.CharField()
    training_file = serializers.CharField()
    validation_file = serializers.SerializerMethodField()
    hyperparameters = serializers.JSONField(help_text="The template every trial's job starts from.")
    suffix = serializers.CharField()
    search_space = serializers.JSONField()
    sampler = serializers.CharField()
    pruner = serializers.CharField()
    pruner_startup_trials = serializers.IntegerField()
    pruner_warmup_steps = serializers.IntegerField()
    metric = serializers.CharField()
    eval = serializers.SerializerMethodField(help_text="metric eval: what scores each trial.")
    direction = serializers.SerializerMethodField()
    max_trials = serializers.IntegerField()
    max_parallel = serializers.IntegerField(allow_null=True, help_text="As requested.")
    parallel = serializers.SerializerMethodField(help_text=(
        "Trials in flight at most: max_parallel capped by the organization's concurrency limit."))
    deploy_best = serializers.BooleanField()
    seed = serializers.IntegerField()
    trials = serializers.SerializerMethodField()
    best_trial = serializers.SerializerMethodField(help_text=(
        "The trial with the best score (the lowest validation loss, or the highest eval "
        "statistic), once the sweep completed."))
    error = serializers.JSONField(allow_null=True)
    deploy_error = serializers.CharField(help_text="Why the best adapter was not deployed, if so.")
    finished_at = serializers.SerializerMethodField()

    def get_validation_file(self, obj) -> str | None:
        return obj.validation_file or None

    @extend_schema_field(SweepEvalOutput(allow_null=True))
    def get_eval(self, obj) -> dict | None:
        if obj.metric != Sweep.Metric.EVAL:
            return None
        return {"eval_id": obj.eval_id, "data_source": obj.eval_data_source,
                "criterion": obj.eval_criterion, "statistic": obj.eval_statistic}

    def get_direction(self, obj) -> str:
        return direction(obj)

    def get_parallel(self, obj) -> int:
        return selectors.parallel_limit(sweep=obj)

    @extend_schema_field(TrialOutput(many=True))
    def get_trials(self, obj) -> list:
        return TrialOutput(selectors.trial_list(sweep=obj), many=True).data

    @extend_schema_field(TrialOutput(allow_null=True))
    def get_best_trial(self, obj) -> dict | None:
        return TrialOutput(obj.best_trial).data if obj.best_trial_id else None

    def get_finished_at(self, obj) -> int | None:
        return timestamp(obj.finished_at)


class SweepListApi(OrgApi):
    scopes = {"GET": READ, "POST": TRAIN}

    @extend_schema_serializer(component_name="SweepCreateInput")
    class Input(serializers.Serializer):
        name = StrictCharField(required=False, max_length=300)
        model = StrictCharField(max_length=400, help_text="A base model (GET /v1/base_models), or "
                                "an adapter or checkpoint to continue training from, as for a job.")
        training_file = StrictCharField(max_length=64)
        validation_file = StrictCharField(max_length=64, required=False, allow_null=True, help_text=(
            "Scored on: each trial's validation loss (or give hyperparameters.validation_split)."))
        hyperparameters = serializers.DictField(required=False, help_text=(
            "The job template: every trial's hyperparameters besides those searched, as for "
            "POST /v1/fine_tuning/jobs (set eval_every_steps so that trials are compared, and "
            "pruned, at the same steps)."))
        suffix = StrictCharField(max_length=services.MAX_SUFFIX, required=False, allow_null=True,
                                 help_text="Each trial's job gets <suffix>-t<number> (default sweep).")
        search_space = SearchSpaceField()
        sampler = enum_field(list(Sweep.Sampler.values))(
            required=False, default="tpe", help_text="grid (every point, in a seeded order), "
            "random, or tpe (Optuna's tree-structured Parzen estimator).")
        pruner = enum_field(list(Sweep.Pruner.values))(
            required=False, default="median", help_text="Stops a trial whose validation loss "
            "falls behind the other trials' at the same step.")
        pruner_startup_trials = StrictIntegerField(required=False, default=2, min_value=0,
                                                   max_value=1000, help_text=(
            "median: trials that must have completed before any is pruned."))
        pruner_warmup_steps = StrictIntegerField(required=False, default=0, min_value=0, help_text=(
            "Steps of each trial during which it is never pruned."))
        metric = enum_field(list(Sweep.Metric.values))(
            required=False, default="validation_loss", help_text=(
                "validation_loss (the last one reported, minimized) or eval (a run of eval on "
                "each trial's adapter, maximized; trials are still pruned by validation loss)."))
        eval = SweepEvalInput(required=False, allow_null=True, help_text="With metric eval.")
        max_trials = StrictIntegerField(min_value=1, max_value=settings.SWEEP_MAX_TRIALS,
                                        help_text="The budget: trials in all.")
        max_parallel = StrictIntegerField(required=False, allow_null=True, min_value=1, help_text=(
            "Trials in flight at once; the organization's concurrency limit caps it."))
        deploy_best = StrictBooleanField(required=False, default=False, help_text=(
            "Deploy the best trial's adapter when the sweep completes (through its family's "
            "deploy gate, where there is one)."))
        seed = StrictIntegerField(required=False, allow_null=True, min_value=0,
                                  max_value=2**31 - 1, help_text="The sampler's seed.")

    @extend_schema(responses=SweepOutput(many=True), summary="List sweeps")
    def get(self, request):
        return Response(list_page(selectors.sweep_list(organization=self.organization),
                                  request.query_params, serializer_class=SweepOutput))

    @extend_schema(request=Input, responses=SweepOutput, summary="Create a hyperparameter sweep")
    def post(self, request):
        data = self.Input(data=request.data)
        data.is_valid(raise_exception=True)
        sweep = services.sweep_create(organization=self.organization, actor=self.principal,
                                      **data.validated_data)
        return Response(SweepOutput(sweep).data)


class SweepDetailApi(OrgApi):
    scopes = {"GET": READ}

    @extend_schema(responses=SweepOutput, summary="Retrieve a sweep and its trials")
    def get(self, request, sweep_id: str):
        return Response(SweepOutput(selectors.sweep_get(organization=self.organization,
                                                        sweep_id=sweep_id)).data)


class SweepCancelApi(OrgApi):
    scopes = {"POST": TRAIN}

    @extend_schema(request=None, responses=SweepOutput,
                   summary="Cancel a sweep (its running trials' jobs are cancelled)")
    def post(self, request, sweep_id: str):
        found = selectors.sweep_get(organization=self.organization, sweep_id=sweep_id)
        sweep = services.sweep_cancel(organization=self.organization, actor=self.principal,
                                      sweep=found)
        return Response(SweepOutput(sweep).data)
