"""Shared pieces for API views."""

from __future__ import annotations

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema_field
from rest_framework import serializers
from rest_framework.negotiation import BaseContentNegotiation
from rest_framework.views import APIView

from tuneplex.core.actors import Principal


class OrgApi(APIView):
    """An API view acting in the caller's organization. Subclasses set ``scopes``."""

    scopes: dict[str, str] = {}

    @property
    def principal(self) -> Principal:
        return self.request.auth

    @property
    def organization(self):
        return self.request.auth.organization


def timestamp(value) -> int | None:
    """OpenAI's objects carry Unix seconds."""
    return int(value.timestamp()) if value is not None else None


@extend_schema_field({"type": "integer", "nullable": True})
class UnixTime(serializers.Field):
    """A moment as OpenAI's objects carry it: Unix seconds, or null."""

    def __init__(self, **kwargs) -> None:
        super().__init__(read_only=True, **kwargs)

    def to_representation(self, value) -> int | None:
        return timestamp(value)


class ApiObjectOutput(serializers.Serializer):
    """What every API object carries: ``object`` (its kind, as OpenAI names them) and
    ``created_at`` (Unix seconds). Subclasses set ``object_name``."""

    object_name = ""
    object = serializers.SerializerMethodField()
    created_at = serializers.SerializerMethodField()

    def get_object(self, obj) -> str:
        return self.object_name

    def get_created_at(self, obj) -> int:
        return timestamp(obj.created_at)


class AnyAccept(BaseContentNegotiation):
    """A download answers its own content type whatever the client says it accepts (the openai
    SDK's ``files.content`` sends ``Accept: application/binary``, which no renderer matches:
    DRF would answer 406 before the view runs). Its errors are JSON, as everywhere."""

    def select_parser(self, request, parsers):
        return parsers[0] if parsers else None

    def select_renderer(self, request, renderers, format_suffix=None):
        return renderers[0], renderers[0].media_type


# What a blob download (core.downloads.blob_response) takes besides the URL.
RANGE_HEADER = OpenApiParameter(
    "Range", OpenApiTypes.STR, OpenApiParameter.HEADER, required=False,
    description="One byte range (`bytes=a-b`, `bytes=a-`, `bytes=-n`): answered 206 with those "
                "bytes and Content-Range (416 when it starts past the end). Several ranges are "
                "answered 200 with the whole.")
