"""A batch on a worker of the ``evals`` queue (the queue of background inference):

    claim → validating: check every line, copy them into the batch's requests blob
          → in_progress: send the lines not sent yet (background inference, making room for
            interactive traffic), each written in flight before it goes and answered when it
            comes back, request_counts and usage counted as answers land
          → finalizing: the output file and the error file written (tuneplex.batches.results)
          → completed, or expired / cancelled / failed where it stopped for that

Its requests are background inference (:mod:`tuneplex.inference.background`): through the
gateway's own admission, routing, limits and settlement, as the organization, at engine
priority TUNEPLEX_BATCH_PRIORITY, at most TUNEPLEX_BATCH_CONCURRENCY in flight and
TUNEPLEX_BATCH_CONCURRENCY_BESIDE_INTERACTIVE while tenants' own requests are being answered
on the same engines. The heartbeat tells it to stop when the batch is cancelled, its window
ends (the database's clock) or another attempt took it over. A batch whose worker dies is
released by the sweep and resumed by another worker after the lines already sent; a line left in
flight is never sent again (see tuneplex.batches.worker_writes).
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from datetime import timedelta

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db.models import Q
from django.db.models.functions import Now

from tuneplex.batches import results
from tuneplex.batches.models import Batch
from tuneplex.batches.selectors import sent_requests
from tuneplex.batches.validation import ENGINE_ENDPOINT, ValidationStopped, check_batch
from tuneplex.batches.worker_writes import (
    Answer,
    batch_claim,
    batch_heartbeat,
    batch_invalid,
    batch_journal,
    batch_requeue_stale,
    batch_validated,
)
from tuneplex.core.actors import Principal
from tuneplex.core.errors import ApiError
from tuneplex.core.queue import BATCH_RUN, enqueue
from tuneplex.core.scopes import INFER
from tuneplex.core.storage import delete_blobs, open_stream
from tuneplex.core.storage_layout import batch_requests_blob
from tuneplex.inference.background import BackgroundRequests, EngineGone, Pace, keep_alive
from tuneplex.inference.gateway import Inside, finish_inside
from tuneplex.inference.selectors import servable_model

log = logging.getLogger(__name__)

Status = Batch.Status
# Why an attempt stopped running lines -> the status the batch ends in.
OUTCOME = {"done": Status.COMPLETED, "cancelled": Status.CANCELLED, "expired": Status.EXPIRED}


class Refused(Exception):
    """The batch's row refused to put a line in flight: cancelled, or no longer this attempt's."""


def run_batch(batch_id: str) -> str:
    """The Celery task's body: claim the batch and carry it to its end (or to where it stops)."""
    batch = batch_claim(batch_id=batch_id)
    if batch is None:
        return "not claimed"
    attempt = batch.attempts
    reason = batch_heartbeat(batch=batch, attempt=attempt)  # cancelled or expired while queued?
    if batch.outcome or reason == "lost":
        return results.write(batch, attempt) if batch.outcome else "stopped"
    if reason is None and batch.status == Status.VALIDATING:
        reason = _validate(batch, attempt)
        if reason in ("invalid", "lost"):
            return "failed" if reason == "invalid" else "stopped"
    error = None
    if reason is None:
        try:
            reason = asyncio.run(Execution(batch, attempt).execute())
        except EngineGone as exc:
            reason, error = "failed", {"code": "engine_unavailable", "message": str(exc)}
        except Exception:
            log.exception("batch %s failed", batch_id)
            reason, error = "failed", {"code": "internal_error", "message": (
                "The batch failed on the platform's side; the requests answered until then are "
                "in its output and error files. Tell the operator if it happens again.")}
    if reason == "lost":
        return "stopped"
    return results.write(batch, attempt, outcome=OUTCOME.get(reason, Status.FAILED), error=error)


def _validate(batch: Batch, attempt: int) -> str | None:
    """Check its lines: None when they passed (the batch is in progress), else what happened
    (``invalid``: failed with the lines' problems; ``lost``; ``cancelled``; ``expired``)."""
    blob = batch_requests_blob(batch.organization_id, batch.id, attempt)
    stopped: list[str] = []

    def alive() -> bool:
        reason = batch_heartbeat(batch=batch, attempt=attempt)
        stopped.extend([reason] if reason else [])
        return reason is None

    try:
        checked = check_batch(batch, blob, alive=alive)
    except ValidationStopped:
        return stopped[-1]
    if checked.errors:
        return "invalid" if batch_invalid(batch=batch, attempt=attempt, errors=checked.errors) \
            else "lost"
    if not batch_validated(batch=batch, attempt=attempt, blob=blob, requests=checked.requests,
                           models=list(checked.models)):
        delete_blobs([blob])
        return "lost"
    batch.refresh_from_db()
    return None


def sweep() -> dict[str, list[str]]:
    """Beat, every 10 s: batches whose worker stopped heartbeating are released (or, after
    TUNEPLEX_BATCH_MAX_ATTEMPTS, only their files written), and batches no worker holds whose
    message was lost are sent again."""
    done: dict[str, list[str]] = {"requeued": [], "failed": [], "resent": []}
    silent = Now() - timedelta(seconds=settings.BATCH_HEARTBEAT_TIMEOUT)
    for batch in Batch.objects.filter(status__in=Batch.ACTIVE, claimed=True, heartbeat_at__lt=silent):
        log.warning("batch %s: its worker stopped heartbeating", batch.id)
        outcome = batch_requeue_stale(batch=batch, attempt=batch.attempts,
                                      max_attempts=settings.BATCH_MAX_ATTEMPTS)
        done.get(outcome, []).append(batch.id)
    for batch_id in Batch.objects.filter(
            Q(enqueued_at__isnull=True) | Q(enqueued_at__lt=silent),
            status__in=Batch.ACTIVE, claimed=False).values_list("id", flat=True):
        Batch.objects.filter(pk=batch_id, claimed=False).update(enqueued_at=Now())
        enqueue(BATCH_RUN, batch_id)
        done["resent"].append(batch_id)
    return done


async def _cancel(tasks: set[asyncio.Task]) -> None:
    """Cancel the lines still running: their engine connections close, and the engine aborts
    them (their rows stay in flight: the error file tells they were broken off)."""
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


class PendingLines:
    """The batch's requests not sent yet, in the file's order: its requests blob read as a
    stream, merged with the lines recorded (read a page at a time): bounded memory."""

    def __init__(self, batch: Batch) -> None:
        self.stream = open_stream(batch.requests_blob)
        self.sent = (row.line for row in sent_requests(batch=batch, only=("line",)))
        self.next_sent = next(self.sent, None)

    def take(self, count: int) -> list[dict]:
        taken: list[dict] = []
        while len(taken) < count and (raw := self.stream.readline()):
            entry = json.loads(raw)
            while self.next_sent is not None and self.next_sent < entry["line"]:
                self.next_sent = next(self.sent, None)
            if self.next_sent == entry["line"]:  # sent by an earlier attempt
                continue
            taken.append(entry)
        return taken

    def close(self) -> None:
        self.stream.close()


class Journal:
    """The attempt's line writes, group-committed: what is pending when one transaction ends
    goes into the next, so a line waits for at most one transaction before it is sent, and
    under load many lines share one."""

    def __init__(self, batch: Batch, attempt: int) -> None:
        self.batch, self.attempt = batch, attempt
        self.sent: list[tuple[int, str]] = []
        self.held: list[int] = []
        self.answers: list[Answer] = []
        self.waiters: list[asyncio.Future] = []
        self.writer: asyncio.Task | None = None

    async def sending(self, line: int, request_id: str) -> bool:
        """Put the line in flight (committed); False: it must not be sent."""
        self.sent.append((line, request_id))
        return await self._committed()

    async def held_back(self, line: int) -> None:
        self.held.append(line)
        await self._committed()

    def answered(self, answer: Answer) -> None:
        self.answers.append(answer)
        self._write_soon()

    async def flush(self) -> None:
        while self.writer is not None and not self.writer.done():
            await asyncio.shield(self.writer)
        if self.writer is not None and self.writer.exception() is not None:
            raise self.writer.exception()

    def _committed(self) -> asyncio.Future:
        waiter = asyncio.get_running_loop().create_future()
        self.waiters.append(waiter)
        self._write_soon()
        return waiter

    def _write_soon(self) -> None:
        if self.writer is None or self.writer.done():
            self.writer = asyncio.create_task(self._write())

    async def _write(self) -> None:
        while self.sent or self.held or self.answers or self.waiters:
            sent, held, answers, waiters = self.sent, self.held, self.answers, self.waiters
            self.sent, self.held, self.answers, self.waiters = [], [], [], []
            try:
                going_on = await sync_to_async(batch_journal)(
                    batch=self.batch, attempt=self.attempt, sent=sent, held_back=held,
                    answers=answers)
            except BaseException as exc:
                for waiter in waiters:
                    if not waiter.done():
                        waiter.set_exception(exc)
                raise
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(going_on)


class Execution:
    """One attempt at running a batch's lines."""

    def __init__(self, batch: Batch, attempt: int) -> None:
        self.batch, self.attempt = batch, attempt
        self.endpoint = ENGINE_ENDPOINT[batch.endpoint]
        inside = Inside(Principal(organization=batch.organization, scopes=frozenset({INFER})),
                        requester=f"batch:{batch.id}", priority=settings.BATCH_PRIORITY)
        self.requests = BackgroundRequests(inside, Pace(
            concurrency=settings.BATCH_CONCURRENCY,
            beside_interactive=settings.BATCH_CONCURRENCY_BESIDE_INTERACTIVE,
            engine_wait=settings.BATCH_ENGINE_WAIT_SECONDS,
            engine_wait_setting="TUNEPLEX_BATCH_ENGINE_WAIT_SECONDS",
            quiet=settings.BATCH_INTERACTIVE_QUIET_SECONDS))
        self.journal = Journal(batch, attempt)
        self.stopped = asyncio.Event()
        self.reason = ""

    async def execute(self) -> str:
        """Run the lines not sent yet; why it stopped: ``done`` (every line answered),
        ``cancelled``, ``expired`` or ``lost``."""
        heartbeat = asyncio.create_task(self._heartbeats())
        lines = None
        try:
            self.requests.bases = await sync_to_async(self._base_models)()
            lines = await sync_to_async(PendingLines)(self.batch)
            await self._run(lines)
        finally:
            heartbeat.cancel()
            try:
                await self.journal.flush()  # the answers that came back are kept, however it ends
            finally:
                if lines is not None:
                    await sync_to_async(lines.close)()
                await finish_inside()
        return self.reason or "done"

    async def _run(self, lines: PendingLines) -> None:
        window = max(2 * self.requests.pace.concurrency, 2)  # lines taken ahead of their slots
        running: set[asyncio.Task] = set()
        exhausted = False
        while not self.stopped.is_set():
            if not exhausted and len(running) < window:
                taken = await sync_to_async(lines.take)(window - len(running))
                exhausted = len(taken) < window - len(running)
                running |= {asyncio.create_task(self._line(entry)) for entry in taken}
            if not running:
                break
            stop = asyncio.create_task(self.stopped.wait())
            done, _ = await asyncio.wait(running | {stop}, return_when=asyncio.FIRST_COMPLETED)
            stop.cancel()
            running -= done
            for task in done - {stop}:
                failure = task.exception()
                if isinstance(failure, Refused):
                    await self._stop(await sync_to_async(batch_heartbeat)(
                        batch=self.batch, attempt=self.attempt) or "lost")
                elif failure is not None:  # no engine for too long, or a fault of ours
                    await _cancel(running)
                    raise failure
        await _cancel(running)

    async def _line(self, entry: dict) -> None:
        number, request_id = entry["line"], f"req_{uuid.uuid4().hex}"
        in_flight = False

        async def sending() -> None:
            nonlocal in_flight
            if not in_flight:  # sent again after an engine that did not answer: still in flight
                if not await self.journal.sending(number, request_id):
                    raise Refused
                in_flight = True

        async def held_back() -> None:  # refused for a limit before any engine saw it
            nonlocal in_flight
            await self.journal.held_back(number)
            in_flight = False

        status, payload = await self.requests.call(self.endpoint, entry["body"], sending=sending,
                                                   held_back=held_back)
        usage = (payload.get("usage") or {}) if status == 200 else {}
        self.journal.answered(Answer(line=number, status_code=status, body=payload,
                                     prompt_tokens=int(usage.get("prompt_tokens") or 0),
                                     completion_tokens=int(usage.get("completion_tokens") or 0)))

    async def _stop(self, reason: str) -> None:
        if not self.stopped.is_set():
            self.reason = reason
            self.stopped.set()

    async def _heartbeats(self) -> None:
        await self._stop(await keep_alive(settings.BATCH_HEARTBEAT_SECONDS, self._beat))

    async def _beat(self) -> str | None:
        return await sync_to_async(batch_heartbeat)(batch=self.batch, attempt=self.attempt,
                                                    waiting_for=self.requests.waiting_for)

    def _base_models(self) -> set[str]:
        bases = set()
        for model in self.batch.models_used:
            try:
                bases.add(servable_model(organization=self.batch.organization, model=model).base_model)
            except ApiError:
                pass  # its requests will say so, line by line
        return bases
