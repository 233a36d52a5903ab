"""Fine-tuning jobs API in OpenAI's shape (the `openai` SDK's client.fine_tuning.jobs works)."""

from __future__ import annotations

from typing import Any

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema, extend_schema_serializer
from rest_framework import serializers
from rest_framework.response import Response

from tuneplex.core.apis import ApiObjectOutput, OrgApi, timestamp
from tuneplex.core.downloads import zip_response
from tuneplex.core.errors import ApiError, Conflict
from tuneplex.core.fields import StrictCharField, StrictIntegerField
from tuneplex.core.pagination import list_page
from tuneplex.core.scopes import READ, TRAIN
from tuneplex.finetuning import selectors
from tuneplex.finetuning.services import lifecycle, plan
from tuneplex.finetuning.models import FineTuningJob


def _auto(value):
    return "auto" if value is None else value


class JobOutput(ApiObjectOutput):
    object_name = "fine_tuning.job"
    id = serializers.CharField()
    error = serializers.JSONField()
    fine_tuned_model = serializers.CharField(allow_null=True)
    finished_at = serializers.SerializerMethodField()
    hyperparameters = serializers.SerializerMethodField()
    model = serializers.SerializerMethodField(help_text="As requested: a base model, or the "
                                              "adapter or checkpoint training continued from.")
    organization_id = serializers.CharField()
    result_files = serializers.SerializerMethodField()
    seed = serializers.IntegerField()
    status = serializers.CharField(source="api_status", help_text=(
        "validating_files, queued, running, pausing (a pause waits for the trainer's "
        "checkpoint), paused, succeeded, failed or cancelled."))
    trained_tokens = serializers.IntegerField(allow_null=True)
    training_file = serializers.CharField()
    validation_file = serializers.SerializerMethodField()
    estimated_finish = serializers.SerializerMethodField()
    integrations = serializers.SerializerMethodField()
    metadata = serializers.JSONField()
    method = serializers.SerializerMethodField()
    suffix = serializers.CharField()
    # Ours, beyond OpenAI's object:
    base_model = serializers.CharField(source="base_model.name")
    adapter_method = serializers.CharField(source="method", help_text="lora or qlora")
    lineage = serializers.JSONField(help_text="Continued training: the model it started from "
                                    "(adapter, checkpoint) and the datasets of every generation, "
                                    "oldest first; empty for a job from a base model.")
    training = serializers.SerializerMethodField(help_text="All trainer settings of the job.")
    progress = serializers.SerializerMethodField()
    estimated_memory_bytes = serializers.IntegerField(allow_null=True)

    def get_model(self, obj) -> str:
        return (obj.lineage or {}).get("model") or obj.base_model.name

    def get_finished_at(self, obj) -> int | None:
        return timestamp(obj.finished_at)

    def get_hyperparameters(self, obj) -> dict:
        requested = obj.hyperparameters or {}
        return {"n_epochs": _auto(obj.config.get("epochs")),
                "batch_size": _auto(obj.config.get("batch_size")),
                "learning_rate_multiplier": requested.get("learning_rate_multiplier", "auto")}

    def get_result_files(self, obj) -> list[str]:
        return []

    def get_validation_file(self, obj) -> str | None:
        return obj.validation_file or None

    def get_estimated_finish(self, obj) -> int | None:
        if obj.status != FineTuningJob.Status.RUNNING or obj.eta_seconds is None:
            return None
        from django.utils import timezone

        return int(timezone.now().timestamp() + obj.eta_seconds)

    def get_integrations(self, obj) -> list:
        return obj.integrations or []

    def get_method(self, obj) -> dict:
        hyperparameters = self.get_hyperparameters(obj)
        if obj.method_type == "dpo":
            hyperparameters["beta"] = obj.config.get("dpo_beta")
        return {"type": obj.method_type, obj.method_type: {"hyperparameters": hyperparameters}}

    def get_training(self, obj) -> dict:
        return obj.config

    def get_progress(self, obj) -> dict:
        return {"step": obj.step, "total_steps": obj.total_steps, "eta_seconds": obj.eta_seconds,
                "attempts": obj.attempts}


@extend_schema_serializer(component_name="FineTuningJobCreateInput")


class JobCreateInput(serializers.Serializer):
    model = StrictCharField(max_length=400, help_text=(
        "A base model name (GET /v1/base_models), or, to continue training, one of the "
        "organization's adapters (ft:…) or job checkpoints (<adapter or job>:ckpt-step-N)."))
    training_file = StrictCharField(max_length=64)
    validation_file = StrictCharField(max_length=64, required=False, allow_null=True)
    hyperparameters = serializers.DictField(
        required=False, help_text="OpenAI's n_epochs, batch_size, learning_rate_multiplier (each "
        "'auto' or a value), plus every trainer setting: see docs/fine-tuning.md.")
    method = serializers.DictField(required=False, help_text=(
        "OpenAI's {type: supervised, supervised: {hyperparameters}} or {type: dpo, dpo: "
        "{hyperparameters: {beta, n_epochs, batch_size, learning_rate_multiplier}}}; its "
        "hyperparameters are merged with the top-level ones. dpo trains on a preference file."))
    suffix = StrictCharField(max_length=64, required=False, allow_null=True)
    seed = StrictIntegerField(required=False, allow_null=True, min_value=0, max_value=2**31 - 1)
    metadata = serializers.DictField(
        child=StrictCharField(max_length=512, allow_blank=True), required=False,
        allow_null=True, help_text="Up to 16 string pairs; keys up to 64 characters, values up "
                                   "to 512 (OpenAI's limits).")
    integrations = serializers.JSONField(required=False, allow_null=True, help_text=(
        "Experiment tracking: OpenAI's [{type: wandb, wandb: {project, name, entity, tags}}] "
        "and ours, {type: mlflow, mlflow: {experiment_name, run_name, tags}} (the platform's "
        "tracking server); see docs/evaluation.md#experiment-tracking."))

    def validate_metadata(self, value):
        if value is None:
            return value
        if len(value) > 16:
            raise serializers.ValidationError("At most 16 metadata pairs.", code="too_many_pairs")
        for key in value:
            if not 1 <= len(key) <= 64:
                raise serializers.ValidationError("Metadata keys are 1 to 64 characters.",
                                                  code="invalid_key")
        return value

    def validate_method(self, value):
        kind = value.get("type", "supervised")
        if kind not in plan.METHOD_TYPES:
            raise serializers.ValidationError(
                f"method.type must be one of {', '.join(plan.METHOD_TYPES)}.",
                code="unsupported_method")
        settings = value.get(kind) or {}
        nested = settings.get("hyperparameters") if isinstance(settings, dict) else None
        if not isinstance(nested or {}, dict) or not isinstance(settings, dict):
            raise serializers.ValidationError(f"method.{kind}.hyperparameters must be an object.")
        return {"type": kind, "hyperparameters": nested or {}}


METADATA_FILTER = OpenApiParameter(
    "metadata", OpenApiTypes.OBJECT, OpenApiParameter.QUERY, style="deepObject", explode=True,
    description="Only jobs whose metadata has every pair: metadata[key]=value (at most 16 pairs; "
                "an empty value matches a key set to the empty string). metadata=null: only jobs "
                "without metadata.")


def metadata_filter(query_params) -> dict[str, Any]:
    """OpenAI's metadata filter from the query, as job_list's arguments: metadata[key]=value
    pairs, all to match, or metadata=null (jobs without metadata). A malformed filter is a 400
    naming the parameter at fault."""
    pairs: dict[str, str] = {}
    null = False
    for name in query_params:
        if name == "metadata":
            if query_params.getlist(name) != ["null"]:
                raise ApiError("metadata alone may only be 'null' (jobs without metadata); "
                               "filter by pairs with metadata[key]=value.",
                               code="invalid_metadata_filter", param="metadata")
            null = True
        elif name.startswith("metadata"):
            key = name[len("metadata["):-1]
            if not (name.startswith("metadata[") and name.endswith("]")) or not key:
                raise ApiError(f"{name!r} is no metadata filter; use metadata[key]=value.",
                               code="invalid_metadata_filter", param=name)
            values = query_params.getlist(name)
            if len(values) > 1:
                raise ApiError(f"{name} is given {len(values)} times; a key matches one value.",
                               code="invalid_metadata_filter", param=name)
            if len(key) > 64 or len(values[0]) > 512:
                raise ApiError("Metadata keys are 1 to 64 characters and values at most 512.",
                               code="invalid_metadata_filter", param=name)
            pairs[key] = values[0]
    if null and pairs:
        raise ApiError("metadata=null and metadata[key]=value cannot be combined.",
                       code="invalid_metadata_filter", param="metadata")
    if len(pairs) > 16:
        raise ApiError("At most 16 metadata pairs.", code="invalid_metadata_filter",
                       param="metadata")
    return {"metadata": pairs, "without_metadata": null}


class JobListApi(OrgApi):
    scopes = {"GET": READ, "POST": TRAIN}

    @extend_schema(responses=JobOutput(many=True), summary="List fine-tuning jobs",
                   parameters=[METADATA_FILTER])
    def get(self, request):
        jobs = selectors.job_list(organization=self.organization,
                                  **metadata_filter(request.query_params))
        return Response(list_page(jobs, request.query_params, serializer_class=JobOutput))

    @extend_schema(request=JobCreateInput, responses=JobOutput, summary="Create a fine-tuning job")
    def post(self, request):
        data = JobCreateInput(data=request.data)
        data.is_valid(raise_exception=True)
        values = dict(data.validated_data)
        method = values.pop("method", None) or {"type": "supervised", "hyperparameters": {}}
        hyperparameters = {**method["hyperparameters"], **(values.pop("hyperparameters", None) or {})}
        job = lifecycle.job_create(organization=self.organization, actor=self.principal,
                                  hyperparameters=hyperparameters, method_type=method["type"],
                                  **values)
        return Response(JobOutput(job).data)


class JobDetailApi(OrgApi):
    scopes = {"GET": READ}

    @extend_schema(responses=JobOutput, summary="Retrieve a fine-tuning job")
    def get(self, request, id: str):
        return Response(JobOutput(selectors.job_get(organization=self.organization, job_id=id)).data)


class JobCancelApi(OrgApi):
    scopes = {"POST": TRAIN}

    @extend_schema(request=None, responses=JobOutput, summary="Cancel a fine-tuning job")
    def post(self, request, id: str):
        job = selectors.job_get(organization=self.organization, job_id=id)
        job = lifecycle.job_cancel(organization=self.organization, actor=self.principal, job=job)
        return Response(JobOutput(job).data)


class JobPauseApi(OrgApi):
    scopes = {"POST": TRAIN}

    @extend_schema(request=None, responses=JobOutput, summary=(
        "Pause a fine-tuning job: a waiting one at once; a running one saves a checkpoint at "
        "the end of its step and frees its GPU (status pausing, then paused)"))
    def post(self, request, id: str):
        job = selectors.job_get(organization=self.organization, job_id=id)
        job = lifecycle.job_pause(organization=self.organization, actor=self.principal, job=job)
        return Response(JobOutput(job).data)


class JobResumeApi(OrgApi):
    scopes = {"POST": TRAIN}

    @extend_schema(request=None, responses=JobOutput, summary=(
        "Resume a paused fine-tuning job: queued again, it continues from its newest "
        "checkpoint on any node"))
    def post(self, request, id: str):
        job = selectors.job_get(organization=self.organization, job_id=id)
        job = lifecycle.job_resume(organization=self.organization, actor=self.principal, job=job)
        return Response(JobOutput(job).data)


class EventOutput(ApiObjectOutput):
    object_name = "fine_tuning.job.event"
    id = serializers.CharField()
    level = serializers.CharField()
    message = serializers.CharField()
    data = serializers.JSONField()
    type = serializers.CharField()


class JobEventsApi(OrgApi):
    scopes = {"GET": READ}

    @extend_schema(responses=EventOutput(many=True), summary="List a job's events (newest first)")
    def get(self, request, id: str):
        job = selectors.job_get(organization=self.organization, job_id=id)
        return Response(list_page(selectors.job_events(job=job), request.query_params,
                                  serializer_class=EventOutput))


class CheckpointOutput(ApiObjectOutput):
    object_name = "fine_tuning.job.checkpoint"
    id = serializers.CharField()
    fine_tuned_model_checkpoint = serializers.SerializerMethodField()
    fine_tuning_job_id = serializers.CharField(source="job_id")
    metrics = serializers.SerializerMethodField()
    step_number = serializers.IntegerField(source="step")

    def get_fine_tuned_model_checkpoint(self, obj) -> str:
        return f"{obj.job_id}:ckpt-step-{obj.step}"

    def get_metrics(self, obj) -> dict:
        m = obj.metrics or {}
        return {"step": m.get("step", obj.step), "train_loss": m.get("train_loss"),
                "train_mean_token_accuracy": m.get("token_accuracy"),
                "valid_loss": m.get("eval_loss"),
                "valid_mean_token_accuracy": m.get("eval_token_accuracy")}


class JobCheckpointsApi(OrgApi):
    scopes = {"GET": READ}

    @extend_schema(responses=CheckpointOutput(many=True), summary="List a job's checkpoints")
    def get(self, request, id: str):
        job = selectors.job_get(organization=self.organization, job_id=id)
        return Response(list_page(selectors.job_checkpoints(job=job), request.query_params,
                                  serializer_class=CheckpointOutput))


class JobTensorboardApi(OrgApi):
    scopes = {"GET": READ}

    @extend_schema(responses={(200, "application/zip"): bytes},
                   summary="Download the job's TensorBoard event files (loss, learning rate, "
                           "gradient norm, tokens per second)")
    def get(self, request, id: str):
        job = selectors.job_get(organization=self.organization, job_id=id)
        files = [(blob, blob.rsplit("/", 1)[-1])
                 for blob in selectors.job_tensorboard_files(job=job)]
        return _job_zip(request, job, files, "tensorboard", Conflict(
            "This job has no training curves yet: they are stored when a training attempt ends.",
            code="no_training_curves"))


def _job_zip(request, job: FineTuningJob, files: list[tuple[str, str]], kind: str,
             missing: Conflict):
    """A zip of a job's stored files (blob name, path under the job's folder), or ``missing``."""
    if not files:
        raise missing
    return zip_response(request, [(blob, f"{job.id}/{path}") for blob, path in files],
                        f"{job.id}-{kind}.zip")


class JobWandbApi(OrgApi):
    scopes = {"GET": READ}

    @extend_schema(responses={(200, "application/zip"): bytes},
                   summary="Download the job's W&B run files (one run directory per attempt; "
                           "`wandb sync` uploads them)")
    def get(self, request, id: str):
        job = selectors.job_get(organization=self.organization, job_id=id)
        return _job_zip(request, job, selectors.job_wandb_files(job=job), "wandb", Conflict(
            "This job has no W&B files yet: they are stored when a training attempt with a "
            "wandb integration ends.", code="no_wandb_files"))
