"""An eval run on a worker: answer each item through the serving pool, grade it, store it.

    claim → read the items not yet stored → in batches: sample and grade (concurrently, at most
    TUNEPLEX_EVAL_CONCURRENCY requests in flight) → store the batch (fenced) → … → summarize

Its requests are background inference (:mod:`tuneplex.inference.background`): through the
gateway's own admission, routing and settlement, as the organization, under its token budget
and concurrency cap, with a lower engine priority than interactive requests, making room for
them (TUNEPLEX_EVAL_CONCURRENCY, TUNEPLEX_EVAL_CONCURRENCY_BESIDE_INTERACTIVE). A refusal for a
limit waits as long as the gateway says and tries again; an engine that does not answer is
waited for up to TUNEPLEX_EVAL_ENGINE_WAIT_SECONDS, then the run fails with what it has. A run
whose worker dies is queued again by the sweep and resumes after the items already stored.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator
from datetime import timedelta
from itertools import islice

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db.models import Q
from django.db.models.functions import Now

import jobs.grading as grading
from jobs.grading.judges import JudgeUnreadable, read_label
from tuneplex.core.actors import Principal
from tuneplex.core.errors import ApiError
from tuneplex.core.queue import EVAL_RUN, enqueue
from tuneplex.core.scopes import INFER
from tuneplex.core.storage import open_stream
from tuneplex.evals import gates
from tuneplex.evals.models import EvalRun
from tuneplex.evals.selectors import graded_item_ids
from tuneplex.evals.worker_writes import (
    eval_run_claim,
    eval_run_complete,
    eval_run_fail,
    eval_run_heartbeat,
    eval_run_note,
    eval_run_record_items,
    eval_run_requeue_stale,
)
from tuneplex.inference.background import BackgroundRequests, EngineGone, Pace, keep_alive
from tuneplex.inference.gateway import Inside, finish_inside
from tuneplex.inference.selectors import servable_model
from tuneplex.inference.streams import CHAT

log = logging.getLogger(__name__)

# What a judge's sampling_params become in its request (reasoning_effort means nothing to these
# models and the gateway would refuse it).
JUDGE_SAMPLING = {"temperature", "top_p", "seed", "max_completion_tokens"}


class RunStopped(Exception):
    """Canceled, deleted or taken over by another attempt: stop without writing."""


def run_eval(run_id: str) -> str:
    """The Celery task's body: claim the run and carry it to its end (or to where it stops)."""
    run = eval_run_claim(run_id=run_id)
    if run is None:
        return "not claimed"
    attempt = run.attempts
    execution = Execution(run, attempt)
    try:
        asyncio.run(execution.execute())
    except RunStopped:
        return "stopped"
    except EngineGone as exc:
        eval_run_fail(run=run, attempt=attempt, code="engine_unavailable", message=str(exc),
                      note=execution.summary())
        gates.run_ended(run.id)
        return "failed"
    except Exception:
        log.exception("eval run %s failed", run_id)
        eval_run_fail(run=run, attempt=attempt, code="internal_error", message=(
            "The run failed on the platform's side; the items graded until then are kept. "
            "Start a new run, and tell the operator if it happens again."),
            note=execution.summary())
        gates.run_ended(run.id)
        return "failed"
    done = eval_run_complete(run=run, attempt=attempt, note=execution.summary())
    gates.run_ended(run.id)
    return "completed" if done else "stopped"


def sweep() -> dict[str, list[str]]:
    """Beat, every 10 s: runs whose worker stopped heartbeating go back to the queue (or fail
    after TUNEPLEX_EVAL_MAX_ATTEMPTS), and queued runs whose message was lost are sent again."""
    done: dict[str, list[str]] = {"requeued": [], "failed": [], "resent": []}
    silent = Now() - timedelta(seconds=settings.EVAL_HEARTBEAT_TIMEOUT)
    for run in EvalRun.objects.filter(status=EvalRun.Status.IN_PROGRESS, heartbeat_at__lt=silent):
        log.warning("eval run %s: its worker stopped heartbeating", run.id)
        outcome = eval_run_requeue_stale(run=run, attempt=run.attempts,
                                         max_attempts=settings.EVAL_MAX_ATTEMPTS)
        done.get(outcome, []).append(run.id)
        if outcome == "failed":
            gates.run_ended(run.id)
    for run_id in EvalRun.objects.filter(
            Q(enqueued_at__isnull=True) | Q(enqueued_at__lt=silent),
            status=EvalRun.Status.QUEUED, cancel_requested=False).values_list("id", flat=True):
        EvalRun.objects.filter(pk=run_id, status=EvalRun.Status.QUEUED).update(enqueued_at=Now())
        enqueue(EVAL_RUN, run_id)
        done["resent"].append(run_id)
    return done


def _items(run: EvalRun, skip: set[int]) -> Iterator[tuple[int, dict]]:
    with open_stream(run.items_blob) as stream:
        for index, raw in enumerate(stream):
            if index not in skip:
                yield index, json.loads(raw)


class Execution:
    """One attempt at one run: its state, its requests and its batches."""

    def __init__(self, run: EvalRun, attempt: int) -> None:
        self.run, self.attempt = run, attempt
        self.criteria = run.eval.testing_criteria
        self.source = run.data_source
        self.inside = Inside(Principal(organization=run.organization, scopes=frozenset({INFER})),
                             requester=f"evalrun:{run.id}", priority=settings.EVAL_PRIORITY,
                             undeployed=frozenset({run.model}) if run.undeployed_ok else frozenset())
        # Its requests make room for interactive traffic (tuneplex.inference.background).
        self.requests = BackgroundRequests(self.inside, Pace(
            concurrency=settings.EVAL_CONCURRENCY,
            beside_interactive=settings.EVAL_CONCURRENCY_BESIDE_INTERACTIVE,
            engine_wait=settings.EVAL_ENGINE_WAIT_SECONDS,
            engine_wait_setting="TUNEPLEX_EVAL_ENGINE_WAIT_SECONDS",
            preempt=settings.EVAL_PREEMPT))
        self.stopped = asyncio.Event()
        self.graded = 0  # items this attempt answered and graded

    def summary(self) -> str:
        return f"Attempt {self.attempt} graded {self.graded} items."

    # --- setup and loop -------------------------------------------------------------------------

    async def execute(self) -> None:
        heartbeat = asyncio.create_task(self._heartbeats())
        try:
            self.requests.bases = await sync_to_async(self._base_models)()
            skip = await sync_to_async(graded_item_ids)(run=self.run)
            await sync_to_async(eval_run_note)(
                run=self.run, attempt=self.attempt, message=(
                    f"Attempt {self.attempt} resumes: {len(skip)} of {self.run.items_total} items "
                    "were graded before." if skip else f"Attempt {self.attempt} started."))
            await self._answer(_items(self.run, skip))
        finally:
            heartbeat.cancel()
            await finish_inside()

    async def _answer(self, items: Iterator[tuple[int, dict]]) -> None:
        """Answer and grade every item, ``TUNEPLEX_EVAL_CONCURRENCY`` at a time with as many
        more waiting for a slot, and store them as they are done, in batches of about that many:
        the engines keep their batch full while answers are stored and while the slowest item of
        a batch ends."""
        window = settings.EVAL_CONCURRENCY * 2
        pending: set[asyncio.Task] = set()
        done: list[dict] = []
        stop = asyncio.create_task(self.stopped.wait())
        more = True
        try:
            while True:
                if more and len(pending) < window:
                    lines = await asyncio.to_thread(lambda: list(islice(items, window - len(pending))))
                    more = bool(lines)
                    pending |= {asyncio.create_task(self._item(index, line)) for index, line in lines}
                if not pending:
                    break
                finished, pending = await asyncio.wait(pending | {stop},
                                                       return_when=asyncio.FIRST_COMPLETED)
                if self.stopped.is_set():
                    raise RunStopped
                pending.discard(stop)
                done.extend(task.result() for task in finished)  # an item's crash ends the attempt
                if len(done) >= settings.EVAL_CONCURRENCY or (not pending and not more):
                    await self._store(done)
                    done = []
            if done:
                await self._store(done)
        finally:
            stop.cancel()
            for task in pending:
                task.cancel()  # closes the engine connections: the engine aborts those requests

    async def _store(self, outputs: list[dict]) -> None:
        # Items finish in any order; each batch is stored in the data source's order, so a run
        # whose items fit one batch lists them as its file has them.
        outputs = sorted(outputs, key=lambda output: output["datasource_item_id"])
        stored = await sync_to_async(eval_run_record_items)(run=self.run, attempt=self.attempt,
                                                           outputs=outputs)
        if not stored:
            raise RunStopped
        self.graded += len(outputs)

    async def _heartbeats(self) -> None:
        await keep_alive(settings.EVAL_HEARTBEAT_SECONDS, self._beat)
        self.stopped.set()

    async def _beat(self) -> str | None:
        alive = await sync_to_async(eval_run_heartbeat)(run=self.run, attempt=self.attempt,
                                                        waiting_for=self.requests.waiting_for)
        return None if alive else "stopped"

    # --- one item -------------------------------------------------------------------------------

    async def _item(self, index: int, line: dict) -> dict:
        item = line["item"]
        if self.source["type"] == "pairwise":
            return await self._pairwise_item(index, item)
        if self.source["type"] == "jsonl":
            text = line["sample"]["output_text"]
            sample = {"model": line["sample"].get("model") or "", "input": [], "error": None,
                      "output": [{"role": "assistant", "content": text}], "finish_reason": "",
                      "usage": None}
            namespace = grading.sample_namespace(text)
        else:
            sample, namespace = await self._sample(item)
        if sample["error"] is not None:
            results = [_errored(spec, sample["error"]) for spec in self.criteria]
        else:
            results = list(await asyncio.gather(*(self._grade(spec, item, namespace)
                                                   for spec in self.criteria)))
        status = ("error" if sample["error"] is not None or any(r.get("error") for r in results)
                  else "pass" if all(r["passed"] for r in results) else "fail")
        return {"datasource_item_id": index, "datasource_item": item, "sample": sample,
                "results": results, "status": status}

    def _messages(self, item: dict) -> list[dict]:
        template = self.source["input_messages"]
        if template["type"] == "item_reference":
            value: object = {"item": item}
            for part in template["item_reference"].split("."):
                value = value.get(part) if isinstance(value, dict) else None
            if not isinstance(value, list) or not all(
                    isinstance(m, dict) and isinstance(m.get("role"), str)
                    and isinstance(m.get("content"), str) for m in value):
                raise grading.GraderError(
                    "invalid_item_reference",
                    f"{template['item_reference']} is not a list of chat messages in this item.",
                    "input_messages.item_reference")
            return [{"role": m["role"], "content": m["content"]} for m in value]
        return [{"role": m["role"], "content": grading.render(m["content"], item=item, sample=None)}
                for m in template["template"]]

    async def _pairwise_item(self, index: int, item: dict) -> dict:
        """Both models answer; the judge compares the answers twice, in both orders. The first
        model wins only if both verdicts say so (likewise the second): a judge that changes its
        verdict with the order is a tie, not a win for whichever answer it read first."""
        first, second = self.source["models"]
        (a, a_text), (b, b_text) = await asyncio.gather(self._sample(item, first),
                                                        self._sample(item, second))
        sample = {**a, "compare": b}
        if a["error"] is not None or b["error"] is not None:
            result = _errored(PAIRWISE, a["error"] or b["error"])
        else:
            verdicts = await asyncio.gather(self._verdict(item, a_text, b_text),
                                            self._verdict(item, b_text, a_text))
            result = _pairwise_result(self.source["judge"]["model"], verdicts)
        status = ("error" if result.get("error") else
                  {"a": "pass", "b": "fail", "tie": "tie"}[result["winner"]])
        return {"datasource_item_id": index, "datasource_item": item, "sample": sample,
                "results": [result], "status": status}

    async def _verdict(self, item: dict, first: dict, second: dict) -> dict:
        """One reading of the two answers, in this order: its label, or why there is none."""
        spec = self.source["judge"]
        try:
            request = grading.judge_request(spec, item=item, sample={"first": first, "second": second})
        except grading.GraderError as exc:
            return {"label": None, "error": {"code": exc.code, "message": exc.message}}
        status, payload = await self._call(_judge_body(request))
        if status != 200:
            return {"label": None, "error": {"code": "judge_failed", "message": (
                payload.get("error") or {}).get("message") or f"The judge answered {status}."}}
        text = payload["choices"][0]["message"].get("content") or ""
        try:
            label = read_label(text, spec["labels"])
        except JudgeUnreadable as exc:
            return {"label": None, "text": text, "usage": _usage(payload),
                    "error": {"code": exc.code, "message": exc.message}}
        return {"label": label, "text": text, "usage": _usage(payload), "error": None}

    async def _sample(self, item: dict, model: str | None = None) -> tuple[dict, dict]:
        model = model or self.run.model
        params = dict(self.source.get("sampling_params") or {})
        params.setdefault("max_completion_tokens", settings.EVAL_MAX_TOKENS)
        sample = {"model": model, "input": [], "output": [], "finish_reason": "",
                  "usage": None, "error": None, "temperature": params.get("temperature", 1.0),
                  "top_p": params.get("top_p", 1.0), "seed": params.get("seed"),
                  "max_completion_tokens": params["max_completion_tokens"]}
        try:
            sample["input"] = self._messages(item)
        except grading.GraderError as exc:
            sample["error"] = {"code": exc.code, "message": exc.message}
            return sample, grading.sample_namespace("")
        status, payload = await self._call({"model": model, "messages": sample["input"], **params})
        if status != 200:
            error = payload.get("error") or {}
            sample["error"] = {"code": error.get("code") or "sample_failed",
                               "message": error.get("message") or f"The model answered {status}."}
            return sample, grading.sample_namespace("")
        choice = payload["choices"][0]
        text = choice["message"].get("content") or ""
        sample.update(output=[{"role": "assistant", "content": text}],
                      finish_reason=choice.get("finish_reason") or "",
                      usage={**_usage(payload), "cached_tokens": 0})
        return sample, grading.sample_namespace(text, choices=payload["choices"],
                                                finish_reason=sample["finish_reason"])

    async def _grade(self, spec: dict, item: dict, namespace: dict) -> dict:
        return await grade_one(spec, item=item, namespace=namespace, call=self._call)

    # --- the requests ---------------------------------------------------------------------------

    def _base_models(self) -> set[str]:
        models = {self.run.model, *self.source.get("models", ())}
        models |= {c["model"] for c in self.criteria if c.get("type") in ("label_model", "score_model")}
        if self.source.get("judge"):
            models.add(self.source["judge"]["model"])
        bases = set()
        for model in models:
            try:
                bases.add(servable_model(organization=self.run.organization, model=model,
                                         undeployed_ok=model in self.inside.undeployed).base_model)
            except ApiError:
                pass  # its requests will say so, item by item
        return bases

    async def _call(self, body: dict) -> tuple[int, dict]:
        """One chat completion; waits out the organization's limits and an engine that is down."""
        return await self.requests.call(CHAT, body)


async def grade_one(spec: dict, *, item: dict, namespace: dict, call) -> dict:
    """One criterion's result (OpenAI's output item result) for one sample; a model grader's
    judge is asked through ``call(body) -> (status, payload)``. Never raises for the item's
    sake: what cannot be graded is a result with its error."""
    try:
        request = grading.judge_request(spec, item=item, sample=namespace)
    except grading.GraderError as exc:
        return _errored(spec, {"code": exc.code, "message": exc.message})
    answer = None
    if request is not None:
        status, payload = await call(_judge_body(request))
        if status == 200:
            answer = grading.JudgeAnswer(text=payload["choices"][0]["message"].get("content"),
                                         usage=_usage(payload))
        else:
            answer = grading.JudgeAnswer(text=None, error=(payload.get("error") or {}).get(
                "message") or f"The judge model answered {status}.")
    result = grading.grade(spec, item=item, sample=namespace, judge=answer).to_result()
    if request is not None and isinstance(result.get("sample"), dict):
        result["sample"].setdefault("model", request.model)
    return result


def _judge_body(request: grading.JudgeRequest) -> dict:
    """A judge's chat completion, as the gateway takes it."""
    body = {"model": request.model, "messages": request.messages,
            **{k: v for k, v in request.sampling.items() if k in JUDGE_SAMPLING}}
    if request.response_format is not None:
        body["response_format"] = request.response_format
    return body


def _usage(payload: dict) -> dict:
    usage = payload.get("usage") or {}
    prompt, completion = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


PAIRWISE = {"name": "pairwise", "type": "pairwise"}
_WINNER = {("first", "second"): "a", ("second", "first"): "b"}  # (A first, B first) -> winner


def _pairwise_result(judge: str, verdicts: list[dict]) -> dict:
    usage = {name: sum((v.get("usage") or {}).get(name, 0) for v in verdicts)
             for name in ("prompt_tokens", "completion_tokens", "total_tokens")}
    judged = {"model": judge, "usage": usage, "output": [v.get("text") for v in verdicts],
              "invocations": len(verdicts)}
    failed = next((v["error"] for v in verdicts if v["error"] is not None), None)
    if failed is not None:
        return {**_errored(PAIRWISE, failed), "sample": judged, "winner": None,
                "verdicts": [v["label"] for v in verdicts]}
    labels = tuple(v["label"] for v in verdicts)
    winner = _WINNER.get(labels, "tie")
    return {**PAIRWISE, "score": {"a": 1.0, "tie": 0.5, "b": 0.0}[winner], "passed": winner == "a",
            "winner": winner, "verdicts": list(labels), "sample": judged, "error": None}


def _errored(spec: dict, error: dict) -> dict:
    return {"name": spec["name"], "type": spec["type"], "score": 0.0, "passed": False,
            "sample": None, "error": error}
