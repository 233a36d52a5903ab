from __future__ import annotations

from django.db.models import F, QuerySet, Sum

from jobs.training.jsonl import (PREFERENCE, LineError, check_record, detect_format, iter_lines,
                                 parse_line, to_example)

from tuneplex.core.errors import ApiError, NotFound
from tuneplex.core.storage import open_stream
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
    """Bytes the organization keeps in artifact storage: datasets (feedback exports included),
    adapters, their merged exports and jobs' checkpoints."""
    from tuneplex.adapters.models import Adapter
    from tuneplex.finetuning.models import JobCheckpoint

    files = File.objects.filter(organization=organization).aggregate(t=Sum("bytes"))["t"] or 0
    adapters = Adapter.objects.filter(organization=organization).aggregate(
        t=Sum(F("bytes") + F("merged_bytes")))["t"] or 0
    checkpoints = JobCheckpoint.objects.filter(job__organization=organization).aggregate(
        t=Sum("bytes"))["t"] or 0
    return files + adapters + checkpoints


def storage_quota_check(organization: Organization, size: int, *, what: str = "this file",
                        param: str | None = "file") -> None:
    """Refuse work that would store ``size`` more bytes (or any, once the quota is used up)."""
    used = storage_used(organization=organization)
    quota = organization.storage_quota
    if used + max(size, 1) > quota:
        raise ApiError(f"Storing {what} would exceed the organization's storage quota: {used} of "
                       f"{quota} bytes are used by datasets, adapters, merged exports and "
                       "checkpoints. Delete what you no longer need.",
                       code="storage_quota_exceeded", param=param, status=403)


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
