"""Every read of batches: always within one organization (another's is a 404)."""

from __future__ import annotations

from collections.abc import Iterator

from django.db.models import QuerySet

from tuneplex.batches.models import Batch, BatchRequest
from tuneplex.core.errors import NotFound
from tuneplex.tenancy.models import Organization

PAGE = 2000  # rows read at once when a batch's lines are walked in order


def batch_list(*, organization: Organization) -> QuerySet[Batch]:
    return Batch.objects.filter(organization=organization)


def batch_get(*, organization: Organization, batch_id: str) -> Batch:
    found = batch_list(organization=organization).filter(id=batch_id).first()
    if found is None:
        raise NotFound(f"No such batch: {batch_id}.", param="batch_id")
    return found


def active_batches(*, organization: Organization) -> int:
    return Batch.objects.filter(organization=organization, status__in=Batch.ACTIVE).count()


def sent_requests(*, batch: Batch, only: tuple[str, ...] = ()) -> Iterator[BatchRequest]:
    """The batch's sent lines in line order (with ``only`` these fields), read a page at a time
    (bounded memory, no cursor held open between pages)."""
    after = 0
    rows = BatchRequest.objects.filter(batch=batch).order_by("line")
    rows = rows.only(*only) if only else rows
    while True:
        page = list(rows.filter(line__gt=after)[:PAGE])
        yield from page
        if len(page) < PAGE:
            return
        after = page[-1].line
