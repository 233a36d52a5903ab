"""Feedback API: rate an exchange (what the playground's Good/Bad buttons do), list the ratings,
and turn the new thumbs-up exchanges into a dataset (a file) for the next job."""

from __future__ import annotations

from drf_spectacular.utils import extend_schema, extend_schema_serializer
from rest_framework import serializers
from rest_framework.response import Response

from tuneplex.core.apis import ApiObjectOutput, OrgApi
from tuneplex.core.pagination import list_page
from tuneplex.core.scopes import INFER, READ, TRAIN
from tuneplex.feedback import selectors, services
from tuneplex.files.apis import FileOutput


class FeedbackOutput(ApiObjectOutput):
    object_name = "feedback"
    id = serializers.CharField()
    model = serializers.CharField(help_text="The adapter or base model that answered.")
    messages = serializers.JSONField(help_text="The exchange; the last message is the rated answer.")
    rating = serializers.IntegerField(help_text="1: good (trained on when exported); -1: bad.")
    exported_to = serializers.CharField(allow_null=True, source="exported_to_or_none",
                                        help_text="The file it was exported into, if any.")


class FeedbackListApi(OrgApi):
    scopes = {"GET": READ, "POST": INFER}

    @extend_schema_serializer(component_name="FeedbackCreateInput")
    class Input(serializers.Serializer):
        model = serializers.CharField(max_length=300)
        messages = serializers.JSONField(help_text="Chat messages (role, content) ending with the "
                                                   "assistant's answer being rated.")
        rating = serializers.IntegerField(help_text="1 (good) or -1 (bad).")

    @extend_schema(responses=FeedbackOutput(many=True), summary="List rated exchanges")
    def get(self, request):
        return Response(list_page(selectors.feedback_list(organization=self.organization),
                                  request.query_params, serializer_class=FeedbackOutput))

    @extend_schema(request=Input, responses=FeedbackOutput, summary="Rate an exchange")
    def post(self, request):
        data = self.Input(data=request.data)
        data.is_valid(raise_exception=True)
        feedback = services.feedback_record(organization=self.organization, actor=self.principal,
                                            **data.validated_data)
        return Response(FeedbackOutput(feedback).data)


class FeedbackExportApi(OrgApi):
    scopes = {"POST": TRAIN}

    @extend_schema(request=None, responses=FileOutput,
                   summary="Write the new thumbs-up exchanges into a chat dataset (a file)")
    def post(self, request):
        file = services.feedback_export(organization=self.organization, actor=self.principal)
        return Response(FileOutput(file).data)
