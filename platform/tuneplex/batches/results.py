"""A batch's ``finalizing`` step: its output file and its error file, in OpenAI's line format.

Output file (``<batch>_output.jsonl``): one line per request answered 200, in the input's order:

    {"id": "batch_req_…", "custom_id": "…", "response": {"status_code": 200,
     "request_id": "req_…", "body": {…the completion…}}, "error": null}

Error file (``<batch>_error.jsonl``): one line per request that failed: answered with an error
status (``response`` as above, with the error's body), or not answered at all (``response``
null, ``error`` {code, message}): ``batch_expired`` (its window ended first),
``batch_cancelled``, ``batch_request_interrupted`` (its worker died while it was in flight: it
may have been answered, so it was not sent again), or why the batch failed.

Both are written by walking the batch's requests blob and its recorded lines together, in line
order, into temporary files on the worker's disk (bounded memory, whatever the batch's size),
then stored as files of purpose ``batch_output`` of the organization (counted against its
storage quota).
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path

from django.conf import settings

from tuneplex.batches.models import Batch, BatchRequest
from tuneplex.batches.selectors import sent_requests
from tuneplex.batches.worker_writes import (
    batch_finalizing,
    batch_finish,
    error_filename,
    output_filename,
)
from tuneplex.core.ids import new_id
from tuneplex.core.storage import delete_blobs, open_stream, upload_file
from tuneplex.core.storage_layout import file_blob_name
from tuneplex.files.models import File

Status = Batch.Status
State = BatchRequest.State
INTERRUPTED = {"code": "batch_request_interrupted", "message": (
    "The worker running this request stopped while it was in flight. It may have been answered "
    "(and counted), so it was not sent again: send it again in a new batch if you need its "
    "answer.")}
NOT_RUN = {
    Status.EXPIRED: {"code": "batch_expired", "message": (
        "This request could not be executed before the completion window expired.")},
    Status.CANCELLED: {"code": "batch_cancelled", "message": (
        "The batch was cancelled before this request was answered.")},
}


def write(batch: Batch, attempt: int, *, outcome: str = Status.COMPLETED,
          error: dict | None = None) -> str:
    """Write the batch's files and end it in ``outcome`` (the one an earlier attempt chose, if
    any); the status it ended in, or ``stopped`` when the attempt no longer holds it."""
    locked = batch_finalizing(batch=batch, attempt=attempt, outcome=outcome, error=error)
    if locked is None:
        return "stopped"
    output = ResultFile(locked, output_filename(locked))
    errors = ResultFile(locked, error_filename(locked))
    stored: list[File] = []
    try:
        for line in result_lines(locked):
            (output if line["error"] is None and line["response"]["status_code"] == 200
             else errors).write(line)
        for result in (output, errors):
            file = result.store()
            stored.extend([file] if file is not None else [])
        if not batch_finish(batch=locked, attempt=attempt, files=stored):
            delete_blobs([file.blob_name for file in stored])
            return "stopped"
    except BaseException:
        delete_blobs([file.blob_name for file in stored])
        raise
    finally:
        output.close()
        errors.close()
    return locked.outcome


def result_lines(batch: Batch) -> Iterator[dict]:
    """Each request's line of the output or error file, in the input's order."""
    if not batch.requests_blob:  # it ended before its lines were checked: nothing to tell
        return
    rows = sent_requests(batch=batch)
    row = next(rows, None)
    not_run = NOT_RUN.get(batch.outcome) or _failure(batch)
    with open_stream(batch.requests_blob) as stream:
        for raw in stream:
            entry = json.loads(raw)
            while row is not None and row.line < entry["line"]:
                row = next(rows, None)
            sent = row if row is not None and row.line == entry["line"] else None
            yield _line(entry["custom_id"], sent, not_run)


def _line(custom_id: str, row: BatchRequest | None, not_run: dict) -> dict:
    if row is None or row.state == State.STOPPED:
        return {"id": row.id if row else new_id("batch_req_"), "custom_id": custom_id,
                "response": None, "error": not_run}
    if row.state == State.INTERRUPTED or row.state == State.IN_FLIGHT:
        return {"id": row.id, "custom_id": custom_id, "response": None, "error": INTERRUPTED}
    return {"id": row.id, "custom_id": custom_id, "error": None, "response": {
        "status_code": row.status_code, "request_id": row.request_id, "body": row.response}}


def _failure(batch: Batch) -> dict:
    """What the requests not answered of a batch that failed (or, never, completed) say."""
    reason = (batch.errors or [{}])[0]
    return {"code": reason.get("code") or "batch_failed", "message": (
        f"The batch failed before this request was answered: {reason.get('message', '')}"
        .strip())}


class ResultFile:
    """One of the batch's files being written: a temporary file, hashed as it grows, stored as
    a file of purpose batch_output (unsaved row) by :meth:`store` if it has any line."""

    def __init__(self, batch: Batch, filename: str) -> None:
        settings.DATA_DIR.mkdir(parents=True, exist_ok=True)
        self.batch, self.filename = batch, filename
        self.local = tempfile.NamedTemporaryFile("wb", suffix=".jsonl", dir=settings.DATA_DIR)
        self.digest = hashlib.sha256()
        self.lines = 0

    def write(self, line: dict) -> None:
        data = (json.dumps(line, ensure_ascii=False) + "\n").encode()
        self.local.write(data)
        self.digest.update(data)
        self.lines += 1

    def store(self) -> File | None:
        if not self.lines:
            return None
        self.local.flush()
        file = File(organization=self.batch.organization, filename=self.filename,
                    purpose=File.Purpose.BATCH_OUTPUT, status=File.Status.PROCESSED,
                    format="batch_output", sha256=self.digest.hexdigest(),
                    validation={"valid": True, "lines": self.lines})
        file.blob_name = file_blob_name(self.batch.organization_id, file.id)
        file.bytes = upload_file(Path(self.local.name), file.blob_name)
        return file

    def close(self) -> None:
        self.local.close()
