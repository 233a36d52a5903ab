from __future__ import annotations

from django.db.models import QuerySet

from tuneplex.apikeys.models import ApiKey
from tuneplex.core.errors import NotFound
from tuneplex.tenancy.models import Organization


def api_key_list(*, organization: Organization) -> QuerySet[ApiKey]:
    return (ApiKey.objects.filter(organization=organization).select_related("created_by")
            .order_by("-created_at", "id"))


def api_key_get(*, organization: Organization, key_id: str) -> ApiKey:
    api_key = api_key_list(organization=organization).filter(id=key_id).first()
    if api_key is None:
        raise NotFound("No such API key.", param="id")
    return api_key


def api_key_by_hash(*, hashed_key: str) -> ApiKey | None:
    """Authentication's lookup: the only read not scoped to an organization (the key names it)."""
    return (ApiKey.objects.select_related("organization", "created_by")
            .filter(hashed_key=hashed_key).first())
