"""Uploads API in OpenAI's shape: a file larger than one request, sent in parts.

POST /v1/uploads, POST /v1/uploads/{id}/parts, POST /v1/uploads/{id}/complete,
POST /v1/uploads/{id}/cancel (the openai SDK's ``client.uploads`` and its
``upload_file_chunked``).
"""

from __future__ import annotations

from drf_spectacular.utils import extend_schema, extend_schema_field
from rest_framework import serializers
from rest_framework.parsers import MultiPartParser
from rest_framework.response import Response

from tuneplex.core.apis import ApiObjectOutput, OrgApi, timestamp
from tuneplex.core.fields import StrictCharField, StrictIntegerField, enum_field
from tuneplex.core.scopes import TRAIN
from tuneplex.files import selectors, upload_services
from tuneplex.files.apis import FileOutput, clean_filename
from tuneplex.files.models import Upload


class UploadOutput(ApiObjectOutput):
    object_name = "upload"
    id = serializers.CharField()
    bytes = serializers.IntegerField(help_text="The size declared at create; complete checks it.")
    filename = serializers.CharField()
    purpose = serializers.CharField()
    status = serializers.SerializerMethodField()
    expires_at = serializers.SerializerMethodField()
    file = serializers.SerializerMethodField()

    # Not an enum in the schema: an enum named "status" would collide with the invitations'.
    @extend_schema_field({"type": "string", "description": "pending, completed, cancelled or "
                          "expired (pending past expires_at)."})
    def get_status(self, obj) -> str:
        return Upload.Status.EXPIRED if getattr(obj, "expired_now", False) else obj.status

    def get_expires_at(self, obj) -> int:
        return timestamp(obj.expires_at)

    @extend_schema_field(FileOutput(allow_null=True, help_text="The file made from the parts, "
                                    "once the upload is completed."))
    def get_file(self, obj) -> dict | None:
        return FileOutput(obj.file).data if obj.file_id else None


class UploadPartOutput(ApiObjectOutput):
    object_name = "upload.part"
    id = serializers.CharField()
    upload_id = serializers.CharField()


class UploadCreateInput(serializers.Serializer):
    bytes = StrictIntegerField(min_value=1, help_text="The file's size in bytes (at most "
                               "TUNEPLEX_UPLOAD_MAX_BYTES).")
    filename = StrictCharField(max_length=255, trim_whitespace=False)
    mime_type = StrictCharField(max_length=100, help_text="text/jsonl (or another JSONL type).")
    purpose = enum_field(["fine-tune", "evals", "batch"])(
        help_text="'fine-tune' (a training dataset), 'evals' (an eval run's items) or 'batch' "
                  "(a batch's requests).")
    expires_after = serializers.JSONField(required=False, help_text="Not supported: files made "
                                          "from uploads are kept until deleted.")


class UploadPartInput(serializers.Serializer):
    data = serializers.FileField(allow_empty_file=True, help_text="The part's bytes (at most "
                                 "TUNEPLEX_UPLOAD_PART_MAX_BYTES).")


class UploadCompleteInput(serializers.Serializer):
    part_ids = serializers.ListField(child=StrictCharField(max_length=100), max_length=100_000,
                                     help_text="The parts, in the order of the file.")
    md5 = StrictCharField(required=False, help_text="The whole file's md5 (hex), checked.")


class UploadCreateApi(OrgApi):
    scopes = {"POST": TRAIN}

    @extend_schema(request=UploadCreateInput, responses=UploadOutput,
                   summary="Start an upload in parts (a file larger than one request)")
    def post(self, request):
        data = UploadCreateInput(data=request.data)
        data.is_valid(raise_exception=True)
        values = data.validated_data
        upload = upload_services.upload_create(
            organization=self.organization, actor=self.principal,
            filename=clean_filename(values["filename"], param="filename"), purpose=values["purpose"],
            mime_type=values["mime_type"], size=values["bytes"],
            expires_after=values.get("expires_after"))
        return Response(UploadOutput(upload).data)


class UploadPartApi(OrgApi):
    scopes = {"POST": TRAIN}
    parser_classes = [MultiPartParser]

    @extend_schema(request={"multipart/form-data": UploadPartInput}, responses=UploadPartOutput,
                   summary="Add a part (a part sent again is another part, with its own id)")
    def post(self, request, id: str):
        upload = selectors.upload_get(organization=self.organization, upload_id=id)
        data = UploadPartInput(data=request.data)
        data.is_valid(raise_exception=True)
        part = upload_services.upload_part_add(organization=self.organization, upload=upload,
                                               data=data.validated_data["data"])
        return Response(UploadPartOutput(part).data)


class UploadCompleteApi(OrgApi):
    scopes = {"POST": TRAIN}

    @extend_schema(request=UploadCompleteInput, responses=UploadOutput,
                   summary="Complete an upload: its parts, in order, become a validated file")
    def post(self, request, id: str):
        upload = selectors.upload_get(organization=self.organization, upload_id=id)
        data = UploadCompleteInput(data=request.data)
        data.is_valid(raise_exception=True)
        completed = upload_services.upload_complete(
            organization=self.organization, actor=self.principal, upload=upload,
            part_ids=data.validated_data["part_ids"], md5=data.validated_data.get("md5"))
        return Response(UploadOutput(completed).data)


class UploadCancelApi(OrgApi):
    scopes = {"POST": TRAIN}

    @extend_schema(request=None, responses=UploadOutput, summary="Cancel an upload")
    def post(self, request, id: str):
        upload = selectors.upload_get(organization=self.organization, upload_id=id)
        cancelled = upload_services.upload_cancel(organization=self.organization,
                                                  actor=self.principal, upload=upload)
        return Response(UploadOutput(cancelled).data)
