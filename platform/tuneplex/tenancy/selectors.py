"""Reads for tenancy. Every query is scoped to one organization."""

from __future__ import annotations

from django.db.models import QuerySet

from tuneplex.core.errors import NotFound
from tuneplex.tenancy.models import Membership, Organization, User


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
            .order_by("organization__name", "organization_id"))


def membership_for(*, user: User, organization_id: str | None) -> Membership | None:
    """The user's membership in the given organization, else their first one, else None."""
    memberships = memberships_of_user(user=user)
    if organization_id:
        chosen = memberships.filter(organization_id=organization_id).first()
        if chosen is not None:
            return chosen
    return memberships.first()
