from __future__ import annotations

from django.conf import settings
from drf_spectacular.utils import extend_schema, extend_schema_serializer
from rest_framework import serializers, status
from rest_framework.response import Response

from tuneplex.core.apis import ApiObjectOutput, OrgApi, timestamp
from tuneplex.core.fields import StrictBooleanField, StrictCharField
from tuneplex.core.pagination import list_page
from tuneplex.core.scopes import ADMIN, READ, Role
from tuneplex.tenancy import selectors, services
from tuneplex.tenancy.links import base_url_of


class OrganizationOutput(ApiObjectOutput):
    object_name = "organization"
    id = serializers.CharField()
    name = serializers.CharField()
    slug = serializers.CharField()
    auto_deploy = serializers.BooleanField(
        help_text="Deploy each adapter to the serving pool when its job succeeds.")


class OrganizationApi(OrgApi):
    scopes = {"GET": READ, "PATCH": ADMIN}

    @extend_schema_serializer(component_name="OrganizationUpdateInput")
    class Input(serializers.Serializer):
        name = StrictCharField(max_length=200, required=False)
        auto_deploy = StrictBooleanField(required=False)

    @extend_schema(responses=OrganizationOutput, summary="The caller's organization")
    def get(self, request):
        return Response(OrganizationOutput(self.organization).data)

    @extend_schema(request=Input, responses=OrganizationOutput, summary="Change the organization's settings")
    def patch(self, request):
        data = self.Input(data=request.data)
        data.is_valid(raise_exception=True)
        organization = services.organization_update(organization=self.organization,
                                                    actor=self.principal, **data.validated_data)
        return Response(OrganizationOutput(organization).data)


class MemberOutput(ApiObjectOutput):
    object_name = "organization.member"
    id = serializers.CharField()
    username = serializers.CharField(source="user.username")
    email = serializers.CharField(source="user.email")
    role = serializers.CharField()


class MemberListApi(OrgApi):
    scopes = {"GET": READ}

    @extend_schema(responses=MemberOutput(many=True), summary="List members")
    def get(self, request):
        return Response(list_page(selectors.membership_list(organization=self.organization),
                                  request.query_params, serializer_class=MemberOutput))


class InvitationOutput(ApiObjectOutput):
    object_name = "organization.invitation"
    id = serializers.CharField()
    invitee = serializers.CharField(help_text="The username or email address invited.")
    role = serializers.CharField()
    status = serializers.ChoiceField(source="effective_status",
                                     choices=["pending", "accepted", "declined", "revoked",
                                              "expired"])
    invited_by = serializers.CharField(source="invited_by.username", allow_null=True,
                                       default=None)
    expires_at = serializers.DateTimeField()
    responded_at = serializers.DateTimeField(allow_null=True)


class InvitationCreatedOutput(InvitationOutput):
    url = serializers.SerializerMethodField(
        help_text="The invitation link, in this answer only (the server keeps a hash of its token). "
                  "It is the invitation: whoever opens it and signs in can accept it, once, before "
                  "`expires_at`. Mailed to `invitee` too when that is an email address and the "
                  "server has an SMTP server configured.")

    def get_url(self, obj) -> str:
        return self.context["url"]


class InvitationListApi(OrgApi):
    """Members join by invitation only: the invitee opens the invitation's link, signs in and
    accepts or declines it."""

    scopes = {"GET": ADMIN, "POST": ADMIN}

    @extend_schema_serializer(component_name="InvitationCreateInput")
    class Input(serializers.Serializer):
        invitee = StrictCharField(max_length=254, help_text="A username or an email address.")
        role = serializers.ChoiceField(choices=Role.choices, default=Role.MEMBER)

    @extend_schema(responses=InvitationOutput(many=True), summary="List invitations")
    def get(self, request):
        return Response(list_page(selectors.invitation_list(organization=self.organization),
                                  request.query_params, serializer_class=InvitationOutput))

    @extend_schema(request=Input, responses={201: InvitationCreatedOutput},
                   summary="Invite someone to the organization (answers the invitation link)")
    def post(self, request):
        data = self.Input(data=request.data)
        data.is_valid(raise_exception=True)
        created = services.invitation_create(organization=self.organization,
                                             actor=self.principal, base_url=base_url_of(request),
                                             **data.validated_data)
        output = InvitationCreatedOutput(created.invitation, context={"url": created.url})
        response = Response(output.data, status=status.HTTP_201_CREATED)
        response["Cache-Control"] = "no-store"
        return response


class InvitationRevokeApi(OrgApi):
    scopes = {"POST": ADMIN}

    @extend_schema(request=None, responses=InvitationOutput, summary="Revoke a pending invitation")
    def post(self, request, id: str):
        invitation = selectors.invitation_get(organization=self.organization, invitation_id=id)
        invitation = services.invitation_revoke(organization=self.organization,
                                                actor=self.principal, invitation=invitation)
        return Response(InvitationOutput(invitation).data)


class MemberDetailApi(OrgApi):
    scopes = {"GET": READ, "PATCH": ADMIN, "DELETE": ADMIN}

    @extend_schema_serializer(component_name="MemberUpdateInput")
    class Input(serializers.Serializer):
        role = serializers.ChoiceField(choices=Role.choices)

    @extend_schema(responses=MemberOutput, summary="Retrieve a member")
    def get(self, request, id: str):
        return Response(MemberOutput(selectors.membership_get(
            organization=self.organization, membership_id=id)).data)

    @extend_schema(request=Input, responses=MemberOutput, summary="Change a member's role")
    def patch(self, request, id: str):
        membership = selectors.membership_get(organization=self.organization, membership_id=id)
        data = self.Input(data=request.data)
        data.is_valid(raise_exception=True)
        membership = services.membership_set_role(
            organization=self.organization, actor=self.principal, membership=membership,
            role=data.validated_data["role"])
        return Response(MemberOutput(membership).data)

    @extend_schema(responses={204: None}, summary="Remove a member")
    def delete(self, request, id: str):
        membership = selectors.membership_get(organization=self.organization, membership_id=id)
        services.membership_remove(organization=self.organization, actor=self.principal,
                                   membership=membership)
        return Response(status=status.HTTP_204_NO_CONTENT)


class WandbIntegrationOutput(serializers.Serializer):
    """Whether the organization's W&B API key is set; never the key."""

    object = serializers.SerializerMethodField()
    type = serializers.SerializerMethodField()
    api_key_set = serializers.BooleanField(source="has_wandb_api_key")
    updated_at = serializers.SerializerMethodField(help_text="When the key was set (Unix seconds).")
    mode = serializers.SerializerMethodField(help_text=(
        "How this platform's workers run W&B (TUNEPLEX_WANDB_MODE): offline (files stored with "
        "the job, no key needed) or online (runs sent to W&B with this key)."))

    def get_object(self, obj) -> str:
        return "organization.integration"

    def get_type(self, obj) -> str:
        return "wandb"

    def get_updated_at(self, obj) -> int | None:
        return timestamp(obj.wandb_api_key_updated_at)

    def get_mode(self, obj) -> str:
        return settings.WANDB_MODE


class WandbIntegrationApi(OrgApi):
    """The organization's Weights & Biases API key, used by jobs with a `wandb` integration when
    the platform runs W&B online. Owners and admins set or remove it; nobody reads it back."""

    scopes = {"GET": READ, "POST": ADMIN, "DELETE": ADMIN}

    @extend_schema_serializer(component_name="WandbIntegrationInput")
    class Input(serializers.Serializer):
        api_key = StrictCharField(max_length=1000, trim_whitespace=True,
                                  help_text="The organization's W&B API key (write-only).")

    @extend_schema(responses=WandbIntegrationOutput, summary="Whether the W&B API key is set")
    def get(self, request):
        return Response(WandbIntegrationOutput(self.organization).data)

    @extend_schema(request=Input, responses=WandbIntegrationOutput,
                   summary="Set the organization's W&B API key")
    def post(self, request):
        data = self.Input(data=request.data)
        data.is_valid(raise_exception=True)
        organization = services.organization_wandb_key_set(
            organization=self.organization, actor=self.principal,
            api_key=data.validated_data["api_key"])
        return Response(WandbIntegrationOutput(organization).data)

    @extend_schema(responses={200: WandbIntegrationOutput},
                   summary="Remove the organization's W&B API key")
    def delete(self, request):
        organization = services.organization_wandb_key_set(
            organization=self.organization, actor=self.principal, api_key=None)
        return Response(WandbIntegrationOutput(organization).data)
