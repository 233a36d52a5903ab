"""Writes for files: upload (validate, store, record), delete, statistics bookkeeping."""

from __future__ import annotations

import hashlib
import logging
from datetime import timedelta
from typing import IO

from django.conf import settings
from django.core.files.uploadedfile import UploadedFile
from django.db import transaction
from django.db.models import Q
from django.db.models.functions import Now

from jobs.training.jsonl import (
    LineError,
    Problem,
    ValidationReport,
    iter_lines,
    parse_line,
    validate_jsonl,
)
from tuneplex.audit.services import audit_record
from tuneplex.core import queue
from tuneplex.core.actors import Principal
from tuneplex.core.errors import ApiError, Conflict
from tuneplex.core.storage import artifact_storage
from tuneplex.core.storage_layout import file_blob_name
from tuneplex.files.batch_input import validate_batch_input
from tuneplex.files.models import File
from tuneplex.files.selectors import storage_quota_check
from tuneplex.tenancy.models import Organization

log = logging.getLogger(__name__)
_HASH_CHUNK = 4 * 2**20


def blob_name_for(organization: Organization, file_id: str) -> str:
    """Organization-scoped blob path; ids are generated, so no user text reaches the path."""
    return file_blob_name(organization.id, file_id)


def _sha256(stream: IO[bytes]) -> str:
    digest = hashlib.sha256()
    stream.seek(0)
    while chunk := stream.read(_HASH_CHUNK):
        digest.update(chunk)
    return digest.hexdigest()


def _open_binary(upload: UploadedFile) -> IO[bytes]:
    upload.seek(0)
    path = getattr(upload, "temporary_file_path", None)
    if path is not None:
        return open(path(), "rb")  # a buffered reader: fast readline and peek
    import io

    return io.BufferedReader(io.BytesIO(upload.read()))


def file_create(*, organization: Organization, actor: Principal, upload: UploadedFile,
                purpose: str, filename: str) -> File:
    """Validate the upload (streaming), then store blob and row together, or neither."""
    purpose_check(purpose)
    size = upload.size
    if size > settings.FILE_UPLOAD_MAX_BYTES:
        raise ApiError(f"The file is {size} bytes; the limit is {settings.FILE_UPLOAD_MAX_BYTES} "
                       "bytes.", code="file_too_large", param="file", status=413)
    with _open_binary(upload) as stream:
        report = dataset_validate(stream, purpose=purpose)
        sha256 = _sha256(stream)
    storage_quota_check(organization, size, what=f"this file ({size} bytes)")  # fail fast
    record = file_record(organization=organization, actor=actor, filename=filename,
                         purpose=purpose, size=size, sha256=sha256, report=report)
    storage = artifact_storage()
    upload.seek(0)
    # The blob is written before the transaction, so no lock is held across storage I/O; if the
    # row is not committed the blob is deleted again: no blob without its row.
    stored_name = storage.save(record.blob_name, upload)
    try:
        if stored_name != record.blob_name:
            raise RuntimeError(f"storage renamed {record.blob_name} to {stored_name}")
        # Not durable, unlike the other services that act on commit: feedback_export stores its
        # dataset through this inside its own transaction (the rows it exports and the file
        # commit together).
        with transaction.atomic():
            file_insert(record, actor=actor)
    except BaseException:
        storage.delete(stored_name)
        raise
    return record


# What a person may upload (batch_output files are written by a batch's worker only).
UPLOAD_PURPOSES = (File.Purpose.FINE_TUNE, File.Purpose.EVALS, File.Purpose.BATCH)


def purpose_check(purpose: str) -> None:
    if purpose not in UPLOAD_PURPOSES:
        raise ApiError(f"Unsupported purpose {purpose!r}; use 'fine-tune', 'evals' or 'batch'.",
                       code="invalid_purpose", param="purpose")


def dataset_validate(stream: IO[bytes], *, purpose: str) -> ValidationReport:
    """The one validation of a file's content, whichever way it arrived (one request, or an
    upload in parts): streaming, every problem with its line number."""
    if purpose == File.Purpose.EVALS:
        return validate_eval_items(stream, max_line_bytes=settings.DATASET_MAX_LINE_BYTES)
    if purpose == File.Purpose.BATCH:
        return validate_batch_input(stream)
    return validate_jsonl(stream, max_line_bytes=settings.DATASET_MAX_LINE_BYTES,
                          min_examples=settings.DATASET_MIN_EXAMPLES)


def file_record(*, organization: Organization, actor: Principal, filename: str, purpose: str,
                size: int, sha256: str, report: ValidationReport,
                file_id: str | None = None) -> File:
    """The row of a validated file, not saved yet; its blob goes to ``record.blob_name``."""
    statistics = report.ok and purpose == File.Purpose.FINE_TUNE
    record = File(**({"id": file_id} if file_id else {}), organization=organization,
                  filename=filename, purpose=purpose, bytes=size, sha256=sha256,
                  format=report.format or "", validation=report.as_dict(),
                  status=File.Status.PROCESSED if report.ok else File.Status.ERROR,
                  statistics_status=(File.StatisticsStatus.PENDING if statistics
                                     else File.StatisticsStatus.NONE),
                  created_by=actor.user if actor.api_key is None else actor.api_key.created_by)
    record.blob_name = blob_name_for(organization, record.id)
    return record


def file_insert(record: File, *, actor: Principal, audit_metadata: dict | None = None,
                quota_param: str | None = "file") -> None:
    """Save a file's row, its blob already stored, inside the caller's transaction: the quota
    checked under the organization's lock, the audit row, statistics enqueued on commit."""
    organization = record.organization
    size = record.bytes
    # Lock the organization so concurrent uploads cannot overshoot the quota together.
    Organization.objects.select_for_update().filter(pk=organization.pk).first()
    storage_quota_check(organization, size, what=f"this file ({size} bytes)", param=quota_param)
    record.save(force_insert=True)
    audit_record(actor=actor, action="file.create", obj=record,
                 metadata={"filename": record.filename, "bytes": size, "status": record.status,
                           **(audit_metadata or {})})
    if record.statistics_status == File.StatisticsStatus.PENDING:
        transaction.on_commit(lambda: _enqueue_statistics(record.id))


def validate_eval_items(stream: IO[bytes], *, max_line_bytes: int) -> ValidationReport:
    """An evals file: each line a JSON object with an ``item`` object (and, for runs that grade
    answers made elsewhere, a ``sample``). The eval's own item schema is checked when a run uses
    the file, since one file may serve several evals."""
    report = ValidationReport(format="eval_items")
    for number, raw in iter_lines(stream, max_line_bytes=max_line_bytes):
        report.lines = number
        if raw is None:
            report.add(Problem("line_too_long", f"The line is longer than {max_line_bytes} bytes.",
                               number))
            continue
        if not raw.strip():
            continue
        try:
            record = parse_line(raw)
        except LineError as error:
            report.add(Problem(error.code, error.message, number))
            continue
        if not isinstance(record.get("item"), dict):
            report.add(Problem("missing_item", "Each line needs an 'item' object.", number, "item"))
            continue
        report.examples += 1
    if report.examples == 0 and report.ok:
        report.add(Problem("empty_file", "The file has no items.", None))
    return report


def _enqueue_statistics(file_id: str) -> None:
    queue.enqueue(queue.FILE_STATISTICS, file_id)


def file_delete(*, organization: Organization, actor: Principal, file: File) -> None:
    with transaction.atomic(durable=True):
        locked = File.objects.select_for_update().get(pk=file.pk, organization=organization)
        in_use = file_in_use_by(locked)
        if in_use:
            raise Conflict(f"The file is used by {in_use}, which has not finished (validating, "
                           "queued, running or paused); cancel it first.", code="file_in_use",
                           param="file_id")
        audit_record(actor=actor, action="file.delete", obj=locked,
                     metadata={"filename": locked.filename})
        blob_name = locked.blob_name
        locked.delete()
        transaction.on_commit(lambda: artifact_storage().delete(blob_name))


def file_in_use_by(file: File) -> str | None:
    """The id of an unfinished job (validating, queued, running or paused) that reads this
    file, if any."""
    from tuneplex.finetuning.selectors import active_job_using_file

    return active_job_using_file(file=file)


# --- statistics, written by the worker ------------------------------------------------------------


def file_statistics_claim(*, file_id: str) -> File | None:
    """Move pending → running with a conditional UPDATE; None if another delivery holds it.

    A claim older than TUNEPLEX_STATISTICS_TIMEOUT_SECONDS (its worker died) may be taken over.
    """
    stale = Now() - timedelta(seconds=settings.STATISTICS_TIMEOUT_SECONDS + 60)
    claimable = Q(statistics_status=File.StatisticsStatus.PENDING) | Q(
        statistics_status=File.StatisticsStatus.RUNNING, statistics_claimed_at__lt=stale)
    claimed = File.objects.filter(claimable, id=file_id).update(
        statistics_status=File.StatisticsStatus.RUNNING, statistics_claimed_at=Now())
    return File.objects.filter(id=file_id).first() if claimed else None


def file_statistics_finish(*, file: File, statistics: dict | None, error: str | None = None) -> None:
    if statistics is not None:
        File.objects.filter(pk=file.pk).update(statistics=statistics,
                                               statistics_status=File.StatisticsStatus.READY)
    else:
        File.objects.filter(pk=file.pk).update(statistics={"error": error},
                                               statistics_status=File.StatisticsStatus.FAILED)
