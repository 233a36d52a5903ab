"""Writes for API keys: create (the full key is returned exactly once), revoke, touch."""

from __future__ import annotations

import hashlib
import secrets
import string
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.conf import settings
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from tuneplex.apikeys.models import ApiKey
from tuneplex.audit.services import audit_record
from tuneplex.core.actors import Principal
from tuneplex.core.errors import ApiError, Conflict
from tuneplex.core.scopes import ADMIN, ALL_SCOPES
from tuneplex.tenancy.models import Organization

_ALPHABET = string.ascii_letters + string.digits
SECRET_LENGTH = 40
PREFIX_LENGTH = 12
# last_used_at is written at most this often per key, so reads do not become writes.
LAST_USED_RESOLUTION = timedelta(seconds=60)


@dataclass(frozen=True)
class CreatedKey:
    api_key: ApiKey
    plaintext: str  # shown to the user once, never stored


def hash_key(plaintext: str) -> str:
    return hashlib.sha256(plaintext.encode("utf-8")).hexdigest()


def api_key_create(*, organization: Organization, actor: Principal, name: str,
                   scopes: list[str], expires_at: datetime | None = None) -> CreatedKey:
    unknown = sorted(set(scopes) - set(ALL_SCOPES))
    if unknown:
        raise ApiError(f"Unknown scope(s): {', '.join(unknown)}; use {', '.join(ALL_SCOPES)}.",
                       code="invalid_scope", param="scopes")
    if not scopes:
        raise ApiError("A key needs at least one scope.", code="invalid_scope", param="scopes")
    beyond = sorted(set(scopes) - actor.scopes)
    if beyond:
        raise ApiError(f"You cannot grant scope(s) you do not hold: {', '.join(beyond)}.",
                       code="permission_denied", param="scopes", status=403)
    if expires_at is not None and expires_at <= timezone.now():
        raise ApiError("expires_at must be in the future.", code="invalid_expiry",
                       param="expires_at")
    plaintext = settings.API_KEY_PREFIX + "".join(
        secrets.choice(_ALPHABET) for _ in range(SECRET_LENGTH)
    )
    with transaction.atomic():
        # Lock the organization so concurrent creations cannot overshoot the cap together.
        Organization.objects.select_for_update().filter(pk=organization.pk).first()
        live = ApiKey.objects.filter(organization=organization, revoked_at__isnull=True).filter(
            Q(expires_at__isnull=True) | Q(expires_at__gt=timezone.now())).count()
        if live >= settings.ORG_MAX_API_KEYS:
            raise Conflict(f"The organization has {live} live API keys, the most allowed "
                           f"(TUNEPLEX_ORG_MAX_API_KEYS); revoke one first.",
                           code="api_key_limit_reached")
        api_key = ApiKey.objects.create(
            organization=organization,
            name=name,
            prefix=plaintext[:PREFIX_LENGTH],
            hashed_key=hash_key(plaintext),
            scopes=sorted(set(scopes), key=ALL_SCOPES.index),
            created_by=actor.user if actor.api_key is None else actor.api_key.created_by,
            expires_at=expires_at,
        )
        audit_record(actor=actor, action="api_key.create", obj=api_key,
                     metadata={"name": name, "scopes": api_key.scopes})
    return CreatedKey(api_key=api_key, plaintext=plaintext)


def api_key_revoke(*, organization: Organization, actor: Principal, api_key: ApiKey) -> ApiKey:
    own = actor.user is not None and api_key.created_by_id == actor.user.pk
    if not own and not actor.has_scope(ADMIN):
        raise ApiError("Only the key's creator or an admin can revoke it.",
                       code="permission_denied", status=403)
    with transaction.atomic():
        api_key = ApiKey.objects.select_for_update().get(pk=api_key.pk, organization=organization)
        if api_key.revoked_at is not None:
            raise Conflict("This key is already revoked.", code="already_revoked")
        api_key.revoked_at = timezone.now()
        api_key.save(update_fields=["revoked_at"])
        audit_record(actor=actor, action="api_key.revoke", obj=api_key)
    return api_key


def api_key_touch(*, api_key: ApiKey) -> None:
    """Record use, at most once per LAST_USED_RESOLUTION (a conditional UPDATE, no race)."""
    now = timezone.now()
    if api_key.last_used_at is not None and now - api_key.last_used_at < LAST_USED_RESOLUTION:
        return
    ApiKey.objects.filter(pk=api_key.pk).filter(
        Q(last_used_at__isnull=True) | Q(last_used_at__lt=now - LAST_USED_RESOLUTION)
    ).update(last_used_at=now)
    api_key.last_used_at = now
