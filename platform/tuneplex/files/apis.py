"""Files API in OpenAI's shape: POST/GET /v1/files, GET/DELETE /v1/files/{id}, GET …/content."""

from __future__ import annotations

import os

from drf_spectacular.utils import (
    OpenApiParameter,
    OpenApiResponse,
    extend_schema,
    extend_schema_serializer,
)
from rest_framework import serializers
from rest_framework.parsers import MultiPartParser
from rest_framework.response import Response

from tuneplex.core.apis import RANGE_HEADER, AnyAccept, ApiObjectOutput, OrgApi
from tuneplex.core.downloads import blob_response
from tuneplex.core.errors import ApiError
from tuneplex.core.fields import enum_field
from tuneplex.core.pagination import list_page
from tuneplex.core.scopes import READ, TRAIN
from tuneplex.core.validators import clean_name
from tuneplex.files import selectors, services
from tuneplex.files.models import File


class FileOutput(ApiObjectOutput):
    object_name = "file"
    id = serializers.CharField()
    bytes = serializers.IntegerField()
    expires_at = serializers.SerializerMethodField()
    filename = serializers.CharField()
    purpose = serializers.CharField()
    status = serializers.CharField()
    status_details = serializers.SerializerMethodField()
    format = serializers.CharField(help_text="chat, alpaca, prompt_completion, text or "
                                   "preference (DPO pairs); eval_items, batch_requests or "
                                   "batch_output")
    sha256 = serializers.CharField()
    validation = serializers.JSONField(help_text="The validation report: errors with line numbers "
                                       "and codes, and a count per code.")
    statistics_status = serializers.CharField()
    statistics = serializers.JSONField()

    def get_expires_at(self, obj) -> int | None:
        return None  # files do not expire

    def get_status_details(self, obj) -> str | None:
        if obj.status != File.Status.ERROR:
            return None
        report = obj.validation or {}
        first = (report.get("errors") or [{}])[0]
        where = f"line {first['line']}: " if first.get("line") else ""
        return f"{report.get('error_count', 0)} problem(s); first: {where}{first.get('message', '')}"


@extend_schema_serializer(component_name="FileUploadInput")


class FileUploadInput(serializers.Serializer):
    file = serializers.FileField(allow_empty_file=True, help_text="A JSONL file.")
    purpose = enum_field(["fine-tune", "evals", "batch"])(
        help_text="'fine-tune' (a training dataset), 'evals' (an eval run's items) or 'batch' "
                  "(a batch's requests).")


def clean_filename(name: str | None, *, param: str) -> str:
    """A file's name as the client gave it, without its folders; 400 naming ``param`` if it is
    unusable."""
    name = os.path.basename((name or "").replace("\\", "/")) or "upload.jsonl"
    try:
        return clean_name(name, max_length=255)
    except serializers.ValidationError as exc:
        raise ApiError(f"Unusable file name: {exc.detail[0]}", code="invalid_filename",
                       param=param) from None


def _filename(upload) -> str:
    return clean_filename(upload.name, param="file")


class FileListApi(OrgApi):
    scopes = {"GET": READ, "POST": TRAIN}
    parser_classes = [MultiPartParser]

    @extend_schema(parameters=[OpenApiParameter("purpose", str), OpenApiParameter("after", str),
                               OpenApiParameter("limit", int), OpenApiParameter(
                                   "order", str, enum=["asc", "desc"], required=False,
                                   description="By creation time: desc (the default, newest "
                                               "first) or asc, as OpenAI's files.list.")],
                   responses=FileOutput(many=True), summary="List files")
    def get(self, request):
        files = selectors.file_list(organization=self.organization,
                                    purpose=request.query_params.get("purpose"))
        return Response(list_page(files, request.query_params, serializer_class=FileOutput,
                                  default_order="desc"))

    @extend_schema(request={"multipart/form-data": FileUploadInput}, responses=FileOutput,
                   summary="Upload a JSONL dataset (validated while it is stored)")
    def post(self, request):
        data = FileUploadInput(data=request.data)
        data.is_valid(raise_exception=True)
        upload = data.validated_data["file"]
        created = services.file_create(organization=self.organization, actor=self.principal,
                                       upload=upload, purpose=data.validated_data["purpose"],
                                       filename=_filename(upload))
        return Response(FileOutput(created).data)


class FileDetailApi(OrgApi):
    scopes = {"GET": READ, "DELETE": TRAIN}

    @extend_schema(responses=FileOutput, summary="Retrieve a file")
    def get(self, request, id: str):
        return Response(FileOutput(selectors.file_get(organization=self.organization,
                                                      file_id=id)).data)

    @extend_schema(responses={200: dict}, summary="Delete a file (blob and record)")
    def delete(self, request, id: str):
        file = selectors.file_get(organization=self.organization, file_id=id)
        services.file_delete(organization=self.organization, actor=self.principal, file=file)
        return Response({"id": file.id, "object": "file", "deleted": True})


class FileContentApi(OrgApi):
    scopes = {"GET": READ}
    content_negotiation_class = AnyAccept

    @extend_schema(parameters=[RANGE_HEADER], responses={
        (200, "application/jsonl"): bytes,
        (206, "application/jsonl"): OpenApiResponse(bytes, description=(
            "The range asked for (Content-Range says which)")),
        302: OpenApiResponse(description="Where the bucket serves the file: a presigned URL, "
                                         "valid for a short time (S3 storage with "
                                         "TUNEPLEX_DOWNLOAD_REDIRECT_SECONDS set)")},
        summary="Download a file")
    def get(self, request, id: str):
        file = selectors.file_get(organization=self.organization, file_id=id)
        return blob_response(request, file.blob_name, filename=file.filename,
                             content_type="application/jsonl")
