"""Batch API, in the shape of OpenAI's (the official SDK's ``client.batches`` works against it):

    /v1/batches                      list, create
    /v1/batches/{batch_id}           retrieve
    /v1/batches/{batch_id}/cancel    cancel

A batch's input is a file of purpose ``batch`` (``client.files.create(purpose="batch")``); its
results are files of purpose ``batch_output`` (``client.files.content(batch.output_file_id)``).
"""

from __future__ import annotations

from drf_spectacular.utils import extend_schema, extend_schema_serializer
from rest_framework import serializers
from rest_framework.response import Response

from tuneplex.batches import selectors, services
from tuneplex.batches.models import Batch
from tuneplex.core.apis import ApiObjectOutput, OrgApi, UnixTime
from tuneplex.core.fields import StrictCharField, enum_field
from tuneplex.core.pagination import list_page
from tuneplex.core.scopes import INFER, READ
from tuneplex.evals.apis import MetadataField


class RequestCountsOutput(serializers.Serializer):
    total = serializers.IntegerField(source="requests_total")
    completed = serializers.IntegerField(source="requests_completed")
    failed = serializers.IntegerField(source="requests_failed")


class BatchOutput(ApiObjectOutput):
    object_name = "batch"
    id = serializers.CharField()
    endpoint = serializers.CharField()
    model = serializers.SerializerMethodField()
    errors = serializers.SerializerMethodField()
    input_file_id = serializers.CharField()
    completion_window = serializers.CharField()
    status = serializers.CharField()
    output_file_id = serializers.CharField(allow_null=True)
    error_file_id = serializers.CharField(allow_null=True)
    in_progress_at = UnixTime()
    expires_at = UnixTime()
    finalizing_at = UnixTime()
    completed_at = UnixTime()
    failed_at = UnixTime()
    expired_at = UnixTime()
    cancelling_at = UnixTime()
    cancelled_at = UnixTime()
    request_counts = RequestCountsOutput(source="*", help_text=(
        "Updated as the answers land; when the batch ends, completed + failed = total (requests "
        "not run count as failed)."))
    usage = serializers.SerializerMethodField()
    metadata = serializers.JSONField()

    def get_model(self, obj) -> str | None:
        return obj.model or None

    def get_errors(self, obj) -> dict | None:
        return {"object": "list", "data": obj.errors} if obj.errors else None

    def get_usage(self, obj) -> dict:
        return {"input_tokens": obj.input_tokens, "output_tokens": obj.output_tokens,
                "total_tokens": obj.input_tokens + obj.output_tokens,
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens_details": {"reasoning_tokens": 0}}


class BatchListApi(OrgApi):
    scopes = {"GET": READ, "POST": INFER}

    @extend_schema_serializer(component_name="BatchCreateInput")
    class Input(serializers.Serializer):
        input_file_id = StrictCharField(max_length=64, help_text=(
            "A file of purpose 'batch': one request a line, {custom_id, method, url, body}."))
        endpoint = enum_field(list(Batch.Endpoint.values))()
        completion_window = enum_field(["24h"])()
        metadata = MetadataField(required=False, allow_null=True)

    @extend_schema(responses=BatchOutput(many=True), summary="List batches (newest first)")
    def get(self, request):
        return Response(list_page(selectors.batch_list(organization=self.organization),
                                  request.query_params, serializer_class=BatchOutput))

    @extend_schema(request=Input, responses=BatchOutput, summary=(
        "Create a batch: its requests are answered in the background within its completion "
        "window"))
    def post(self, request):
        data = self.Input(data=request.data)
        data.is_valid(raise_exception=True)
        batch = services.batch_create(organization=self.organization, actor=self.principal,
                                      **data.validated_data)
        return Response(BatchOutput(batch).data)


class BatchDetailApi(OrgApi):
    scopes = {"GET": READ}

    @extend_schema(responses=BatchOutput, summary="Retrieve a batch (its status and progress)")
    def get(self, request, batch_id: str):
        return Response(BatchOutput(selectors.batch_get(organization=self.organization,
                                                        batch_id=batch_id)).data)


class BatchCancelApi(OrgApi):
    scopes = {"POST": INFER}

    @extend_schema(request=None, responses=BatchOutput, summary=(
        "Cancel a batch: cancelling until its worker stops, then cancelled with what was "
        "answered in its files"))
    def post(self, request, batch_id: str):
        batch = selectors.batch_get(organization=self.organization, batch_id=batch_id)
        cancelled = services.batch_cancel(organization=self.organization, actor=self.principal,
                                          batch=batch)
        return Response(BatchOutput(cancelled).data)
