"""Writes for uploads in parts (OpenAI's Uploads API): create, add a part, complete, cancel, and
the cleanup of the parts of uploads that ended.

A part is a blob under its upload's prefix, stored as it arrives and in bounded memory
(``core.storage_stream.blob_put``). Completing reads the chosen parts once, in the client's
order, through the validation of a file sent in one request (``files.services.dataset_validate``),
two digests (the file's sha256, the client's md5) and a writer of the file's blob (a scratch file
renamed into place locally, a multipart upload completed on S3). The file's row is then inserted
by the same service as a one-request upload (``file_insert``: quota, audit, statistics) in the
transaction that completes the upload. Any failure before that commit leaves the upload pending
with its parts, and no blob, no row.

Part numbers and sizes are free, as with OpenAI (S3's own multipart upload wants parts of at
least 5 MiB in ascending order, so the parts are objects of their own and the file is written
anew from them).
"""

from __future__ import annotations

import hashlib
import io
import re
from datetime import timedelta

from django.conf import settings
from django.core.files.uploadedfile import UploadedFile
from django.db import transaction
from django.db.models import F, Q
from django.db.models.functions import Now

from tuneplex.audit.services import audit_record
from tuneplex.core.actors import Principal
from tuneplex.core.errors import ApiError, Conflict
from tuneplex.core.storage import CHUNK, artifact_storage, delete_prefix, open_stream
from tuneplex.core.storage_layout import (
    file_blob_name,
    upload_assembly_scratch,
    upload_part_blob_name,
    upload_prefix,
)
from tuneplex.core.storage_stream import BlobWriter, blob_put, blob_writer, blob_writer_abandon
from tuneplex.files.models import File, Upload, UploadPart
from tuneplex.files.selectors import (
    storage_quota_check,
    upload_get,
    upload_parts,
    upload_stored_bytes,
    uploads_to_clean,
    with_expiry,
)
from tuneplex.files.services import dataset_validate, file_insert, file_record, purpose_check
from tuneplex.tenancy.models import Organization

# What a JSONL dataset may be declared as (OpenAI asks for text/jsonl; clients send the others).
JSONL_MIME_TYPES = ("text/jsonl", "application/jsonl", "application/x-jsonlines",
                    "application/x-ndjson", "application/json", "text/plain",
                    "application/octet-stream")
# The parts of an upload may hold at most this many times its bytes: room for parts sent again
# after a dropped connection, not for storing without end.
PARTS_BYTES_FACTOR = 2
_MD5 = re.compile(r"[0-9a-fA-F]{32}")


def upload_create(*, organization: Organization, actor: Principal, filename: str, purpose: str,
                  mime_type: str, size: int, expires_after: object = None) -> Upload:
    purpose_check(purpose)
    if expires_after is not None:
        raise ApiError("Files made from uploads do not expire here (they are kept until deleted): "
                       "leave expires_after out.", code="unsupported_parameter",
                       param="expires_after")
    media_type = mime_type.split(";")[0].strip().lower()
    if media_type not in JSONL_MIME_TYPES:
        raise ApiError(f"Unsupported mime_type {mime_type!r} for purpose {purpose!r}: a JSONL "
                       f"dataset is one of {', '.join(JSONL_MIME_TYPES)}.",
                       code="unsupported_mime_type", param="mime_type")
    if size < 1:
        raise ApiError("bytes must be at least 1.", code="invalid_bytes", param="bytes")
    if size > settings.UPLOAD_MAX_BYTES:
        raise ApiError(f"The upload would be {size} bytes; the limit is "
                       f"{settings.UPLOAD_MAX_BYTES} bytes (TUNEPLEX_UPLOAD_MAX_BYTES).",
                       code="upload_too_large", param="bytes")
    storage_quota_check(organization, size, what=f"this upload ({size} bytes)", param="bytes")
    with transaction.atomic(durable=True):
        upload = Upload.objects.create(
            organization=organization, filename=filename, purpose=purpose, mime_type=media_type,
            bytes=size, expires_at=Now() + timedelta(seconds=settings.UPLOAD_EXPIRY_SECONDS),
            created_by=actor.user if actor.api_key is None else actor.api_key.created_by)
        audit_record(actor=actor, action="upload.create", obj=upload,
                     metadata={"filename": filename, "bytes": size, "purpose": purpose})
    return upload_get(organization=organization, upload_id=upload.id)


def upload_part_add(*, organization: Organization, upload: Upload,
                    data: UploadedFile) -> UploadPart:
    """Store one part (a blob of its own), then its row; the blob is deleted again if the row
    is refused (the upload ended meanwhile, the quota is used up)."""
    size = data.size
    if size == 0:
        raise ApiError("The part is empty.", code="empty_part", param="data")
    if size > settings.UPLOAD_PART_MAX_BYTES:
        raise ApiError(f"The part is {size} bytes; the limit is {settings.UPLOAD_PART_MAX_BYTES} "
                       "bytes (TUNEPLEX_UPLOAD_PART_MAX_BYTES).", code="part_too_large",
                       param="data", status=413)
    _refuse_unless_open(upload)
    _check_room(upload, size)
    storage_quota_check(organization, size, what=f"this part ({size} bytes)", param="data")
    part = UploadPart(upload=upload, bytes=size)
    part.blob_name = upload_part_blob_name(organization.id, upload.id, part.id)
    try:
        blob_put(part.blob_name, data, size)
        with transaction.atomic(durable=True):
            Organization.objects.select_for_update().filter(pk=organization.pk).first()
            locked = _locked(upload)
            _refuse_unless_open(locked)
            _check_room(locked, size)
            storage_quota_check(organization, size, what=f"this part ({size} bytes)",
                                param="data")
            part.save(force_insert=True)
    except BaseException:
        artifact_storage().delete(part.blob_name)
        raise
    return part


def upload_complete(*, organization: Organization, actor: Principal, upload: Upload,
                    part_ids: list[str], md5: str | None = None) -> Upload:
    _refuse_unless_open(upload)
    parts = _chosen_parts(upload, part_ids)
    if md5 is not None and not _MD5.fullmatch(md5):
        raise ApiError("md5 must be 32 hexadecimal digits.", code="invalid_md5", param="md5")
    attempt = _claim(upload)
    try:
        record, writer = _assemble(organization, actor, upload, parts, attempt, md5)
    except BaseException:
        _release(upload, attempt)
        raise
    try:
        writer.commit()
        with transaction.atomic(durable=True):
            _finish(upload, attempt, record, actor, len(parts))
    except BaseException:
        artifact_storage().delete(record.blob_name)
        writer.abort()
        _release(upload, attempt)
        raise
    return upload_get(organization=organization, upload_id=upload.id)


def upload_cancel(*, organization: Organization, actor: Principal, upload: Upload) -> Upload:
    """Pending → cancelled (the cleanup deletes its parts); cancelling again changes nothing."""
    with transaction.atomic(durable=True):
        locked = _locked(upload)
        if locked.status != Upload.Status.CANCELLED:
            _refuse_unless_open(locked)
            Upload.objects.filter(pk=upload.pk).update(status=Upload.Status.CANCELLED)
            audit_record(actor=actor, action="upload.cancel", obj=locked,
                         metadata={"filename": locked.filename})
    return upload_get(organization=organization, upload_id=upload.id)


# --- the beat's cleanup ---------------------------------------------------------------------------


def uploads_clean(*, batch: int = 100) -> dict:
    """Mark pending uploads past their time expired (the database's clock), then delete the
    parts of uploads that ended: their blobs (and what a completion that died left: its scratch
    file, its S3 multipart upload) and their rows. Idempotent: a second run deletes nothing."""
    stale = Now() - timedelta(seconds=settings.UPLOAD_EXPIRY_SECONDS)
    expired = Upload.objects.filter(status=Upload.Status.PENDING, expires_at__lte=Now()).filter(
        Q(completing_since__isnull=True) | Q(completing_since__lt=stale)).update(
        status=Upload.Status.EXPIRED)
    cleaned = []
    for upload in uploads_to_clean(limit=batch):
        _delete_parts(upload)
        cleaned.append(upload.id)
    return {"expired": expired, "cleaned": cleaned}


def _delete_parts(upload: Upload) -> None:
    if upload.assembly_id:
        blob_writer_abandon(upload.assembly_blob, upload.assembly_id)
    prefix = upload_prefix(upload.organization_id, upload.id)
    delete_prefix(prefix)
    try:
        artifact_storage().delete(prefix)  # the emptied folder, on local storage
    except OSError:
        pass
    with transaction.atomic():
        UploadPart.objects.filter(upload=upload).delete()
        Upload.objects.filter(pk=upload.pk).update(parts_deleted_at=Now(), assembly_blob="",
                                                   assembly_id="")


# --- steps ----------------------------------------------------------------------------------------


def _locked(upload: Upload) -> Upload:
    return with_expiry(Upload.objects.select_for_update().filter(pk=upload.pk)).get()


def _refuse_unless_open(upload: Upload) -> None:
    """409 unless parts may be added (or it may be completed or cancelled) now."""
    status = Upload.Status.EXPIRED if upload.expired_now else upload.status
    if status != Upload.Status.PENDING:
        raise Conflict(f"The upload is {status}: no parts may be added, and it cannot be "
                       "completed or cancelled.", code=f"upload_{status}", param="upload_id")
    if upload.completing_now:
        raise Conflict("The upload is being completed by another request.",
                       code="upload_completing", param="upload_id")


def _check_room(upload: Upload, size: int) -> None:
    stored = upload_stored_bytes(upload=upload)
    room = PARTS_BYTES_FACTOR * upload.bytes
    if stored + size > room:
        raise ApiError(f"The upload's parts would hold {stored + size} bytes, more than "
                       f"{PARTS_BYTES_FACTOR} times its {upload.bytes} bytes. Cancel it and "
                       "start a new one.", code="too_much_data", param="data")


def _chosen_parts(upload: Upload, part_ids: list[str]) -> list[UploadPart]:
    """The parts named, in order: each a part of this upload, none twice, ``bytes`` in all."""
    if not part_ids:
        raise ApiError("part_ids must name at least one part.", code="invalid_part_ids",
                       param="part_ids")
    found = upload_parts(upload=upload, part_ids=part_ids)
    seen: set[str] = set()
    for index, part_id in enumerate(part_ids):
        if part_id not in found:
            raise ApiError(f"No part {part_id!r} in upload {upload.id}.", code="unknown_part",
                           param=f"part_ids[{index}]")
        if part_id in seen:
            raise ApiError(f"Part {part_id} is listed twice.", code="duplicate_part",
                           param=f"part_ids[{index}]")
        seen.add(part_id)
    parts = [found[part_id] for part_id in part_ids]
    total = sum(part.bytes for part in parts)
    if total != upload.bytes:
        raise ApiError(f"The parts listed hold {total} bytes; the upload was created for "
                       f"{upload.bytes} bytes.", code="bytes_mismatch", param="part_ids")
    return parts


def _claim(upload: Upload) -> int:
    """Hold the upload for this completion (a conditional UPDATE on the database's clock);
    returns the attempt number that fences its final write. A claim an expiry period old is
    taken as abandoned (its request died)."""
    stale = Now() - timedelta(seconds=settings.UPLOAD_EXPIRY_SECONDS)
    claimable = Upload.objects.filter(pk=upload.pk, status=Upload.Status.PENDING,
                                      expires_at__gt=Now()).filter(
        Q(completing_since__isnull=True) | Q(completing_since__lt=stale))
    if not claimable.update(completion_attempt=F("completion_attempt") + 1,
                            completing_since=Now(), assembly_blob="", assembly_id=""):
        _refuse_unless_open(upload_get(organization=upload.organization, upload_id=upload.id))
        raise Conflict("The upload is being completed by another request.",
                       code="upload_completing", param="upload_id")
    return Upload.objects.values_list("completion_attempt", flat=True).get(pk=upload.pk)


def _release(upload: Upload, attempt: int) -> None:
    Upload.objects.filter(pk=upload.pk, completion_attempt=attempt,
                          status=Upload.Status.PENDING).update(
        completing_since=None, assembly_blob="", assembly_id="")


def _assemble(organization: Organization, actor: Principal, upload: Upload,
              parts: list[UploadPart], attempt: int, md5: str | None) -> tuple[File, BlobWriter]:
    """Read the parts once: validated, digested and written to the file's blob (not committed
    yet). The md5 checked; the file's row made (not saved)."""
    file_id = File().id  # a new id, as the row will have
    writer = blob_writer(file_blob_name(organization.id, file_id),
                         scratch=upload_assembly_scratch(organization.id, upload.id, attempt))
    Upload.objects.filter(pk=upload.pk, completion_attempt=attempt).update(
        assembly_blob=writer.blob, assembly_id=writer.token)
    try:
        md5_digest, sha256_digest = hashlib.md5(usedforsecurity=False), hashlib.sha256()
        raw = _PartsStream([part.blob_name for part in parts],
                           sinks=(md5_digest.update, sha256_digest.update, writer.write))
        with io.BufferedReader(raw, CHUNK) as stream:
            report = dataset_validate(stream, purpose=upload.purpose)
            while stream.read(CHUNK):  # validation may stop early (a file that is not text)
                pass
        if raw.count != upload.bytes:
            raise RuntimeError(f"upload {upload.id}: its parts read {raw.count} bytes from "
                               f"storage, not {upload.bytes}")
        if md5 is not None and md5_digest.hexdigest() != md5.lower():
            raise ApiError(f"The parts' md5 is {md5_digest.hexdigest()}, not {md5.lower()}.",
                           code="md5_mismatch", param="md5")
    except BaseException:
        writer.abort()
        raise
    record = file_record(organization=organization, actor=actor, filename=upload.filename,
                         purpose=upload.purpose, size=upload.bytes,
                         sha256=sha256_digest.hexdigest(), report=report, file_id=file_id)
    return record, writer


def _finish(upload: Upload, attempt: int, record: File, actor: Principal, part_count: int) -> None:
    """In the caller's transaction: the upload completed and its file inserted, if this
    completion still holds it. Locks in the order of the part service: organization, upload."""
    Organization.objects.select_for_update().filter(pk=upload.organization_id).first()
    held = Upload.objects.filter(
        pk=upload.pk, completion_attempt=attempt, status=Upload.Status.PENDING,
        completing_since__isnull=False).update(
        status=Upload.Status.COMPLETED, completing_since=None, assembly_blob="", assembly_id="")
    if not held:
        raise Conflict("The upload changed while it was being completed.",
                       code="upload_changed", param="upload_id")
    # Completed first, so that the quota counts the file and no longer the parts.
    file_insert(record, actor=actor, audit_metadata={"upload_id": upload.id},
                quota_param="part_ids")
    Upload.objects.filter(pk=upload.pk).update(file=record)
    audit_record(actor=actor, action="upload.complete", obj=upload,
                 metadata={"file_id": record.id, "parts": part_count, "status": record.status})


class _PartsStream(io.RawIOBase):
    """The blobs ``names`` read one after the other as one stream; each chunk read is handed to
    every sink (digests, a writer) before it is returned."""

    def __init__(self, names: list[str], *, sinks) -> None:
        super().__init__()
        self._names = iter(names)
        self._current = None
        self._sinks = sinks
        self.count = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while True:
            if self._current is None:
                name = next(self._names, None)
                if name is None:
                    return 0
                self._current = open_stream(name)
            read = self._current.readinto(buffer)
            if read:
                chunk = memoryview(buffer)[:read]
                for sink in self._sinks:
                    sink(chunk)
                self.count += read
                return read
            self._current.close()
            self._current = None

    def close(self) -> None:
        if self._current is not None:
            self._current.close()
            self._current = None
        super().close()
