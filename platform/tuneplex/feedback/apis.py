"""Feedback API: rate an exchange (what the playground's Good/Bad buttons do), list the ratings,
and turn the new thumbs-up exchanges into a dataset (a file) for the next job."""

from __future__ import annotations

from drf_spectacular.utils import extend_schema, extend_schema_serializer
from rest_framework import serializers
from rest_framework.response import Response

from tuneplex.core.apis import ApiObjectOutput, OrgApi
from tuneplex.core.fields import (
    AnswerField,
    MessagesField,
    StrictCharField,
    StrictIntegerField,
    enum_field,
)
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
        model = StrictCharField(max_length=300)
        messages = MessagesField(help_text="Chat messages (role, content) ending with the "
                                                   "assistant's answer being rated.")
        rating = enum_field([1, -1], StrictIntegerField)(help_text="1 (good) or -1 (bad).")

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


class ComparisonOutput(ApiObjectOutput):
    object_name = "feedback.comparison"
    id = serializers.CharField()
    messages = serializers.JSONField(help_text="The prompt, ending with the user's message.")
    preferred = serializers.SerializerMethodField(help_text="The better answer: model, content.")
    non_preferred = serializers.SerializerMethodField(help_text="The other answer.")
    exported_to = serializers.CharField(allow_null=True, source="exported_to_or_none",
                                        help_text="The preference dataset it went into, if any.")

    def get_preferred(self, obj) -> dict:
        return {"model": obj.preferred_model, "content": obj.preferred}

    def get_non_preferred(self, obj) -> dict:
        return {"model": obj.non_preferred_model, "content": obj.non_preferred}


class ComparisonListApi(OrgApi):
    scopes = {"GET": READ, "POST": INFER}

    @extend_schema_serializer(component_name="ComparisonCreateInput")
    class Input(serializers.Serializer):
        messages = MessagesField(help_text="The prompt: chat messages (role, content) "
                                                   "ending with the user's.")
        preferred = AnswerField(help_text="{model, content}: the better answer.")
        non_preferred = AnswerField(help_text="{model, content}: the other answer.")

    @extend_schema(responses=ComparisonOutput(many=True), summary="List compared answer pairs")
    def get(self, request):
        return Response(list_page(selectors.comparison_list(organization=self.organization),
                                  request.query_params, serializer_class=ComparisonOutput))

    @extend_schema(request=Input, responses=ComparisonOutput,
                   summary="Mark the better of two answers to one prompt")
    def post(self, request):
        data = self.Input(data=request.data)
        data.is_valid(raise_exception=True)
        comparison = services.comparison_record(organization=self.organization,
                                                actor=self.principal, **data.validated_data)
        return Response(ComparisonOutput(comparison).data)


class PreferenceExportApi(OrgApi):
    scopes = {"POST": TRAIN}

    @extend_schema(request=None, responses=FileOutput,
                   summary="Write the new comparisons and 👍/👎 pairs into a preference (DPO) dataset")
    def post(self, request):
        file = services.preference_export(organization=self.organization, actor=self.principal)
        return Response(FileOutput(file).data)
