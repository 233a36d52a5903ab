"""Every read of exports: always within one organization and adapter (another's is a 404)."""

from __future__ import annotations

from django.db.models import QuerySet

from tuneplex.adapters.models import Adapter
from tuneplex.core.errors import NotFound
from tuneplex.exports.models import Export
from tuneplex.tenancy.models import Organization


def export_list(*, organization: Organization, adapter: Adapter) -> QuerySet[Export]:
    return Export.objects.filter(organization=organization, adapter=adapter)


def export_get(*, organization: Organization, adapter: Adapter, export_id: str) -> Export:
    found = export_list(organization=organization, adapter=adapter).filter(id=export_id).first()
    if found is None:
        raise NotFound(f"No such export of adapter {adapter.id}: {export_id}.", param="export_id")
    return found


def export_live(*, adapter: Adapter, format: str, quantization: str) -> Export | None:
    """The adapter's export of this kind that is in flight or has succeeded, if any."""
    return Export.objects.filter(adapter=adapter, format=format, quantization=quantization,
                                 status__in=Export.LIVE).first()


def active_exports(*, organization: Organization) -> int:
    return Export.objects.filter(organization=organization, status__in=Export.IN_FLIGHT).count()

