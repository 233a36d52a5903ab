"""Reads for tenancy. Every query is scoped to one organization, except those by the proof a
person holds: an invitation link's token, and whether an email address is taken."""

from __future__ import annotations

from django.db.models import QuerySet

from tuneplex.core.errors import NotFound
from tuneplex.tenancy import links
from tuneplex.tenancy.models import Invitation, Membership, Organization, User
from tuneplex.tenancy.secrets import WANDB_API_KEY, unseal


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


def invitation_by_token(*, token: str) -> Invitation:
    """The invitation a link's token stands for, in whatever state (the page says which). The
    token is the proof: it is not scoped to an organization, and one that does not hold is a 404."""
    token_hash = links.token_hash(token)
    invitation = None
    if token_hash is not None:
        invitation = (Invitation.objects.filter(token_hash=token_hash)
                      .select_related("organization", "invited_by").first())
    if invitation is None:
        raise NotFound("This invitation link is not valid.", param="token")
    return invitation


# --- accounts -------------------------------------------------------------------------------------


def email_in_use(email: str, *, excluding: User | None = None) -> bool:
    """Whether another account has this address (compared case-insensitively)."""
    accounts = User.objects.filter(email__iexact=email.strip())
    if excluding is not None:
        accounts = accounts.exclude(pk=excluding.pk)
    return bool(email.strip()) and accounts.exists()


def organization_wandb_api_key(*, organization: Organization) -> str | None:
    """The organization's W&B API key in clear, for the worker that starts an online W&B run
    and nothing else: no API or page returns it. Raises secrets.SecretUnreadable when
    SECRET_KEY changed since it was stored."""
    sealed = (Organization.objects.filter(pk=organization.pk)
              .values_list("wandb_api_key_sealed", flat=True).first())
    return unseal(sealed, purpose=WANDB_API_KEY) if sealed else None
