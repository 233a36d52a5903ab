"""Every write a person makes to batches: create one, cancel one.

The worker's own writes (claims, lines, files, the end) are in
:mod:`tuneplex.batches.worker_writes`.
"""

from __future__ import annotations

from datetime import timedelta

from django.conf import settings
from django.db import transaction
from django.db.models.functions import Now
from django.utils import timezone

from tuneplex.audit.services import audit_record
from tuneplex.batches.models import Batch
from tuneplex.batches.selectors import active_batches
from tuneplex.core import queue
from tuneplex.core.actors import Principal
from tuneplex.core.errors import ApiError, NotFound
from tuneplex.evals.specs import metadata as checked_metadata
from tuneplex.files.models import File
from tuneplex.files.selectors import file_get, storage_quota_check
from tuneplex.tenancy.models import Organization

COMPLETION_WINDOWS = {"24h": timedelta(hours=24)}  # OpenAI's only one


def batch_create(*, organization: Organization, actor: Principal, input_file_id: str,
                 endpoint: str, completion_window: str, metadata=None) -> Batch:
    """A batch of the requests in ``input_file_id`` (a processed file of purpose batch of the
    organization), queued for a worker, which checks its lines first (status validating).
    Refused with nothing stored when a field is wrong, the file is too large or has too many
    requests, the organization has TUNEPLEX_ORG_MAX_ACTIVE_BATCHES active already, or its
    storage is full (the batch's files would not fit)."""
    if endpoint not in Batch.Endpoint.values:
        raise ApiError(f"endpoint must be one of {', '.join(Batch.Endpoint.values)}.",
                       code="invalid_value", param="endpoint")
    if completion_window not in COMPLETION_WINDOWS:
        raise ApiError("completion_window must be '24h'.", code="invalid_value",
                       param="completion_window")
    stored_metadata = checked_metadata(metadata)
    file = _input_file(organization, input_file_id)
    if active_batches(organization=organization) >= settings.ORG_MAX_ACTIVE_BATCHES:
        raise ApiError(f"The organization has {settings.ORG_MAX_ACTIVE_BATCHES} batches in "
                       "progress (TUNEPLEX_ORG_MAX_ACTIVE_BATCHES); wait for one to end or "
                       "cancel one.", code="too_many_active_batches", status=429)
    storage_quota_check(organization, 1, what="the batch's output files",
                        param="input_file_id")
    batch = Batch(organization=organization, input_file_id=file.id, endpoint=endpoint,
                  completion_window=completion_window, metadata=stored_metadata,
                  created_by=actor.user if actor.api_key is None else actor.api_key.created_by,
                  expires_at=Now() + COMPLETION_WINDOWS[completion_window])
    with transaction.atomic(durable=True):
        batch.save(force_insert=True)
        audit_record(actor=actor, action="batch.create", obj=batch,
                     metadata={"input_file_id": file.id, "endpoint": endpoint})
        transaction.on_commit(lambda: enqueue_batch(batch.id))
    batch.refresh_from_db()  # expires_at, by the database's clock
    return batch


def _input_file(organization: Organization, file_id) -> File:
    if not isinstance(file_id, str):
        raise ApiError("input_file_id must be a file's id.", code="invalid_type",
                       param="input_file_id")
    try:
        file = file_get(organization=organization, file_id=file_id)
    except NotFound:  # another organization's too
        raise NotFound(f"No such file: {file_id}.", param="input_file_id") from None
    if file.purpose != File.Purpose.BATCH:
        raise ApiError(f"File {file.id} has purpose {file.purpose!r}; a batch's input file is "
                       "uploaded with purpose 'batch'.", code="invalid_file",
                       param="input_file_id")
    if file.status != File.Status.PROCESSED:
        raise ApiError(f"File {file.id} did not pass validation; see its validation report "
                       "(GET /v1/files/{file_id}).", code="invalid_file", param="input_file_id")
    if file.bytes > settings.BATCH_MAX_INPUT_BYTES:
        raise ApiError(f"File {file.id} is {file.bytes} bytes; a batch's input is at most "
                       f"{settings.BATCH_MAX_INPUT_BYTES} (TUNEPLEX_BATCH_MAX_INPUT_BYTES).",
                       code="file_too_large", param="input_file_id")
    requests = int((file.validation or {}).get("examples") or 0)
    if requests > settings.BATCH_MAX_REQUESTS:
        raise ApiError(f"File {file.id} has {requests} requests; a batch has at most "
                       f"{settings.BATCH_MAX_REQUESTS} (TUNEPLEX_BATCH_MAX_REQUESTS).",
                       code="too_many_requests", param="input_file_id")
    return file


def enqueue_batch(batch_id: str) -> None:
    Batch.objects.filter(pk=batch_id, claimed=False).update(enqueued_at=Now())
    queue.enqueue(queue.BATCH_RUN, batch_id)


def batch_cancel(*, organization: Organization, actor: Principal, batch: Batch) -> Batch:
    """A batch no worker has taken yet is cancelled at once (nothing ran); a running one is
    ``cancelling`` until its worker stops and writes what was answered into its files. A batch
    that is finalizing or has ended is left as it is."""
    with transaction.atomic(durable=True):
        locked = Batch.objects.select_for_update().get(pk=batch.pk, organization=organization)
        now = timezone.now()
        if locked.status == Batch.Status.VALIDATING and not locked.claimed:
            locked.status, locked.cancelling_at, locked.cancelled_at = (
                Batch.Status.CANCELLED, now, now)
        elif locked.status in (Batch.Status.VALIDATING, Batch.Status.IN_PROGRESS):
            locked.status, locked.cancelling_at = Batch.Status.CANCELLING, now
        else:
            return locked
        locked.save(update_fields=["status", "cancelling_at", "cancelled_at"])
        audit_record(actor=actor, action="batch.cancel", obj=locked,
                     metadata={"status": locked.status})
    return locked
