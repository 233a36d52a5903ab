from __future__ import annotations

from drf_spectacular.utils import extend_schema, extend_schema_serializer
from rest_framework import serializers, status
from rest_framework.response import Response

from tuneplex.apikeys import selectors, services
from tuneplex.core.apis import ApiObjectOutput, OrgApi, timestamp
from tuneplex.core.pagination import list_page
from tuneplex.core.scopes import ALL_SCOPES, READ, TRAIN
from tuneplex.core.validators import NameField


class ApiKeyOutput(ApiObjectOutput):
    object_name = "api_key"
    id = serializers.CharField()
    name = serializers.CharField()
    prefix = serializers.CharField(help_text="The key's first characters, to recognise it.")
    scopes = serializers.ListField(child=serializers.CharField())
    created_by = serializers.SerializerMethodField()
    expires_at = serializers.SerializerMethodField()
    revoked_at = serializers.SerializerMethodField()
    last_used_at = serializers.SerializerMethodField()

    def get_created_by(self, obj) -> str | None:
        return obj.created_by.username if obj.created_by else None

    def get_expires_at(self, obj) -> int | None:
        return timestamp(obj.expires_at)

    def get_revoked_at(self, obj) -> int | None:
        return timestamp(obj.revoked_at)

    def get_last_used_at(self, obj) -> int | None:
        return timestamp(obj.last_used_at)


class CreatedApiKeyOutput(ApiKeyOutput):
    key = serializers.CharField(help_text="The full key. Shown only in this response.")


class ApiKeyListApi(OrgApi):
    # Any write-capable member may make keys, never with scopes beyond their own.
    scopes = {"GET": READ, "POST": TRAIN}

    @extend_schema_serializer(component_name="ApiKeyCreateInput")
    class Input(serializers.Serializer):
        name = NameField()
        scopes = serializers.ListField(
            child=serializers.ChoiceField(choices=ALL_SCOPES), allow_empty=False, min_length=1,
            default=lambda: [READ],
            help_text="Any of read, train, infer, admin; within the creator's own.")
        expires_at = serializers.DateTimeField(required=False, allow_null=True)

    @extend_schema(responses=ApiKeyOutput(many=True), summary="List API keys")
    def get(self, request):
        return Response(list_page(selectors.api_key_list(organization=self.organization),
                                  request.query_params, serializer_class=ApiKeyOutput))

    @extend_schema(request=Input, responses={201: CreatedApiKeyOutput},
                   summary="Create an API key (the full key is returned once)")
    def post(self, request):
        data = self.Input(data=request.data)
        data.is_valid(raise_exception=True)
        created = services.api_key_create(organization=self.organization, actor=self.principal,
                                          **data.validated_data)
        body = ApiKeyOutput(created.api_key).data
        body["key"] = created.plaintext
        return Response(body, status=status.HTTP_201_CREATED)


class ApiKeyDetailApi(OrgApi):
    scopes = {"GET": READ}

    @extend_schema(responses=ApiKeyOutput, summary="Retrieve an API key")
    def get(self, request, id: str):
        return Response(ApiKeyOutput(selectors.api_key_get(organization=self.organization,
                                                           key_id=id)).data)


class ApiKeyRevokeApi(OrgApi):
    scopes = {"POST": TRAIN}

    @extend_schema(request=None, responses=ApiKeyOutput, summary="Revoke an API key")
    def post(self, request, id: str):
        api_key = selectors.api_key_get(organization=self.organization, key_id=id)
        api_key = services.api_key_revoke(organization=self.organization, actor=self.principal,
                                          api_key=api_key)
        return Response(ApiKeyOutput(api_key).data)
