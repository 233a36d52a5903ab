"""OpenAI's grader endpoints, so that ``client.fine_tuning.alpha.graders`` works unchanged:

    POST /v1/fine_tuning/alpha/graders/validate   {grader}                        -> {grader}
    POST /v1/fine_tuning/alpha/graders/run        {grader, model_sample, item?}   -> reward, metadata

``run`` grades one sample as an eval run would (a model grader's judge goes through the serving
pool under the caller's own limits), answering in OpenAI's shape with its error flags.
"""

from __future__ import annotations

import json
import time

from asgiref.sync import async_to_sync
from drf_spectacular.utils import (
    extend_schema,
    extend_schema_field,
    extend_schema_serializer,
    inline_serializer,
)
from rest_framework import serializers
from rest_framework.response import Response

import jobs.grading as grading
from tuneplex.core.apis import OrgApi
from tuneplex.core.errors import ApiError
from tuneplex.core.fields import StrictCharField
from tuneplex.core.scopes import INFER, READ
from tuneplex.evals import specs
from tuneplex.evals.executor import grade_one
from tuneplex.inference.gateway import Inside, complete_inside, requester_of
from tuneplex.inference.streams import CHAT

# A result's error code -> OpenAI's flag in metadata.errors.
ERROR_FLAGS = {"template_missing_value": "invalid_variable_error",
               "judge_unparseable": "model_grader_parse_error",
               "judge_out_of_range": "model_grader_parse_error",
               "judge_failed": "model_grader_server_error"}
FLAGS = ("formula_parse_error", "invalid_variable_error", "model_grader_parse_error",
         "model_grader_refusal_error", "model_grader_server_error", "other_error",
         "python_grader_runtime_error", "python_grader_server_error", "sample_parse_error",
         "truncated_observation_error", "unresponsive_reward_error")


@extend_schema_field({"type": "object", "required": ["type", "name"], "properties": {
    "type": {"type": "string", "enum": ["string_check", "text_similarity", "json_check",
                                        "label_model", "score_model", "python"]},
    "name": {"type": "string"}}})
class GraderField(serializers.JSONField):
    """One grader (jobs.grading validates it, naming the field)."""


class GraderValidateApi(OrgApi):
    scopes = {"POST": READ}

    @extend_schema_serializer(component_name="GraderValidateInput")
    class Input(serializers.Serializer):
        grader = GraderField()

    @extend_schema(request=Input, summary="Check a grader", responses=inline_serializer(
        "GraderValidated", {"grader": serializers.JSONField()}))
    def post(self, request):
        data = self.Input(data=request.data)
        data.is_valid(raise_exception=True)
        return Response({"grader": specs.grader(data.validated_data["grader"], "grader")})


class GraderRunApi(OrgApi):
    scopes = {"POST": INFER}

    @extend_schema_serializer(component_name="GraderRunInput")
    class Input(serializers.Serializer):
        grader = GraderField()
        # Within the request body limit even when every character is a JSON escape pair (12
        # bytes): a longer sample is a 400 naming it, not a 413 for the whole body.
        model_sample = StrictCharField(allow_blank=True, max_length=200_000,
                                       help_text="The model's output to grade.")
        item = serializers.JSONField(required=False, help_text="The item the templates read.")

    @extend_schema(request=Input, summary="Grade one sample", responses=inline_serializer(
        "GraderRun", {"reward": serializers.FloatField(), "metadata": serializers.JSONField(),
                      "sub_rewards": serializers.JSONField(),
                      "model_grader_token_usage_per_model": serializers.JSONField()}))
    def post(self, request):
        data = self.Input(data=request.data)
        data.is_valid(raise_exception=True)
        spec = specs.grader(data.validated_data["grader"], "grader")
        item = data.validated_data.get("item") or {}
        if not isinstance(item, dict):
            raise ApiError("item must be an object.", code="invalid_type", param="item")
        inside = Inside(self.principal, requester=requester_of(self.principal))

        async def call(body: dict) -> tuple[int, dict]:
            reply = await complete_inside(inside, CHAT, body)
            return reply.status, json.loads(reply.body or b"{}")

        started = time.perf_counter()
        result = async_to_sync(grade_one)(
            spec, item=item, namespace=grading.sample_namespace(data.validated_data["model_sample"]),
            call=call)
        return Response(_openai_shape(spec, result, time.perf_counter() - started))


def _openai_shape(spec: dict, result: dict, seconds: float) -> dict:
    errors = dict.fromkeys(FLAGS, False)
    error = result.get("error")
    details = None
    if error:
        errors[ERROR_FLAGS.get(error["code"], "other_error")] = True
        details = error["message"]
    judged = result.get("sample") or {}
    usage = judged.get("usage") or None
    model = judged.get("model")
    return {
        "reward": float(result["score"]),
        "metadata": {"name": spec["name"], "type": spec["type"], "errors": {
            **errors, "model_grader_server_error_details": details if errors[
                "model_grader_server_error"] else None,
            "python_grader_runtime_error_details": None, "python_grader_server_error_type": None},
            "execution_time": round(seconds, 4), "scores": {spec["name"]: float(result["score"])},
            "sampled_model_name": model, "token_usage": usage["total_tokens"] if usage else None,
            "passed": bool(result["passed"]), "error": error},
        "sub_rewards": {},
        "model_grader_token_usage_per_model": {model: usage} if model and usage else {},
    }
