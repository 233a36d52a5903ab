from __future__ import annotations

from datetime import timedelta

from django.conf import settings
from django.db.models import BooleanField, ExpressionWrapper, F, Q, QuerySet, Sum
from django.db.models.functions import Now

from jobs.training.jsonl import (PREFERENCE, LineError, check_record, detect_format, iter_lines,
                                 parse_line, to_example)

from tuneplex.core.errors import ApiError, NotFound
from tuneplex.core.storage import open_stream
from tuneplex.files.models import File, Upload, UploadPart
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
    """Bytes the organization keeps in artifact storage: datasets (feedback exports included),
    the parts of its pending uploads, adapters, their merged models, their exports and jobs'
    checkpoints. (The parts of an upload that ended are being deleted: its file counts instead,
    if any.)"""
    from tuneplex.adapters.models import Adapter
    from tuneplex.exports.models import Export
    from tuneplex.finetuning.models import JobCheckpoint

    files = File.objects.filter(organization=organization).aggregate(t=Sum("bytes"))["t"] or 0
    adapters = Adapter.objects.filter(organization=organization).aggregate(
        t=Sum(F("bytes") + F("merged_bytes")))["t"] or 0
    checkpoints = JobCheckpoint.objects.filter(job__organization=organization).aggregate(
        t=Sum("bytes"))["t"] or 0
    parts = UploadPart.objects.filter(upload__organization=organization,
                                      upload__status=Upload.Status.PENDING).aggregate(
        t=Sum("bytes"))["t"] or 0
    exports = Export.objects.filter(organization=organization).aggregate(
        t=Sum("bytes"))["t"] or 0
    return files + parts + adapters + checkpoints + exports


def storage_quota_check(organization: Organization, size: int, *, what: str = "this file",
                        param: str | None = "file") -> None:
    """Refuse work that would store ``size`` more bytes (or any, once the quota is used up)."""
    used = storage_used(organization=organization)
    quota = organization.storage_quota
    if used + max(size, 1) > quota:
        raise ApiError(f"Storing {what} would exceed the organization's storage quota: {used} of "
                       f"{quota} bytes are used by datasets, adapters, merged models, exports "
                       "and checkpoints. Delete what you no longer need.",
                       code="storage_quota_exceeded", param=param, status=403)


def upload_get(*, organization: Organization, upload_id: str) -> Upload:
    """An upload of the organization, ``expired_now`` set where its time is up by the
    database's clock (whether or not the cleanup has marked it yet)."""
    found = with_expiry(Upload.objects.filter(organization=organization, id=upload_id)).first()
    if found is None:
        raise NotFound(f"No such upload: {upload_id}.", param="upload_id")
    return found


def upload_parts(*, upload: Upload, part_ids: list[str]) -> dict[str, UploadPart]:
    """The parts of ``upload`` among ``part_ids``, by id (ids of other uploads are absent)."""
    return {part.id: part for part in UploadPart.objects.filter(upload=upload, id__in=part_ids)}


def upload_stored_bytes(*, upload: Upload) -> int:
    return upload.parts.aggregate(t=Sum("bytes"))["t"] or 0


def uploads_to_clean(*, limit: int) -> list[Upload]:
    """Uploads that ended (completed, cancelled, expired) whose parts are still stored."""
    return list(Upload.objects.filter(parts_deleted_at__isnull=True).exclude(
        status=Upload.Status.PENDING).order_by("created_at")[:limit])


def with_expiry(uploads: QuerySet[Upload]) -> QuerySet[Upload]:
    """Uploads with ``expired_now`` (pending past its time) and ``completing_now`` (a completion
    holds it, not yet an expiry period old), by the database's clock."""
    stale = Now() - timedelta(seconds=settings.UPLOAD_EXPIRY_SECONDS)
    return uploads.annotate(
        expired_now=ExpressionWrapper(Q(status=Upload.Status.PENDING, expires_at__lte=Now()),
                                      output_field=BooleanField()),
        completing_now=ExpressionWrapper(Q(completing_since__gt=stale),
                                         output_field=BooleanField()))


PREVIEW_LINE_BYTES = 64 * 1024
PREVIEW_TEXT_CHARS = 2000


def file_preview(*, file: File, limit: int) -> list[dict]:
    """The file's first ``limit`` non-blank lines, parsed as training sees them.

    Each item is ``{"line", "messages"}`` (chat-like formats), ``{"line", "segments"}``
    (prompt/completion and text; ``train`` marks what the loss is on) or ``{"line", "raw",
    "error"}`` for a line that does not parse. Long lines and texts are cut, so the preview stays
    small whatever the file holds.
    """
    items: list[dict] = []
    file_format = None
    with open_stream(file.blob_name) as stream:  # not the whole blob: S3 files would be read whole
        for number, raw in iter_lines(stream, max_line_bytes=PREVIEW_LINE_BYTES):
            if raw is not None and not raw.strip():
                continue
            if raw is None:
                items.append({"line": number, "raw": "", "error": "The line is too long to preview."})
            else:
                try:
                    record = parse_line(raw)
                    file_format = file_format or detect_format(record)
                    check_record(record, file_format)
                    example = to_example(record, file_format)
                except (LineError, KeyError, TypeError) as exc:
                    items.append({"line": number, "raw": raw[:PREVIEW_TEXT_CHARS].decode(
                        "utf-8", "replace"), "error": getattr(exc, "message", str(exc))})
                else:
                    items.append({"line": number, **_shown(example)})
            if len(items) >= limit:
                break
    return items


def _cut(text: str) -> str:
    return text if len(text) <= PREVIEW_TEXT_CHARS else text[:PREVIEW_TEXT_CHARS] + " …"


def _shown(example) -> dict:
    if example.kind == PREFERENCE:
        return {"messages": [{"role": m["role"], "content": _cut(m["content"]), "train": False}
                             for m in example.messages],
                "preferred": _cut(example.chosen["content"]),
                "non_preferred": _cut(example.rejected["content"])}
    if example.kind == "chat":
        return {"messages": [{"role": m["role"], "content": _cut(m["content"]),
                              "train": bool(m["weight"])} for m in example.messages]}
    return {"segments": [{"text": _cut(s.text), "train": s.train} for s in example.segments]}
