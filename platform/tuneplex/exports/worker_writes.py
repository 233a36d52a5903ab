"""Sending an export to its worker, the worker's writes and the sweep.

An export is sent once what it needs is there (the adapter's merge, for a format of the merged
model). The worker's writes are each conditional on the export still being its own to write
(running, and not deleted): a worker whose export was failed by the sweep or deleted meanwhile
changes nothing, and learns so from the answer. Timeouts use the database's clock.
"""

from __future__ import annotations

from datetime import timedelta

from django.conf import settings
from django.db import transaction
from django.db.models import Q
from django.db.models.functions import Now

from tuneplex.adapters.models import Adapter
from tuneplex.core import queue
from tuneplex.core.errors import ApiError
from tuneplex.exports.models import Export
from tuneplex.files.selectors import storage_quota_check
from tuneplex.tenancy.models import Organization

Status = Export.Status
Merge = Adapter.MergeStatus


def export_send(export_id: str) -> None:
    """Send a queued export to the exports queue if it can run now (a format of the merged model
    once the adapter's merge has succeeded); fail it if the merge failed; else leave it waiting
    (the merge's end sends it). Sending twice is harmless: the worker's claim is fenced."""
    export = Export.objects.select_related("adapter").filter(
        id=export_id, status=Export.Status.QUEUED).first()
    if export is None:
        return
    if export.needs_merge:
        merge = export.adapter.merge_status
        if merge in (Merge.QUEUED, Merge.RUNNING):
            return
        if merge != Merge.SUCCEEDED:
            reason = export.adapter.merge_error or "the adapter has no merged model"
            _fail(export.id, f"merge_failed: {reason}", None, (Status.QUEUED,))
            return
    Export.objects.filter(id=export.id, status=Export.Status.QUEUED).update(enqueued_at=Now())
    queue.enqueue(queue.EXPORT_RUN, export.id)


def exports_after_merge(adapter_id: str) -> None:
    """The adapter's merge ended (run_merge enqueues this): send the exports that waited for
    it, or fail them with the merge's error."""
    waiting = Export.objects.filter(adapter_id=adapter_id, needs_merge=True,
                                    status=Export.Status.QUEUED).values_list("id", flat=True)
    for export_id in list(waiting):
        export_send(export_id)


def export_claim(*, export_id: str) -> Export | None:
    """queued → running, exactly once, and only once what it needs is there (the adapter's
    merge, for a format of the merged model): a redelivered message gets None."""
    ready = Q(needs_merge=False) | Q(adapter__merge_status=Adapter.MergeStatus.SUCCEEDED)
    claimed = Export.objects.filter(ready, id=export_id, status=Status.QUEUED).update(
        status=Status.RUNNING, started_at=Now(), progress_at=Now(), progress=0.0,
        progress_message="Starting")
    if not claimed:
        return None
    return Export.objects.select_related("adapter", "adapter__base_model").get(id=export_id)


def export_progress(*, export_id: str, fraction: float, message: str) -> bool:
    """Record how far it is; False when the export is no longer running (deleted, failed)."""
    return bool(Export.objects.filter(id=export_id, status=Status.RUNNING).update(
        progress=max(0.0, min(1.0, fraction)), progress_message=message[:300],
        progress_at=Now()))


def export_succeed(*, export_id: str, blob_name: str, filename: str, size: int, sha256: str,
                   check: dict) -> bool:
    """running → succeeded with its artifact, counted in the storage quota; False when the
    export is no longer running (the caller deletes the blob it stored). An artifact the quota
    has no room for fails the export (storage_quota_exceeded) and returns False as well."""
    with transaction.atomic(durable=True):
        organization_id = (Export.objects.filter(id=export_id, status=Status.RUNNING)
                           .values_list("organization_id", flat=True).first())
        if organization_id is None:
            return False
        # The organization's lock, as uploads take it: exports ending together cannot overshoot.
        organization = Organization.objects.select_for_update().get(pk=organization_id)
        try:
            storage_quota_check(organization, size, what=f"the export ({size} bytes)", param=None)
        except ApiError as exc:
            _fail(export_id, f"{exc.code}: {exc.message}", check, (Status.RUNNING,))
            return False
        return bool(Export.objects.filter(id=export_id, status=Status.RUNNING).update(
            status=Status.SUCCEEDED, blob_name=blob_name, filename=filename, bytes=size,
            sha256=sha256, check_result=check, progress=1.0, progress_message="Done",
            progress_at=Now(), finished_at=Now()))


def export_fail(*, export_id: str, error: str, check: dict | None = None,
                statuses: tuple[str, ...] = (Status.RUNNING,)) -> bool:
    """→ failed with ``error`` ("code: message") and the check's figures where the check is
    what failed; only from ``statuses``. False when it was in none of them."""
    return _fail(export_id, error, check, statuses)


def _fail(export_id: str, error: str, check: dict | None, statuses: tuple[str, ...]) -> bool:
    return bool(Export.objects.filter(id=export_id, status__in=statuses).update(
        status=Status.FAILED, error=error, check_result=check or None, finished_at=Now()))


# --- the sweep (Celery beat) -----------------------------------------------------------------------

# A queued export whose message no worker took within this long is sent again (a lost message;
# a second copy of one still waiting in the broker is harmless: the claim is fenced).
RESEND_AFTER = timedelta(minutes=10)


def exports_sweep() -> dict[str, list[str]]:
    """Fail exports running past TUNEPLEX_EXPORT_DEADLINE_SECONDS (their worker died: the
    worker itself stops one at the deadline); send again the queued ones that can run and whose
    message may be lost; settle the ones whose merge ended without telling them."""
    deadline = Now() - timedelta(seconds=settings.EXPORT_DEADLINE_SECONDS + 60)
    stalled = list(Export.objects.filter(status=Status.RUNNING, started_at__lt=deadline)
                   .values_list("id", flat=True))
    failed = [export_id for export_id in stalled if _fail(
        export_id, f"export_stalled: the export did not finish within "
                   f"{settings.EXPORT_DEADLINE_SECONDS} s (its worker stopped); request it again.",
        None, (Status.RUNNING,))]
    lost = Q(enqueued_at__isnull=True) | Q(enqueued_at__lt=Now() - RESEND_AFTER)
    waiting = Export.objects.filter(lost, status=Status.QUEUED).exclude(
        needs_merge=True, adapter__merge_status__in=(Adapter.MergeStatus.QUEUED,
                                                     Adapter.MergeStatus.RUNNING))
    sent = list(waiting.values_list("id", flat=True)[:1000])
    for export_id in sent:
        export_send(export_id)
    return {"exports_failed": failed, "exports_sent": sent}
