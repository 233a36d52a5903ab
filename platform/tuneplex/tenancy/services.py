"""Writes for tenancy: organizations and memberships."""

from __future__ import annotations

import logging
import re
import smtplib
from dataclasses import dataclass
from datetime import timedelta

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.mail import send_mail
from django.core.validators import validate_email
from django.db import IntegrityError, transaction
from django.utils import timezone
from django.utils.text import slugify

from tuneplex.audit.services import audit_record
from tuneplex.core.actors import Principal
from tuneplex.core.errors import ApiError, Conflict
from tuneplex.core.ids import new_id
from tuneplex.core.scopes import Role
from tuneplex.tenancy import links
from tuneplex.tenancy.models import Invitation, Membership, Organization, User
from tuneplex.tenancy.secrets import WANDB_API_KEY, seal
from tuneplex.tenancy.selectors import email_in_use

log = logging.getLogger(__name__)


def organization_create(*, name: str, owner: User) -> Organization:
    """A new organization with ``owner`` as its first owner (the operator's command, sign-up)."""
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


# W&B keys are 40+ letters, digits and underscores, an on-prem key with a prefix and a dash
# before them (wandb's own check); a token of W&B's internal clients is a JWT (dots).
WANDB_KEY_FORMAT = re.compile(r"[\w.-]{40,1000}")


def organization_wandb_key_set(*, organization: Organization, actor: Principal,
                               api_key: str | None) -> Organization:
    """Store the organization's W&B API key, sealed (tenancy.secrets), or remove it (None). The
    key is used for online W&B runs (TUNEPLEX_WANDB_MODE=online) and never shown again."""
    if api_key is not None and not WANDB_KEY_FORMAT.fullmatch(api_key):
        raise ApiError("A W&B API key is 40 or more letters, digits, '_' or '-' (an on-prem "
                       "key with its prefix).",
                       code="invalid_api_key", param="api_key")
    with transaction.atomic():
        organization = Organization.objects.select_for_update().get(pk=organization.pk)
        organization.wandb_api_key_sealed = (seal(api_key, purpose=WANDB_API_KEY)
                                             if api_key is not None else "")
        organization.wandb_api_key_updated_at = timezone.now() if api_key is not None else None
        organization.save(update_fields=["wandb_api_key_sealed", "wandb_api_key_updated_at"])
        action = "set" if api_key is not None else "remove"
        audit_record(actor=actor, obj=organization, action=f"organization.wandb_key.{action}")
    return organization


def membership_set_role(*, organization: Organization, actor: Principal, membership: Membership,
                        role: str) -> Membership:
    _check_can_grant(actor=actor, role=role)
    with transaction.atomic():
        membership = Membership.objects.select_for_update().get(pk=membership.pk,
                                                                organization=organization)
        if membership.role == Role.OWNER:
            _check_can_grant(actor=actor, role=Role.OWNER)  # only owners change an owner's role
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
        user = membership.user
        membership.delete()
        revoked = api_keys_revoke_of_user(user=user, organization=organization)
        if revoked:
            audit_record(actor=actor, action="api_key.revoke", obj=organization,
                         metadata={"reason": "creator removed", "keys": revoked})


def _check_can_grant(*, actor: Principal, role: str) -> None:
    if role not in Role.values:
        raise ApiError(f"Unknown role {role!r}; use one of {', '.join(Role.values)}.",
                       code="invalid_role", param="role")
    actor_role = actor.membership.role if actor.membership is not None else None
    if role == Role.OWNER and actor_role != Role.OWNER:
        raise ApiError("Only an owner can make, change or remove owners.",
                       code="permission_denied", param="role", status=403)


def _keep_one_owner(*, organization: Organization, leaving: Membership) -> None:
    owners = Membership.objects.filter(organization=organization, role=Role.OWNER)
    if not owners.exclude(pk=leaving.pk).exists():
        raise Conflict("An organization needs at least one owner.", code="last_owner",
                       param="role")


# --- accounts -------------------------------------------------------------------------------------


EMAIL_TAKEN = "An account with this email address exists already."


def user_create(*, username: str, email: str, password: str | None) -> User:
    """A new account (sign-up). An email address belongs to one account at most: a taken one is
    a 409 ``email_taken`` (param ``email``), also when another sign-up takes it meanwhile."""
    email = email.strip().lower()
    if email_in_use(email):
        raise Conflict(EMAIL_TAKEN, code="email_taken", param="email")
    if User.objects.filter(username__iexact=username).exists():
        raise Conflict("That username is taken.", code="username_taken", param="username")
    try:
        with transaction.atomic():
            return User.objects.create_user(username, email=email, password=password)
    except IntegrityError:
        if email_in_use(email):
            raise Conflict(EMAIL_TAKEN, code="email_taken", param="email") from None
        if User.objects.filter(username__iexact=username).exists():
            raise Conflict("That username is taken.", code="username_taken",
                           param="username") from None
        raise


# --- who belongs: the selected organization, keys of people who leave -----------------------------


def user_select_organization(*, user: User, organization: Organization) -> None:
    """Remember the user's choice of organization (the caller checked the membership)."""
    if user.selected_organization_id != organization.pk:
        user.selected_organization = organization
        user.save(update_fields=["selected_organization"])


def api_keys_revoke_of_user(*, user: User, organization: Organization | None = None) -> list[str]:
    """Revoke the live keys ``user`` created (in one organization, or everywhere): a key never
    outlives its creator's membership or account. Returns the revoked keys' prefixes."""
    from tuneplex.apikeys.models import ApiKey

    keys = ApiKey.objects.filter(created_by=user, revoked_at__isnull=True)
    if organization is not None:
        keys = keys.filter(organization=organization)
    revoked = []
    for key in keys:
        key.revoked_at = timezone.now()
        key.save(update_fields=["revoked_at"])  # per row: the signal clears admission caches
        revoked.append(key.prefix)
    return revoked


# --- invitations ----------------------------------------------------------------------------------


def _normalise_invitee(invitee: str) -> str:
    invitee = invitee.strip()
    return invitee.lower() if "@" in invitee else invitee


@dataclass(frozen=True)
class CreatedInvitation:
    invitation: Invitation
    url: str  # the link, shown to the inviting admin once (and mailed); never stored


def invitation_create(*, organization: Organization, actor: Principal, invitee: str, role: str,
                      base_url: str) -> CreatedInvitation:
    """Invite someone by a link (``base_url``: where invitees reach this server). The link is
    the proof: whoever opens it and signs in may accept it, once, before it expires; ``invitee``
    says whom it is meant for and, when it is an email address and email is configured, where
    it is mailed. The answer is the same whether or not such a user exists."""
    _check_can_grant(actor=actor, role=role)
    invitee = _normalise_invitee(invitee)
    if not invitee:
        raise ApiError("Give a username or an email address.", code="invalid_invitee",
                       param="invitee")
    if "@" in invitee and not _is_email_address(invitee):
        raise ApiError(f"{invitee!r} is not an email address.", code="invalid_invitee",
                       param="invitee")
    token, token_hash = links.new_token()
    url = links.invitation_url(token, base_url=base_url)
    with transaction.atomic():
        Organization.objects.select_for_update().filter(pk=organization.pk).first()
        members = Membership.objects.filter(organization=organization)
        if members.filter(user__username=invitee).exists() or (
                "@" in invitee and members.filter(user__email__iexact=invitee).exists()):
            raise Conflict(f"{invitee} is already a member.", code="already_member",
                           param="invitee")
        pending = Invitation.objects.filter(organization=organization, invitee=invitee,
                                            status=Invitation.Status.PENDING,
                                            expires_at__gt=timezone.now())
        if pending.exists():
            raise Conflict(f"{invitee} already has a pending invitation; revoke it first to "
                           "change it.", code="invitation_exists", param="invitee")
        invitation = Invitation.objects.create(
            organization=organization, invitee=invitee, role=role, token_hash=token_hash,
            invited_by=actor.user if actor.api_key is None else actor.api_key.created_by,
            expires_at=timezone.now() + timedelta(days=settings.INVITATION_DAYS))
        audit_record(actor=actor, action="invitation.create", obj=invitation,
                     metadata={"invitee": invitee, "role": role})
        if invitation_is_mailed(invitation):
            transaction.on_commit(lambda: _mail_invitation(invitation, url))
    return CreatedInvitation(invitation=invitation, url=url)


def _is_email_address(text: str) -> bool:
    try:
        validate_email(text)
    except ValidationError:
        return False
    return True


def invitation_is_mailed(invitation: Invitation) -> bool:
    """Whether the link goes to the invitee by email too: an address, and a configured server."""
    return settings.EMAIL_ENABLED and "@" in invitation.invitee


def _mail_invitation(invitation: Invitation, url: str) -> None:
    inviter = invitation.invited_by.username if invitation.invited_by else "An admin"
    body = (f"{inviter} invites you to join {invitation.organization.name} on Tuneplex as "
            f"{invitation.role}.\n\nOpen this link to accept or decline (sign in or create an "
            f"account first):\n\n{url}\n\nThe link works once and expires on "
            f"{invitation.expires_at:%Y-%m-%d %H:%M} UTC. If you did not expect it, ignore "
            "this message.\n")
    try:
        subject = " ".join(f"Invitation to {invitation.organization.name} on Tuneplex".split())
        send_mail(subject, body, None, [invitation.invitee])  # one line: no header injection
    except (OSError, smtplib.SMTPException) as exc:  # the admin has the link to pass on
        log.warning("invitation %s: mailing it failed (%s: %s)", invitation.pk,
                    type(exc).__name__, exc)


def invitation_revoke(*, organization: Organization, actor: Principal,
                      invitation: Invitation) -> Invitation:
    with transaction.atomic():
        invitation = Invitation.objects.select_for_update().get(pk=invitation.pk,
                                                                organization=organization)
        if invitation.effective_status != Invitation.Status.PENDING:
            raise Conflict(f"The invitation is {invitation.effective_status}.",
                           code="invitation_not_pending")
        if invitation.role == Role.OWNER:
            _check_can_grant(actor=actor, role=Role.OWNER)
        invitation.status = Invitation.Status.REVOKED
        invitation.responded_at = timezone.now()
        invitation.save(update_fields=["status", "responded_at"])
        audit_record(actor=actor, action="invitation.revoke", obj=invitation,
                     metadata={"invitee": invitation.invitee})
    return invitation


def invitation_respond(*, user: User, invitation: Invitation, accept: bool) -> Membership | None:
    """The signed-in holder of the invitation's link accepts (becoming a member with the invited
    role) or declines; either uses the link up. The caller found the invitation by the link's
    token (``selectors.invitation_by_token``): the token is the proof."""
    with transaction.atomic():
        invitation = Invitation.objects.select_for_update().select_related("organization").get(
            pk=invitation.pk)
        if invitation.effective_status != Invitation.Status.PENDING:
            raise Conflict(f"The invitation is {invitation.effective_status}.",
                           code="invitation_not_pending")
        if accept and Membership.objects.filter(organization=invitation.organization,
                                                user=user).exists():
            raise Conflict(f"You are already a member of {invitation.organization.name}; the "
                           "invitation stays open for whom it was meant.", code="already_member")
        invitation.status = (Invitation.Status.ACCEPTED if accept
                             else Invitation.Status.DECLINED)
        invitation.responded_at = timezone.now()
        invitation.accepted_by = user if accept else None
        invitation.save(update_fields=["status", "responded_at", "accepted_by"])
        membership = None
        if accept:
            membership = Membership.objects.create(organization=invitation.organization,
                                                   user=user, role=invitation.role)
            actor = Principal.of_member(membership)
        else:
            actor = Principal(organization=invitation.organization, scopes=frozenset(), user=user)
        audit_record(actor=actor, action=f"invitation.{invitation.status}", obj=invitation,
                     metadata={"invitee": invitation.invitee, "role": invitation.role})
    return membership
