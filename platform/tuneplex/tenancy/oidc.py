"""Single sign-on with OpenID Connect (mozilla-django-oidc), and identity-provider groups mapped
to organizations and roles.

A person signed in through the identity provider is linked to one Tuneplex user by the issuer's
subject (``sub``), never by email or username, so an account at the provider cannot take over a
local account that happens to share its address. The provider's email address is kept on the
account only when the provider says it verified it (``email_verified``) and no other account
has it; otherwise the person is told, and the account has no address from the provider.

TUNEPLEX_OIDC_GROUPS maps the provider's groups to memberships (``group=organization-slug:role``):
the operator who configures it vouches for the provider's groups, so those memberships are made
without an invitation. Memberships the mapping does not name are left alone.
"""

from __future__ import annotations

import logging
import re
import secrets

import requests
from django.conf import settings
from django.contrib import messages
from django.core.exceptions import SuspiciousOperation
from django.db import IntegrityError, transaction
from mozilla_django_oidc.auth import OIDCAuthenticationBackend

from tuneplex.audit.services import audit_record
from tuneplex.core.actors import Principal
from tuneplex.core.scopes import Role
from tuneplex.tenancy.models import Membership, Organization, User
from tuneplex.tenancy.selectors import email_in_use

log = logging.getLogger(__name__)
_USERNAME = re.compile(r"[^\w.@+-]")


class OrganizationOIDCBackend(OIDCAuthenticationBackend):
    def authenticate(self, request, **kwargs):
        try:
            return super().authenticate(request, **kwargs)
        except requests.RequestException as exc:
            # The provider refused the code (stale or replayed) or could not be reached: a
            # failed sign-in (counted, and the sign-in page says so), not a server error.
            log.warning("single sign-on failed at the provider: %s", type(exc).__name__)
            return None

    def filter_users_by_claims(self, claims):
        subject = claims.get("sub")
        if not subject:
            return self.UserModel.objects.none()
        return self.UserModel.objects.filter(oidc_subject=subject)

    def verify_claims(self, claims) -> bool:
        return bool(claims.get("sub"))

    def create_user(self, claims) -> User:
        email = self._email_to_keep(claims, user=None)
        for username in _free_usernames(claims):
            try:
                with transaction.atomic():
                    user = User.objects.create_user(username, email=email,
                                                    oidc_subject=claims["sub"])
                    user.set_unusable_password()  # signs in through the provider only
                    user.save(update_fields=["password"])
            except IntegrityError:  # another sign-in took the name (or address) meanwhile
                email = "" if email and email_in_use(email) else email
                continue
            return self.update_user(user, claims)
        raise SuspiciousOperation("no free username for the provider's account")

    def update_user(self, user: User, claims) -> User:
        if not user.is_active:
            return user  # a deactivated account stays out, whatever the provider says
        email = self._email_to_keep(claims, user=user)
        if email and email != user.email:
            user.email = email
            user.save(update_fields=["email"])
        apply_group_mapping(user, claims.get("groups") or [])
        return user

    def _email_to_keep(self, claims, *, user: User | None) -> str:
        """The provider's address when it says it verified it (``email_verified``) and no other
        account here has it; else "" (the account keeps what it had), and the person is told why."""
        email = (claims.get("email") or "").strip().lower()
        if not email or (user is not None and email == user.email):
            return email
        if not _is_true(claims.get("email_verified")):
            self._tell(f"Your identity provider has not verified your email address {email}, so "
                       "it was not saved on your account here and nothing is matched by it. "
                       "Verify it with your provider and sign in again.")
            return ""
        if email_in_use(email, excluding=user):
            self._tell(f"The email address {email} belongs to another account here, so it was "
                       "not saved on yours.")
            return ""
        return email

    def _tell(self, text: str) -> None:
        request = getattr(self, "request", None)
        if request is not None:
            messages.warning(request, text, fail_silently=True)


def _is_true(claim) -> bool:
    """``email_verified`` is a JSON boolean; a few providers send the string "true"."""
    return claim is True or (isinstance(claim, str) and claim.lower() == "true")


def _free_usernames(claims):
    """Usernames to try for a new account, the provider's preferred one first; one taken (in any
    letter case) is skipped, and the last ones are random, so a collision never ends sign-in."""
    wanted = _USERNAME.sub("", claims.get("preferred_username") or "")[:120] or "user"
    candidates = [wanted, f"{wanted}-{_USERNAME.sub('', claims['sub'])[:8]}"]
    candidates += [f"{wanted}-{secrets.token_hex(4)}" for _ in range(3)]
    for username in candidates:
        if not User.objects.filter(username__iexact=username).exists():
            yield username


def apply_group_mapping(user: User, groups: list[str]) -> None:
    """Make the user a member, with the mapped role, of each organization their groups map to."""
    mapping = dict(settings.OIDC_GROUP_MAP)  # TUNEPLEX_OIDC_GROUPS: {group: (slug, role)}
    for group in groups:
        target = mapping.get(group)
        if target is None:
            continue
        slug, role = target
        organization = Organization.objects.filter(slug=slug).first()
        if organization is None:
            log.warning("TUNEPLEX_OIDC_GROUPS maps %s to %s, which does not exist", group, slug)
            continue
        with transaction.atomic():
            membership, created = Membership.objects.select_for_update().get_or_create(
                organization=organization, user=user, defaults={"role": role})
            if not created and membership.role != role and membership.role != Role.OWNER:
                membership.role = role
                membership.save(update_fields=["role"])
            elif not created:
                continue
            audit_record(actor=Principal.of_member(membership), action="membership.sso",
                         obj=membership, metadata={"group": group, "role": membership.role})
