"""Reads for tenancy. Every query is scoped to one organization."""

from __future__ import annotations

from django.db.models import Q, QuerySet
from django.utils import timezone

from tuneplex.core.errors import NotFound
from tuneplex.tenancy.models import Invitation, Membership, Organization, User


def membership_list(*, organization: Organization) -> QuerySet[Membership]:
    return (Membership.objects.filter(organization=organization)
            .select_related("user").order_by("created_at", "id"))


def membership_get(*, organization: Organization, membership_id: str) -> Membership:
    membership = membership_list(organization=organization).filter(id=membership_id).first()
    if membership is None:
        raise NotFound("No such member.", param="id")
    return membership


def memberships_of_user(*, user: User) -> QuerySet[Membership]:
    return (Membership.objects.filter(user=user).select_related("organization", "user")
            .order_by("created_at", "id"))


def membership_for(*, user: User, organization_id: str | None) -> Membership | None:
    """The user's membership in the organization asked for, else the one they last selected,
    else the one they joined first. Never chosen by another organization's name."""
    memberships = memberships_of_user(user=user)
    for wanted in (organization_id, user.selected_organization_id):
        if wanted:
            chosen = memberships.filter(organization_id=wanted).first()
            if chosen is not None:
                return chosen
    return memberships.first()


def invitation_list(*, organization: Organization) -> QuerySet[Invitation]:
    return (Invitation.objects.filter(organization=organization)
            .select_related("invited_by").order_by("-created_at", "-id"))


def invitation_get(*, organization: Organization, invitation_id: str) -> Invitation:
    invitation = invitation_list(organization=organization).filter(id=invitation_id).first()
    if invitation is None:
        raise NotFound("No such invitation.", param="id")
    return invitation


def invitations_for_user(*, user: User) -> QuerySet[Invitation]:
    """Pending, unexpired invitations addressed to the user's username or email address."""
    addressed = Q(invitee=user.username)
    if user.email:
        addressed |= Q(invitee=user.email.lower())
    return (Invitation.objects.filter(addressed, status=Invitation.Status.PENDING,
                                      expires_at__gt=timezone.now())
            .select_related("organization", "invited_by").order_by("created_at", "id"))


def invitation_for_user_get(*, user: User, invitation_id: str) -> Invitation:
    invitation = invitations_for_user(user=user).filter(id=invitation_id).first()
    if invitation is None:
        raise NotFound("No such invitation.", param="id")
    return invitation
