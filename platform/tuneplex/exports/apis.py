"""Exports of an adapter (docs/export.md):

    /v1/adapters/{id}/exports                        list, create
    /v1/adapters/{id}/exports/{export_id}            retrieve, delete
    /v1/adapters/{id}/exports/{export_id}/content    download the artifact (Range requests work)
"""

from __future__ import annotations

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import (
    OpenApiResponse,
    extend_schema,
    extend_schema_field,
    extend_schema_serializer,
)
from rest_framework import serializers
from rest_framework.response import Response

from jobs.export import formats
from tuneplex.adapters.selectors import adapter_get
from tuneplex.core.apis import RANGE_HEADER, AnyAccept, ApiObjectOutput, OrgApi, UnixTime
from tuneplex.core.downloads import blob_response
from tuneplex.core.errors import Conflict
from tuneplex.core.fields import enum_field
from tuneplex.core.pagination import list_page
from tuneplex.core.scopes import READ, TRAIN
from tuneplex.exports import selectors, services
from tuneplex.exports.models import Export

QUANTIZATIONS = sorted({q for spec in formats.FORMATS.values() for q in spec.quantizations})
_FORMATS_HELP = "; ".join(
    f"{spec.name}: " + (", ".join(spec.quantizations) + f" (default {spec.default_quantization})"
                        if spec.quantizations else "none")
    for spec in formats.FORMATS.values())


@extend_schema_field({"type": "object", "nullable": True, "additionalProperties": True,
                      "required": ["passed", "kind"], "properties": {
                          "passed": {"type": "boolean"}, "kind": {"type": "string"}}})
class CheckField(serializers.JSONField):
    """The check's result: passed, its kind and its figures (per kind: docs/export.md)."""


class ExportOutput(ApiObjectOutput):
    object_name = "adapter.export"
    id = serializers.CharField()
    adapter_id = serializers.CharField()
    format = serializers.CharField(help_text=", ".join(formats.FORMATS))
    quantization = serializers.SerializerMethodField(
        help_text="The quantization exported (the format's default when none was asked); null "
                  "for a format without one.")
    status = serializers.CharField(help_text=", ".join(Export.Status.values))
    progress = serializers.FloatField(help_text="0 to 1.")
    progress_message = serializers.CharField(help_text="The step it is at.")
    bytes = serializers.IntegerField(help_text="The artifact's size, once it has succeeded; "
                                               "counted in the organization's storage quota.")
    sha256 = serializers.CharField(help_text="The artifact's SHA-256, once it has succeeded.")
    filename = serializers.CharField(help_text="The artifact's file name, once it has succeeded.")
    check = CheckField(source="check_result", help_text=(
        "The check run on the artifact before it is offered: {passed, kind, ...figures}; "
        "null until it has run. A failed check fails the export and its figures stay here."))
    error = serializers.CharField(help_text="`code: message` when it failed; empty otherwise.")
    started_at = UnixTime()
    finished_at = UnixTime()

    def get_quantization(self, export) -> str | None:
        return export.quantization or None


class ExportListApi(OrgApi):
    scopes = {"GET": READ, "POST": TRAIN}

    @extend_schema_serializer(component_name="ExportCreateInput")
    class Input(serializers.Serializer):
        format = enum_field(list(formats.FORMATS))(help_text="What to export: " + "; ".join(
            f"`{spec.name}`: {spec.summary}" for spec in formats.FORMATS.values()))
        quantization = enum_field(QUANTIZATIONS)(
            required=False, allow_null=True,
            help_text=f"Per format ({_FORMATS_HELP}); left out or null: the format's default.")

    @extend_schema(responses=ExportOutput(many=True), summary="List an adapter's exports")
    def get(self, request, id: str):
        adapter = adapter_get(organization=self.organization, adapter_id=id)
        return Response(list_page(selectors.export_list(organization=self.organization,
                                                        adapter=adapter),
                                  request.query_params, serializer_class=ExportOutput))

    @extend_schema(request=Input, responses={
        202: OpenApiResponse(ExportOutput, description="A new export, queued; or one of the "
                                                       "same kind already queued or running"),
        200: OpenApiResponse(ExportOutput, description="An export of the same kind that has "
                                                       "succeeded already")},
        summary="Export the adapter's model in another format (runs on a worker)")
    def post(self, request, id: str):
        adapter = adapter_get(organization=self.organization, adapter_id=id)
        data = self.Input(data=request.data)
        data.is_valid(raise_exception=True)
        export, _ = services.export_create(organization=self.organization, actor=self.principal,
                                           adapter=adapter, **data.validated_data)
        done = export.status == Export.Status.SUCCEEDED
        return Response(ExportOutput(export).data, status=200 if done else 202)


class ExportDetailApi(OrgApi):
    scopes = {"GET": READ, "DELETE": TRAIN}

    @extend_schema(responses=ExportOutput, summary="Retrieve an export (status, progress, check)")
    def get(self, request, id: str, export_id: str):
        adapter = adapter_get(organization=self.organization, adapter_id=id)
        return Response(ExportOutput(selectors.export_get(
            organization=self.organization, adapter=adapter, export_id=export_id)).data)

    @extend_schema(responses={200: OpenApiTypes.OBJECT},
                   summary="Delete an export and its artifact (its bytes leave the quota)")
    def delete(self, request, id: str, export_id: str):
        adapter = adapter_get(organization=self.organization, adapter_id=id)
        export = selectors.export_get(organization=self.organization, adapter=adapter,
                                      export_id=export_id)
        services.export_delete(organization=self.organization, actor=self.principal,
                               export=export)
        return Response({"id": export.id, "object": "adapter.export.deleted", "deleted": True})


class ExportContentApi(OrgApi):
    scopes = {"GET": READ}
    content_negotiation_class = AnyAccept

    @extend_schema(
        parameters=[RANGE_HEADER],
        responses={
            (200, "application/octet-stream"): OpenApiResponse(bytes, description=(
                "The artifact (application/x-tar or application/octet-stream, per format)")),
            (206, "application/octet-stream"): OpenApiResponse(bytes, description=(
                "The range asked for (Content-Range says which)")),
            302: OpenApiResponse(description="Where the bucket serves the artifact: a "
                                             "presigned URL, valid for a short time (S3 storage "
                                             "with TUNEPLEX_DOWNLOAD_REDIRECT_SECONDS set)"),
            409: OpenApiResponse(description="The export has not succeeded (yet): "
                                             "export_not_ready")},
        summary="Download an export's artifact once it has succeeded")
    def get(self, request, id: str, export_id: str):
        adapter = adapter_get(organization=self.organization, adapter_id=id)
        export = selectors.export_get(organization=self.organization, adapter=adapter,
                                      export_id=export_id)
        if export.status != Export.Status.SUCCEEDED:
            raise Conflict(f"The export is {export.status}; its artifact can be downloaded once "
                           "it has succeeded.", code="export_not_ready", param="export_id")
        return blob_response(request, export.blob_name, filename=export.filename,
                             content_type=formats.FORMATS[export.format].content_type)
