"""Single sign-on with OpenID Connect (mozilla-django-oidc), and identity-provider groups mapped
to organizations and roles.

A person signed in through the identity provider is linked to one Tuneplex user by the issuer's
subject (``sub``), never by email or username, so an account at the provider cannot take over a
local account that happens to share its address. TUNEPLEX_OIDC_GROUPS maps the provider's groups
to memberships (``group=organization-slug:role``): the operator who configures it vouches for the
provider's groups, so those memberships are made without an invitation. Memberships the mapping
does not name are left alone.
"""

from __future__ import annotations

import logging
import re

from django.conf import settings
from django.db import transaction
from mozilla_django_oidc.auth import OIDCAuthenticationBackend

from tuneplex.audit.services import audit_record
from tuneplex.core.actors import Principal
from tuneplex.core.scopes import Role
from tuneplex.tenancy.models import Membership, Organization, User

log = logging.getLogger(__name__)
_USERNAME = re.compile(r"[^\w.@+-]")


class OrganizationOIDCBackend(OIDCAuthenticationBackend):
    def filter_users_by_claims(self, claims):
        subject = claims.get("sub")
        if not subject:
            return self.UserModel.objects.none()
        return self.UserModel.objects.filter(oidc_subject=subject)

    def verify_claims(self, claims) -> bool:
        return bool(claims.get("sub"))

    def create_user(self, claims) -> User:
        wanted = _USERNAME.sub("", claims.get("preferred_username") or "")[:120] or "user"
        username = wanted
        if User.objects.filter(username__iexact=username).exists():
            username = f"{wanted}-{_USERNAME.sub('', claims['sub'])[:8]}"
        user = User.objects.create_user(username, email=(claims.get("email") or "").lower(),
                                        oidc_subject=claims["sub"])
        user.set_unusable_password()  # signs in through the provider only
        user.save(update_fields=["password"])
        return self.update_user(user, claims)

    def update_user(self, user: User, claims) -> User:
        if not user.is_active:
            return user  # a deactivated account stays out, whatever the provider says
        apply_group_mapping(user, claims.get("groups") or [])
        return user


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
