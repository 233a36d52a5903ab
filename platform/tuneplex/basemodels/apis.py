from __future__ import annotations

from drf_spectacular.utils import extend_schema
from rest_framework import serializers
from rest_framework.response import Response

from tuneplex.basemodels.selectors import base_model_get, base_model_list
from tuneplex.core.apis import ApiObjectOutput, OrgApi
from tuneplex.core.pagination import list_page
from tuneplex.core.scopes import READ


class BaseModelOutput(ApiObjectOutput):
    object_name = "base_model"
    id = serializers.CharField(source="name")
    parameter_count = serializers.IntegerField()
    max_sequence_length = serializers.IntegerField()
    has_chat_template = serializers.BooleanField()
    methods_allowed = serializers.ListField(child=serializers.CharField())
    enabled = serializers.BooleanField()


class BaseModelListApi(OrgApi):
    scopes = {"GET": READ}

    @extend_schema(responses=BaseModelOutput(many=True), summary="List base models")
    def get(self, request):
        return Response(list_page(base_model_list(), request.query_params,
                                  serializer_class=BaseModelOutput, cursor_field="name"))


class BaseModelDetailApi(OrgApi):
    scopes = {"GET": READ}

    @extend_schema(responses=BaseModelOutput, summary="Retrieve a base model")
    def get(self, request, name: str):
        return Response(BaseModelOutput(base_model_get(name=name)).data)
