"""Writes for tenancy: organizations and memberships."""

from __future__ import annotations

from django.db import transaction
from django.utils.text import slugify

from tuneplex.audit.services import audit_record
from tuneplex.core.actors import Principal
from tuneplex.core.errors import ApiError, Conflict
from tuneplex.core.ids import new_id
from tuneplex.core.scopes import Role
from tuneplex.tenancy.models import Membership, Organization, User


def organization_create(*, name: str, owner: User) -> Organization:
    base = slugify(name)[:40] or "org"
    slug = base
    with transaction.atomic():
        while Organization.objects.filter(slug=slug).exists():
            slug = f"{base}-{new_id('')[:6].lower()}"
        organization = Organization.objects.create(name=name, slug=slug)
        membership = Membership.objects.create(organization=organization, user=owner,
                                               role=Role.OWNER)
        actor = Principal.of_member(membership)
        audit_record(actor=actor, action="organization.create", obj=organization)
    return organization


def organization_update(*, organization: Organization, actor: Principal, **changes) -> Organization:
    """Change the organization's name or settings (``auto_deploy``)."""
    with transaction.atomic():
        for field, value in changes.items():
            setattr(organization, field, value)
        organization.save(update_fields=list(changes) or None)
        audit_record(actor=actor, action="organization.update", obj=organization, metadata=changes)
    return organization


def membership_add(*, organization: Organization, actor: Principal, user: User,
                   role: str) -> Membership:
    _check_can_grant(actor=actor, role=role)
    with transaction.atomic():
        if Membership.objects.filter(organization=organization, user=user).exists():
            raise Conflict(f"{user.username} is already a member.", code="already_member",
                           param="username")
        membership = Membership.objects.create(organization=organization, user=user, role=role)
        audit_record(actor=actor, action="membership.create", obj=membership,
                     metadata={"username": user.username, "role": role})
    return membership


def membership_set_role(*, organization: Organization, actor: Principal, membership: Membership,
                        role: str) -> Membership:
    _check_can_grant(actor=actor, role=role)
    with transaction.atomic():
        membership = Membership.objects.select_for_update().get(pk=membership.pk,
                                                                organization=organization)
        if membership.role == Role.OWNER and role != Role.OWNER:
            _keep_one_owner(organization=organization, leaving=membership)
        previous = membership.role
        membership.role = role
        membership.save(update_fields=["role"])
        audit_record(actor=actor, action="membership.update", obj=membership,
                     metadata={"role": role, "previous_role": previous})
    return membership


def membership_remove(*, organization: Organization, actor: Principal,
                      membership: Membership) -> None:
    with transaction.atomic():
        membership = Membership.objects.select_for_update().get(pk=membership.pk,
                                                                organization=organization)
        if membership.role == Role.OWNER:
            _check_can_grant(actor=actor, role=Role.OWNER)
            _keep_one_owner(organization=organization, leaving=membership)
        audit_record(actor=actor, action="membership.delete", obj=membership,
                     metadata={"username": membership.user.username})
        membership.delete()


def _check_can_grant(*, actor: Principal, role: str) -> None:
    if role not in Role.values:
        raise ApiError(f"Unknown role {role!r}; use one of {', '.join(Role.values)}.",
                       code="invalid_role", param="role")
    actor_role = actor.membership.role if actor.membership is not None else None
    if role == Role.OWNER and actor_role != Role.OWNER:
        raise ApiError("Only an owner can make or unmake owners.", code="permission_denied",
                       param="role", status=403)


def _keep_one_owner(*, organization: Organization, leaving: Membership) -> None:
    owners = Membership.objects.filter(organization=organization, role=Role.OWNER)
    if not owners.exclude(pk=leaving.pk).exists():
        raise Conflict("An organization needs at least one owner.", code="last_owner",
                       param="role")
