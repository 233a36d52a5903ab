"""The batch worker's writes: claim a batch, keep it alive, record its lines, end it.

Fenced like an eval run's: a claim increments ``attempts`` and every later write locks the batch
row and counts only while that attempt still holds it (claimed, and the batch still active). A
worker that was paused or replaced therefore changes nothing.

At most once: a line's row is written ``in_flight`` (and committed) before its request is sent,
and a claim turns the rows a dead attempt left in flight into ``interrupted``: such a line may
have been answered, so it is never sent again (the error file says so). A request the gateway
refused for a limit before it reached an engine has its row removed while it waits.
"""

from __future__ import annotations

from dataclasses import dataclass

from django.db import transaction
from django.db.models import BooleanField, Count, ExpressionWrapper, F, Q, Sum
from django.db.models.functions import Now
from django.utils import timezone

from tuneplex.audit.services import audit_record
from tuneplex.batches.models import Batch, BatchRequest
from tuneplex.core.actors import Principal
from tuneplex.core.storage import delete_blobs
from tuneplex.files.models import File

Status = Batch.Status
State = BatchRequest.State
# Each way a batch can end, and the timestamp that says when.
ENDED_AT = {Status.COMPLETED: "completed_at", Status.EXPIRED: "expired_at",
            Status.CANCELLED: "cancelled_at", Status.FAILED: "failed_at"}


def batch_claim(*, batch_id: str) -> Batch | None:
    """Take an active batch no worker holds (a conditional UPDATE: a message delivered twice
    claims it once); the lines a dead attempt left in flight become interrupted."""
    with transaction.atomic():
        claimed = Batch.objects.filter(pk=batch_id, status__in=Batch.ACTIVE, claimed=False).update(
            claimed=True, attempts=F("attempts") + 1, heartbeat_at=Now(), waiting_for="")
        if not claimed:
            return None
        batch = Batch.objects.select_related("organization").get(pk=batch_id)
        BatchRequest.objects.filter(batch=batch, state=State.IN_FLIGHT,
                                    attempt__lt=batch.attempts).update(state=State.INTERRUPTED)
    return batch


def _fenced(batch: Batch, attempt: int) -> Batch | None:
    """The batch's row, locked, while ``attempt`` still holds it (call inside a transaction)."""
    return (Batch.objects.select_for_update()
            .filter(pk=batch.pk, attempts=attempt, claimed=True, status__in=Batch.ACTIVE).first())


def batch_heartbeat(*, batch: Batch, attempt: int, waiting_for: str = "") -> str | None:
    """None while the batch is still this attempt's to run; else why to stop: ``lost`` (taken
    over, or ended), ``cancelled`` (asked to), ``expired`` (its window ended, by the database's
    clock)."""
    alive = Batch.objects.filter(pk=batch.pk, attempts=attempt, claimed=True,
                                 status__in=Batch.ACTIVE).update(heartbeat_at=Now(),
                                                                 waiting_for=waiting_for[:200])
    if not alive:
        return "lost"
    now = (Batch.objects.filter(pk=batch.pk)
           .annotate(past=ExpressionWrapper(Q(expires_at__lte=Now()), output_field=BooleanField()))
           .values("status", "past").first())
    if now is None:
        return "lost"
    if now["status"] == Status.CANCELLING:
        return "cancelled"
    return "expired" if now["past"] else None


def batch_validated(*, batch: Batch, attempt: int, blob: str, requests: int,
                    models: list[str]) -> bool:
    """Its lines passed and are stored in ``blob``: in progress (unless it is being cancelled)."""
    with transaction.atomic():
        locked = _fenced(batch, attempt)
        if locked is None:
            return False
        locked.requests_blob, locked.requests_total = blob, requests
        locked.models_used = sorted(models)
        locked.model = models[0] if len(models) == 1 else ""
        if locked.status == Status.VALIDATING:
            locked.status, locked.in_progress_at = Status.IN_PROGRESS, timezone.now()
        locked.save(update_fields=["requests_blob", "requests_total", "models_used", "model",
                                   "status", "in_progress_at"])
    return True


def batch_invalid(*, batch: Batch, attempt: int, errors: list[dict]) -> bool:
    """Lines that cannot be run: the batch fails with each, and nothing runs."""
    with transaction.atomic():
        locked = _fenced(batch, attempt)
        if locked is None:
            return False
        locked.status, locked.failed_at, locked.claimed = Status.FAILED, timezone.now(), False
        locked.errors = errors
        locked.save(update_fields=["status", "failed_at", "claimed", "errors"])
    return True


@dataclass(frozen=True)
class Answer:
    line: int
    status_code: int
    body: dict
    prompt_tokens: int
    completion_tokens: int


def batch_journal(*, batch: Batch, attempt: int, sent: list[tuple[int, str]],
                  held_back: list[int], answers: list[Answer]) -> bool:
    """One group of the attempt's line writes, in one transaction: answers recorded (and counted
    into the batch's request_counts and usage), lines held back by a limit no longer in flight,
    lines about to be sent (line, request id) written in flight. False when the attempt no
    longer holds the batch (nothing written) or the batch no longer runs (it is cancelling):
    then the lines in ``sent`` must not be sent."""
    with transaction.atomic():
        locked = _fenced(batch, attempt)
        if locked is None:
            return False
        if answers:
            _record(locked, attempt, answers)
        if held_back:
            BatchRequest.objects.filter(batch=locked, line__in=held_back, attempt=attempt,
                                        state=State.IN_FLIGHT).delete()
        going_on = locked.status == Status.IN_PROGRESS
        if sent and going_on:
            BatchRequest.objects.bulk_create([
                BatchRequest(batch=locked, line=line, attempt=attempt, request_id=request_id)
                for line, request_id in sent])
        locked.heartbeat_at = timezone.now()
        locked.save(update_fields=["heartbeat_at", "requests_completed", "requests_failed",
                                   "input_tokens", "output_tokens"])
    return going_on


def _record(batch: Batch, attempt: int, answers: list[Answer]) -> None:
    rows = {row.line: row for row in BatchRequest.objects.filter(
        batch=batch, line__in=[a.line for a in answers], attempt=attempt, state=State.IN_FLIGHT)}
    answered = []
    for answer in answers:
        row = rows.get(answer.line)
        if row is None:
            continue
        row.state = State.SUCCEEDED if answer.status_code == 200 else State.FAILED
        row.status_code, row.response = answer.status_code, answer.body
        row.prompt_tokens, row.completion_tokens = answer.prompt_tokens, answer.completion_tokens
        answered.append(row)
        if row.state == State.SUCCEEDED:
            batch.requests_completed += 1
        else:
            batch.requests_failed += 1
        batch.input_tokens += answer.prompt_tokens
        batch.output_tokens += answer.completion_tokens
    BatchRequest.objects.bulk_update(answered, ["state", "status_code", "response",
                                                "prompt_tokens", "completion_tokens"])


def batch_finalizing(*, batch: Batch, attempt: int, outcome: str,
                     error: dict | None = None) -> Batch | None:
    """Its files are about to be written: the status it will end in is set (kept, when an
    earlier attempt set it), the lines this attempt broke off are stopped. None when the
    attempt no longer holds the batch."""
    with transaction.atomic():
        locked = _fenced(batch, attempt)
        if locked is None:
            return None
        if not locked.outcome:
            locked.outcome = outcome
            if error is not None:
                locked.errors = [{"param": None, "line": None, **error}]
        if locked.status != Status.CANCELLING:
            locked.status = Status.FINALIZING
        locked.finalizing_at = locked.finalizing_at or timezone.now()
        locked.save(update_fields=["outcome", "errors", "status", "finalizing_at"])
        BatchRequest.objects.filter(batch=locked, state=State.IN_FLIGHT).update(
            state=State.STOPPED)
    return locked


def batch_finish(*, batch: Batch, attempt: int, files: list[File]) -> bool:
    """End the batch as its outcome says, with its output and error files (stored already; their
    rows are written here and count against the organization's storage, never refused: the
    work is done). Its lines' rows and its requests blob go: the files hold the results now."""
    with transaction.atomic():
        locked = _fenced(batch, attempt)
        if locked is None:
            return False
        actor = Principal(organization=locked.organization, scopes=frozenset())
        for file in files:
            file.save(force_insert=True)
            audit_record(actor=actor, action="file.create", obj=file,
                         metadata={"filename": file.filename, "bytes": file.bytes,
                                   "batch": locked.id})
        by_name = {file.filename: file for file in files}
        locked.output_file = by_name.get(output_filename(locked))
        locked.error_file = by_name.get(error_filename(locked))
        counts = _final_counts(locked)
        locked.requests_completed = counts["completed"]
        locked.requests_failed = locked.requests_total - counts["completed"]
        locked.input_tokens, locked.output_tokens = counts["input"], counts["output"]
        locked.status, locked.claimed, locked.waiting_for = locked.outcome, False, ""
        setattr(locked, ENDED_AT[locked.outcome], timezone.now())
        blob = locked.requests_blob
        locked.requests_blob = ""
        locked.save()
        BatchRequest.objects.filter(batch=locked).delete()
        if blob:
            transaction.on_commit(lambda: delete_blobs([blob]))
    return True


def _final_counts(batch: Batch) -> dict[str, int]:
    totals = BatchRequest.objects.filter(batch=batch).aggregate(
        completed=Count("pk", filter=Q(state=State.SUCCEEDED)),
        input=Sum("prompt_tokens"), output=Sum("completion_tokens"))
    return {name: value or 0 for name, value in totals.items()}


def output_filename(batch: Batch) -> str:
    return f"{batch.id}_output.jsonl"


def error_filename(batch: Batch) -> str:
    return f"{batch.id}_error.jsonl"


def batch_requeue_stale(*, batch: Batch, attempt: int, max_attempts: int) -> str:
    """A batch whose worker stopped heartbeating: released for another worker (which goes on
    after the lines recorded, never sending again those left in flight). After
    ``max_attempts`` attempts the next one only writes its files and ends it failed
    (``worker_lost``); when that one dies too, the batch fails without them. Returns what it
    did."""
    with transaction.atomic():
        locked = _fenced(batch, attempt)
        if locked is None:
            return "skipped"
        if locked.attempts > max_attempts and locked.outcome == Status.FAILED:
            locked.status, locked.failed_at, locked.claimed = Status.FAILED, timezone.now(), False
            locked.save(update_fields=["status", "failed_at", "claimed"])
            BatchRequest.objects.filter(batch=locked).delete()
            if locked.requests_blob:
                blob = locked.requests_blob
                transaction.on_commit(lambda: delete_blobs([blob]))
            return "failed"
        locked.claimed, locked.enqueued_at = False, None
        fields = ["claimed", "enqueued_at"]
        if locked.attempts >= max_attempts and not locked.outcome:
            locked.outcome = Status.FAILED
            locked.errors = [{"code": "worker_lost", "param": None, "line": None, "message": (
                f"The workers running this batch stopped responding {locked.attempts} times; "
                "the requests answered until then are in its output and error files.")}]
            fields += ["outcome", "errors"]
        locked.save(update_fields=fields)
    return "requeued"

