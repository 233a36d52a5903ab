"""The eval worker's writes: claim a run, store its graded items, keep it alive, end it.

Fenced like a training job's: a claim increments ``attempts`` and every later write locks the run
row and counts only while that attempt is still the latest and the run still in progress. A
worker that was paused, canceled or replaced therefore changes nothing, and the items of a run
are written under the run's lock, each index once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from django.db import transaction
from django.db.models import F
from django.db.models.functions import Coalesce, Now
from django.utils import timezone

from jobs.grading import stats
from tuneplex.evals.models import EvalOutputItem, EvalRun

Status = EvalRun.Status
# A pairwise run's items: pass (the first model won), fail (the second won), tie (neither, or
# the judge changed its mind with the order): counted as failed, and apart in its statistics.
_COUNTED = {"pass": "passed", "fail": "failed", "error": "errored", "tie": "failed"}


def eval_run_claim(*, run_id: str) -> EvalRun | None:
    """Take a queued run (a conditional UPDATE: a message delivered twice claims it once)."""
    claimed = EvalRun.objects.filter(pk=run_id, status=Status.QUEUED, cancel_requested=False).update(
        status=Status.IN_PROGRESS, attempts=F("attempts") + 1, heartbeat_at=Now(),
        started_at=Coalesce(F("started_at"), Now()), waiting_for="")
    if not claimed:
        return None
    return EvalRun.objects.select_related("eval", "organization").get(pk=run_id)


def _fenced(run: EvalRun, attempt: int) -> EvalRun | None:
    """The run's row, locked, while ``attempt`` still holds it (call inside a transaction)."""
    return (EvalRun.objects.select_for_update()
            .filter(pk=run.pk, attempts=attempt, status=Status.IN_PROGRESS).first())


def eval_run_note(*, run: EvalRun, attempt: int, message: str) -> bool:
    """Add an event to the run's history (while the attempt holds the run)."""
    with transaction.atomic():
        locked = _fenced(run, attempt)
        if locked is None:
            return False
        _note(locked, attempt, message)
        locked.save(update_fields=["events"])
    return True


def _note(run: EvalRun, attempt: int, message: str) -> None:
    run.events = [*run.events, {"at": int(timezone.now().timestamp()), "attempt": attempt,
                                "message": message}][-100:]


def eval_run_heartbeat(*, run: EvalRun, attempt: int, waiting_for: str = "") -> bool:
    """Still ours to work on? (False: canceled, deleted, or taken over by another attempt.)"""
    return bool(EvalRun.objects.filter(pk=run.pk, attempts=attempt, status=Status.IN_PROGRESS,
                                       cancel_requested=False)
                .update(heartbeat_at=Now(), waiting_for=waiting_for[:200]))


def eval_run_record_items(*, run: EvalRun, attempt: int, outputs: list[dict]) -> bool:
    """Store graded items (dicts of EvalOutputItem's fields), each index at most once, and count
    them into the run's live totals. False when the run is no longer this attempt's."""
    with transaction.atomic():
        locked = _fenced(run, attempt)
        if locked is None or locked.cancel_requested:
            return False
        indexes = [output["datasource_item_id"] for output in outputs]
        stored = set(EvalOutputItem.objects.filter(run=locked, datasource_item_id__in=indexes)
                     .values_list("datasource_item_id", flat=True))
        new = [output for output in outputs if output["datasource_item_id"] not in stored]
        EvalOutputItem.objects.bulk_create(
            [EvalOutputItem(organization_id=locked.organization_id, run=locked, **output)
             for output in new])
        tally = Tally.of_run(locked)
        for output in new:
            tally.add(output["status"], output["results"], output["sample"])
        tally.store(locked, final=False)
        locked.items_done += len(new)
        locked.heartbeat_at = timezone.now()
        locked.waiting_for = ""
        locked.save(update_fields=["items_done", "heartbeat_at", "waiting_for", "result_counts",
                                   "per_testing_criteria_results", "per_model_usage"])
    return True


def eval_run_complete(*, run: EvalRun, attempt: int, note: str = "") -> bool:
    return _end(run, attempt, Status.COMPLETED, None, note)


def eval_run_fail(*, run: EvalRun, attempt: int, code: str, message: str, note: str = "") -> bool:
    return _end(run, attempt, Status.FAILED, {"code": code, "message": message}, note)


def _end(run: EvalRun, attempt: int, status: str, error: dict | None, note: str) -> bool:
    with transaction.atomic():
        locked = _fenced(run, attempt)
        if locked is None:
            return False
        locked.status, locked.error, locked.finished_at = status, error, timezone.now()
        locked.waiting_for = ""
        if note:
            _note(locked, attempt, note)
        summarize(locked)
        locked.save()
    return True


def eval_run_requeue_stale(*, run: EvalRun, attempt: int, max_attempts: int) -> str:
    """A run whose worker stopped heartbeating: queued again for another worker (which resumes
    after the items stored), or failed once it has had ``max_attempts``. Returns what it did."""
    with transaction.atomic():
        locked = _fenced(run, attempt)
        if locked is None:
            return "skipped"
        if locked.attempts >= max_attempts:
            locked.status, locked.finished_at = Status.FAILED, timezone.now()
            locked.error = {"code": "worker_lost", "message": (
                f"The workers running this run stopped responding {locked.attempts} times; "
                f"{locked.items_done} of {locked.items_total} items were graded and are kept.")}
            summarize(locked)
            locked.save()
            return "failed"
        locked.status, locked.enqueued_at = Status.QUEUED, None
        _note(locked, attempt, f"The worker of attempt {attempt} stopped responding; the run is "
                               f"queued again with {locked.items_done} items kept.")
        locked.save(update_fields=["status", "enqueued_at", "events"])
        return "requeued"


def summarize(run: EvalRun) -> None:
    """Recount the run's totals, usage and statistics from every item stored (the exact figures,
    whatever was counted on the way)."""
    tally = Tally(criteria=_criteria(run))
    for status, results, sample in (EvalOutputItem.objects.filter(run=run)
                                    .values_list("status", "results", "sample").iterator()):
        tally.add(status, results, sample)
    tally.store(run, final=True)
    run.items_done = tally.counts["total"]


def _score_ranges(run: EvalRun) -> dict[str, tuple[float, float]]:
    """Each criterion's possible scores: a mean's interval is clipped to them (a 0/1 grader's
    mean is never below 0)."""
    return {c["name"]: tuple(c["range"]) if c["type"] == "score_model" else (0.0, 1.0)
            for c in run.eval.testing_criteria}


def _criteria(run: EvalRun) -> list[str]:
    if run.data_source.get("type") == "pairwise":
        return ["pairwise"]
    return [c["name"] for c in run.eval.testing_criteria]


@dataclass
class Tally:
    """A run's figures: items passed, failed and errored; per criterion passed, failed, errored
    and the scores; tokens per model (the answering model's and each judge's)."""

    criteria: list[str]
    counts: dict[str, int] = field(default_factory=lambda: {"total": 0, "passed": 0, "failed": 0,
                                                             "errored": 0})
    per_criterion: dict[str, dict] = field(default_factory=dict)
    usage: dict[str, dict] = field(default_factory=dict)
    pairwise: dict[str, int] = field(default_factory=lambda: {"a": 0, "b": 0, "tie": 0, "error": 0})

    def __post_init__(self) -> None:
        for name in self.criteria:
            self.per_criterion.setdefault(name, {"passed": 0, "failed": 0, "errored": 0, "scores": []})

    @classmethod
    def of_run(cls, run: EvalRun) -> Tally:
        """The live totals stored on the run so far (scores are kept only by summarize)."""
        tally = cls(criteria=_criteria(run))
        tally.counts.update(run.result_counts or {})
        for row in run.per_testing_criteria_results or []:
            if row["testing_criteria"] in tally.per_criterion:
                tally.per_criterion[row["testing_criteria"]].update(
                    passed=row["passed"], failed=row["failed"], errored=row.get("errored", 0))
        for row in run.per_model_usage or []:
            tally.usage[row["model_name"]] = {k: v for k, v in row.items() if k != "model_name"}
        return tally

    def _use(self, model: str | None, usage: dict | None, calls: int = 1) -> None:
        if not model or not usage:
            return
        row = self.usage.setdefault(model, {"invocation_count": 0, "prompt_tokens": 0,
                                            "completion_tokens": 0, "total_tokens": 0,
                                            "cached_tokens": 0})
        row["invocation_count"] += calls
        for name in ("prompt_tokens", "completion_tokens", "total_tokens"):
            row[name] += int(usage.get(name) or 0)

    def add(self, status: str, results: list[dict], sample: dict) -> None:
        self.counts["total"] += 1
        self.counts[_COUNTED[status]] += 1
        self._use(sample.get("model"), sample.get("usage"))
        compared = sample.get("compare") or {}
        self._use(compared.get("model"), compared.get("usage"))
        for result in results:
            if result.get("type") == "pairwise":
                self.pairwise["error" if result.get("error") else result["winner"]] += 1
            row = self.per_criterion.get(result["name"])
            if row is None:
                continue
            if result.get("error"):
                row["errored"] += 1
            else:
                row["passed" if result["passed"] else "failed"] += 1
                row["scores"].append(float(result["score"]))
            judged = result.get("sample") or {}
            self._use(judged.get("model"), judged.get("usage"), judged.get("invocations", 1))

    def store(self, run: EvalRun, *, final: bool) -> None:
        run.result_counts = dict(self.counts)
        run.per_testing_criteria_results = [
            {"testing_criteria": name, "passed": row["passed"], "failed": row["failed"],
             "errored": row["errored"]} for name, row in self.per_criterion.items()]
        run.per_model_usage = [{"model_name": model, **row} for model, row in self.usage.items()]
        if final and run.data_source.get("type") == "pairwise":
            models = run.data_source["models"]
            run.statistics = {"pairwise": {
                "models": models, "errored": self.pairwise["error"],
                **stats.win_rate(self.pairwise["a"], self.pairwise["b"], self.pairwise["tie"])}}
        elif final:
            ranges = _score_ranges(run)
            run.statistics = {name: {
                "pass_rate": stats.proportion(row["passed"], row["passed"] + row["failed"]).to_dict(),
                "mean_score": stats.mean(row["scores"], bounds=ranges.get(name)).to_dict(),
                "errored": row["errored"]} for name, row in self.per_criterion.items()}
