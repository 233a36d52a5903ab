from __future__ import annotations

from django.db.models import QuerySet, Sum

from tuneplex.core.errors import NotFound
from tuneplex.files.models import File
from tuneplex.tenancy.models import Organization


def file_list(*, organization: Organization, purpose: str | None = None) -> QuerySet[File]:
    files = File.objects.filter(organization=organization)
    return files.filter(purpose=purpose) if purpose else files


def file_get(*, organization: Organization, file_id: str) -> File:
    found = File.objects.filter(organization=organization, id=file_id).first()
    if found is None:
        raise NotFound(f"No such file: {file_id}.", param="file_id")
    return found


def storage_used(*, organization: Organization) -> int:
    return File.objects.filter(organization=organization).aggregate(total=Sum("bytes"))["total"] or 0
