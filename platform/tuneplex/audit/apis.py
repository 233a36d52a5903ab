from __future__ import annotations

from drf_spectacular.utils import extend_schema
from rest_framework import serializers
from rest_framework.response import Response

from tuneplex.audit.selectors import audit_event_list
from tuneplex.core.apis import ApiObjectOutput, OrgApi
from tuneplex.core.pagination import list_page
from tuneplex.core.scopes import ADMIN


class AuditEventOutput(ApiObjectOutput):
    object_name = "audit_event"
    id = serializers.CharField()
    actor = serializers.CharField(source="actor_label")
    action = serializers.CharField()
    object_type = serializers.CharField()
    object_id = serializers.CharField()
    metadata = serializers.JSONField()


class AuditEventListApi(OrgApi):
    scopes = {"GET": ADMIN}

    @extend_schema(responses=AuditEventOutput(many=True), summary="List audit events")
    def get(self, request):
        return Response(list_page(audit_event_list(organization=self.organization),
                                  request.query_params, serializer_class=AuditEventOutput))
