from __future__ import annotations

from django.db.models import QuerySet

from tuneplex.adapters.models import Adapter
from tuneplex.core.errors import NotFound
from tuneplex.tenancy.models import Organization


def adapter_list(*, organization: Organization) -> QuerySet[Adapter]:
    return Adapter.objects.filter(organization=organization).select_related("base_model", "job")


def adapter_get(*, organization: Organization, adapter_id: str) -> Adapter:
    adapter = adapter_list(organization=organization).filter(id=adapter_id).first()
    if adapter is None:
        raise NotFound(f"No such adapter: {adapter_id}.", param="adapter_id")
    return adapter
