"""Evals API, in the shape of OpenAI's (the official SDK's ``client.evals`` works against it):

    /v1/evals                                   list, create
    /v1/evals/{eval_id}                         retrieve, update (name, metadata), delete
    /v1/evals/{eval_id}/runs                    list, create
    /v1/evals/{eval_id}/runs/{run_id}           retrieve, delete
    /v1/evals/{eval_id}/runs/{run_id}/cancel    cancel
    /v1/evals/{eval_id}/runs/{run_id}/output_items[/{output_item_id}]

The checks of what an eval or a run may say are in :mod:`tuneplex.evals.specs` (each refusal
names its field); graders are :mod:`jobs.grading`.
"""

from __future__ import annotations

from drf_spectacular.utils import (
    OpenApiParameter,
    extend_schema,
    extend_schema_field,
    extend_schema_serializer,
    inline_serializer,
)
from rest_framework import serializers
from rest_framework.response import Response

from tuneplex.core.apis import ApiObjectOutput, OrgApi, timestamp
from tuneplex.core.fields import StrictBooleanField, StrictCharField, StrictFloatField, enum_field
from tuneplex.core.pagination import list_page
from tuneplex.core.scopes import INFER, READ, TRAIN
from tuneplex.evals import gates, selectors, services, specs

ORDER = OpenApiParameter("order", str, enum=["asc", "desc"], required=False,
                         description="By creation time: asc (the default, oldest first) or desc.")


@extend_schema_field({"type": "object", "required": ["type"], "properties": {
    "type": {"type": "string", "enum": ["custom"]},
    "item_schema": {"type": "object"}, "include_sample_schema": {"type": "boolean"}}})
class DataSourceConfigField(serializers.JSONField):
    """A custom data source config (tuneplex.evals.specs checks it, naming the field)."""


@extend_schema_field({"type": "array", "minItems": 1, "maxItems": specs.MAX_CRITERIA, "items": {
    "type": "object", "required": ["type", "name"], "properties": {
        "type": {"type": "string", "enum": ["string_check", "text_similarity", "json_check",
                                            "label_model", "score_model", "python"]},
        "name": {"type": "string"}}}})
class CriteriaField(serializers.JSONField):
    """Graders (jobs.grading validates each, naming the field)."""


@extend_schema_field({"type": "object", "required": ["type", "source"], "properties": {
    "type": {"type": "string", "enum": ["completions", "jsonl"]},
    "source": {"type": "object", "required": ["type"], "properties": {
        "type": {"type": "string", "enum": ["file_content", "file_id"]}}},
    "model": {"type": "string"}, "input_messages": {"type": "object"},
    "sampling_params": {"type": "object"}}})
class RunDataSourceField(serializers.JSONField):
    """A run's data source (tuneplex.evals.specs checks it, naming the field)."""


@extend_schema_field({"type": "object", "maxProperties": specs.MAX_METADATA_KEYS,
                      "additionalProperties": {"type": "string", "maxLength": specs.MAX_METADATA_VALUE}})
class MetadataField(serializers.JSONField):
    """Up to 16 string pairs."""


# --- evals -----------------------------------------------------------------------------------------

class EvalOutput(ApiObjectOutput):
    object_name = "eval"
    id = serializers.CharField()
    name = serializers.CharField()
    data_source_config = serializers.SerializerMethodField()
    testing_criteria = serializers.JSONField()
    metadata = serializers.JSONField()

    def get_data_source_config(self, obj) -> dict:
        return specs.shown_data_source_config(obj.data_source_config)


class EvalListApi(OrgApi):
    scopes = {"GET": READ, "POST": INFER}

    @extend_schema_serializer(component_name="EvalCreateInput")
    class Input(serializers.Serializer):
        name = StrictCharField(required=False, max_length=300)
        data_source_config = DataSourceConfigField()
        testing_criteria = CriteriaField()
        metadata = MetadataField(required=False)

    @extend_schema(responses=EvalOutput(many=True), parameters=[ORDER], summary="List evals")
    def get(self, request):
        return Response(list_page(selectors.eval_list(organization=self.organization),
                                  request.query_params, serializer_class=EvalOutput,
                                  default_order="asc"))

    @extend_schema(request=Input, responses=EvalOutput, summary="Create an eval")
    def post(self, request):
        data = self.Input(data=request.data)
        data.is_valid(raise_exception=True)
        created = services.eval_create(organization=self.organization, actor=self.principal,
                                       **data.validated_data)
        return Response(EvalOutput(created).data)


EVAL_DELETED = inline_serializer("EvalDeleted", {
    "object": serializers.CharField(), "deleted": serializers.BooleanField(),
    "eval_id": serializers.CharField()})


class EvalDetailApi(OrgApi):
    scopes = {"GET": READ, "POST": INFER, "DELETE": INFER}

    @extend_schema_serializer(component_name="EvalUpdateInput")
    class Input(serializers.Serializer):
        name = StrictCharField(required=False, max_length=300)
        metadata = MetadataField(required=False)

    def _eval(self, eval_id: str):
        return selectors.eval_get(organization=self.organization, eval_id=eval_id)

    @extend_schema(responses=EvalOutput, summary="Retrieve an eval")
    def get(self, request, eval_id: str):
        return Response(EvalOutput(self._eval(eval_id)).data)

    @extend_schema(request=Input, responses=EvalOutput, summary="Update an eval's name or metadata",
                   operation_id="evals_update")
    def post(self, request, eval_id: str):
        data = self.Input(data=request.data)
        data.is_valid(raise_exception=True)
        updated = services.eval_update(organization=self.organization, actor=self.principal,
                                       eval=self._eval(eval_id), **data.validated_data)
        return Response(EvalOutput(updated).data)

    @extend_schema(responses=EVAL_DELETED, summary="Delete an eval, its runs and their items")
    def delete(self, request, eval_id: str):
        found = self._eval(eval_id)
        services.eval_delete(organization=self.organization, actor=self.principal, eval=found)
        return Response({"object": "eval.deleted", "deleted": True, "eval_id": found.id})


# --- runs ------------------------------------------------------------------------------------------

class RunOutput(ApiObjectOutput):
    object_name = "eval.run"
    id = serializers.CharField()
    eval_id = serializers.CharField()
    name = serializers.CharField()
    model = serializers.CharField()
    status = serializers.CharField()
    data_source = serializers.JSONField()
    error = serializers.JSONField(allow_null=True)
    result_counts = serializers.SerializerMethodField()
    per_testing_criteria_results = serializers.SerializerMethodField()
    per_model_usage = serializers.JSONField()
    metadata = serializers.JSONField()
    report_url = serializers.SerializerMethodField()
    items_total = serializers.IntegerField(help_text="Ours: the run's items.")
    items_done = serializers.IntegerField(help_text="Ours: items answered and graded so far.")
    waiting_for = serializers.CharField(help_text="Ours: what the run waits for now, if anything.")
    events = serializers.JSONField(help_text=(
        "Ours: what happened to the run, oldest first ({at, attempt, message}): attempts "
        "started and resumed, and the items each graded."))
    statistics = serializers.JSONField(help_text=(
        "Ours, when the run ends: per criterion, the pass rate and the mean score, each with "
        "its 95% confidence interval (docs/evaluation.md)."))

    def get_result_counts(self, obj) -> dict:
        return {"total": 0, "passed": 0, "failed": 0, "errored": 0, **(obj.result_counts or {})}

    def get_per_testing_criteria_results(self, obj) -> list:
        return obj.per_testing_criteria_results or []

    def get_report_url(self, obj) -> str:
        return ""


class RunListApi(OrgApi):
    scopes = {"GET": READ, "POST": INFER}

    @extend_schema_serializer(component_name="EvalRunCreateInput")
    class Input(serializers.Serializer):
        name = StrictCharField(required=False, max_length=300)
        data_source = RunDataSourceField()
        metadata = MetadataField(required=False)

    @extend_schema(responses=RunOutput(many=True), summary="List an eval's runs", parameters=[
        ORDER, OpenApiParameter("status", str, enum=list(selectors.EvalRun.Status.values),
                                required=False)])
    def get(self, request, eval_id: str):
        found = selectors.eval_get(organization=self.organization, eval_id=eval_id)
        runs = selectors.run_list(eval=found, status=request.query_params.get("status"))
        return Response(list_page(runs, request.query_params, serializer_class=RunOutput,
                                  default_order="asc"))

    @extend_schema(request=Input, responses=RunOutput, summary="Start a run of an eval")
    def post(self, request, eval_id: str):
        found = selectors.eval_get(organization=self.organization, eval_id=eval_id)
        data = self.Input(data=request.data)
        data.is_valid(raise_exception=True)
        run = services.eval_run_create(organization=self.organization, actor=self.principal,
                                       eval=found, **data.validated_data)
        return Response(RunOutput(run).data)


RUN_DELETED = inline_serializer("EvalRunDeleted", {
    "object": serializers.CharField(), "deleted": serializers.BooleanField(),
    "run_id": serializers.CharField()})


class RunDetailApi(OrgApi):
    scopes = {"GET": READ, "DELETE": INFER}

    @extend_schema(responses=RunOutput, summary="Retrieve a run (its progress and results)")
    def get(self, request, eval_id: str, run_id: str):
        return Response(RunOutput(_run(self, eval_id, run_id)).data)

    @extend_schema(responses=RUN_DELETED, summary="Delete a run and its items")
    def delete(self, request, eval_id: str, run_id: str):
        run = _run(self, eval_id, run_id)
        services.eval_run_delete(organization=self.organization, actor=self.principal, run=run)
        return Response({"object": "eval.run.deleted", "deleted": True, "run_id": run.id})


def _run(api: OrgApi, eval_id: str, run_id: str):
    found = selectors.eval_get(organization=api.organization, eval_id=eval_id)
    return selectors.run_get(eval=found, run_id=run_id)


class RunCancelApi(OrgApi):
    scopes = {"POST": INFER}

    @extend_schema(request=None, responses=RunOutput, summary="Cancel a run")
    def post(self, request, eval_id: str, run_id: str):
        run = services.eval_run_cancel(organization=self.organization, actor=self.principal,
                                       run=_run(self, eval_id, run_id))
        gates.run_ended(run.id)  # a deploy gate's run: its adapter is left undeployed
        return Response(RunOutput(run).data)


# --- output items ----------------------------------------------------------------------------------

class OutputItemOutput(ApiObjectOutput):
    object_name = "eval.run.output_item"
    id = serializers.CharField()
    run_id = serializers.CharField()
    eval_id = serializers.CharField(source="run.eval_id")
    status = serializers.CharField()
    datasource_item_id = serializers.IntegerField()
    datasource_item = serializers.JSONField()
    results = serializers.JSONField()
    sample = serializers.JSONField()


class OutputItemListApi(OrgApi):
    scopes = {"GET": READ}

    @extend_schema(responses=OutputItemOutput(many=True), summary="List a run's graded items",
                   parameters=[ORDER, OpenApiParameter(
                       "status", str, enum=["pass", "fail", "error", "tie"], required=False,
                       description="Only the items that passed, failed or errored (or, in a "
                                   "pairwise run, that neither model won).")])
    def get(self, request, eval_id: str, run_id: str):
        items = selectors.output_item_list(run=_run(self, eval_id, run_id),
                                           status=request.query_params.get("status"))
        return Response(list_page(items, request.query_params, serializer_class=OutputItemOutput,
                                  default_order="asc"))


class OutputItemDetailApi(OrgApi):
    scopes = {"GET": READ}

    @extend_schema(responses=OutputItemOutput, summary="Retrieve a graded item")
    def get(self, request, eval_id: str, run_id: str, output_item_id: str):
        item = selectors.output_item_get(run=_run(self, eval_id, run_id),
                                         output_item_id=output_item_id)
        return Response(OutputItemOutput(item).data)


# --- deploy gates (ours) ---------------------------------------------------------------------------

class GateDecisionOutput(serializers.Serializer):
    adapter = serializers.CharField(source="adapter.name")
    incumbent = serializers.CharField()
    status = serializers.CharField()
    candidate_run_id = serializers.CharField(allow_null=True)
    incumbent_run_id = serializers.CharField(allow_null=True)
    figures = serializers.JSONField()
    created_at = serializers.SerializerMethodField()
    decided_at = serializers.SerializerMethodField()

    def get_created_at(self, obj) -> int:
        return timestamp(obj.created_at)

    def get_decided_at(self, obj) -> int | None:
        return timestamp(obj.decided_at)


class GateOutput(ApiObjectOutput):
    object_name = "deploy_gate"
    id = serializers.CharField()
    eval_id = serializers.CharField()
    base_model = serializers.CharField(source="base_model.name")
    suffix = serializers.CharField()
    data_source = serializers.JSONField()
    criterion = serializers.CharField()
    statistic = serializers.CharField()
    margin = serializers.FloatField()
    enabled = serializers.BooleanField()
    decisions = serializers.SerializerMethodField(help_text="The latest 20, newest first.")

    def get_decisions(self, obj) -> list[dict]:
        return GateDecisionOutput(selectors.gate_decisions(gate=obj), many=True).data


@extend_schema_field({"type": "object", "required": ["source"], "properties": {
    "source": {"type": "object", "required": ["type"], "properties": {
        "type": {"type": "string", "enum": ["file_content", "file_id"]}}},
    "input_messages": {"type": "object"}, "sampling_params": {"type": "object"}}})
class GateDataSourceField(serializers.JSONField):
    """A completions data source without its model."""


class GateListApi(OrgApi):
    scopes = {"GET": READ, "POST": TRAIN}

    @extend_schema_serializer(component_name="DeployGateCreateInput")
    class Input(serializers.Serializer):
        eval_id = StrictCharField(max_length=64)
        base_model = StrictCharField(max_length=300)
        suffix = StrictCharField(required=False, allow_blank=True, max_length=64)
        data_source = GateDataSourceField()
        criterion = StrictCharField(required=False, max_length=300)
        statistic = enum_field(["pass_rate", "mean_score"])(required=False)
        margin = StrictFloatField(required=False, min_value=0, max_value=1e6)
        enabled = StrictBooleanField(required=False)

    @extend_schema(responses=GateOutput(many=True), summary="List deploy gates")
    def get(self, request):
        return Response(list_page(selectors.gate_list(organization=self.organization),
                                  request.query_params, serializer_class=GateOutput))

    @extend_schema(request=Input, responses=GateOutput, summary=(
        "Gate a family's deploys by an eval: a new adapter is deployed only if it beats the one "
        "serving"))
    def post(self, request):
        data = self.Input(data=request.data)
        data.is_valid(raise_exception=True)
        values = dict(data.validated_data)
        found = selectors.eval_get(organization=self.organization, eval_id=values.pop("eval_id"))
        gate = services.deploy_gate_create(organization=self.organization, actor=self.principal,
                                           eval=found, **values)
        return Response(GateOutput(gate).data)


GATE_DELETED = inline_serializer("DeployGateDeleted", {
    "object": serializers.CharField(), "deleted": serializers.BooleanField(),
    "id": serializers.CharField()})


class GateDetailApi(OrgApi):
    scopes = {"GET": READ, "DELETE": TRAIN}

    @extend_schema(responses=GateOutput, summary="Retrieve a deploy gate and its latest decisions")
    def get(self, request, gate_id: str):
        return Response(GateOutput(selectors.gate_get(organization=self.organization,
                                                      gate_id=gate_id)).data)

    @extend_schema(responses=GATE_DELETED, summary="Delete a deploy gate (new adapters deploy as "
                                                   "the organization's setting says)")
    def delete(self, request, gate_id: str):
        gate = selectors.gate_get(organization=self.organization, gate_id=gate_id)
        services.deploy_gate_delete(organization=self.organization, actor=self.principal, gate=gate)
        return Response({"object": "deploy_gate.deleted", "deleted": True, "id": gate.id})
