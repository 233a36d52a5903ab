"""Grading one sample of one item: ``grade(spec, item=..., sample=..., judge=...) -> Grade``.

Specs come through :func:`jobs.grading.validate` first. A grade never raises for what the data
or the judge did: a missing template value, an oversized input or an unreadable judge answer is
a Grade with ``error`` set (score 0, not passed), and the run counts that item as errored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from . import judges, metrics
from .errors import GraderError
from .jsoncheck import PatternTimeout, schema_failure
from .judges import JudgeAnswer, JudgeRequest, JudgeUnreadable
from .templates import parse_json, render

MODEL_GRADERS = ("label_model", "score_model")


@dataclass(frozen=True)
class Grade:
    """One grader's verdict on one sample."""

    name: str
    type: str
    score: float
    passed: bool
    error: dict | None = None  # {"code", "message"}: the item could not be graded
    sample: dict | None = None  # model graders: the judge's input, output and usage

    def to_result(self) -> dict:
        """OpenAI's output item ``results[]`` entry (``error`` added when set)."""
        result: dict[str, Any] = {"name": self.name, "type": self.type, "score": self.score,
                                  "passed": self.passed, "sample": self.sample}
        if self.error is not None:
            result["error"] = self.error
        return result


def judge_request(spec: dict, *, item: dict, sample: dict | None) -> JudgeRequest | None:
    """What a model grader wants sent to its model; None for graders that need no model.

    Raises GraderError (code ``template_missing_value`` and the like) when the prompt cannot
    be rendered for this item: call :func:`grade` with ``judge=None`` to get that item's
    errored Grade.
    """
    if spec["type"] not in MODEL_GRADERS:
        return None
    return judges.build_request(spec, item=item, sample=sample)


def grade(spec: dict, *, item: dict, sample: dict | None,
          judge: JudgeAnswer | None = None) -> Grade:
    """Grades ``sample`` (see :func:`jobs.grading.sample_namespace`) against ``item``.

    ``judge``: the model's answer to :func:`judge_request`, for model graders.
    """
    grader = _GRADERS.get(spec["type"])
    if grader is None:
        return _errored(spec, "unsupported_grader", f"no grader of type {spec['type']!r}")
    try:
        return grader(spec, item, sample, judge)
    except GraderError as exc:
        return _errored(spec, exc.code, exc.message)


def _errored(spec: dict, code: str, message: str, sample: dict | None = None) -> Grade:
    return Grade(name=spec["name"], type=spec["type"], score=0.0, passed=False,
                 error={"code": code, "message": message}, sample=sample)


def _binary(spec: dict, passed: bool, sample: dict | None = None) -> Grade:
    return Grade(name=spec["name"], type=spec["type"], score=1.0 if passed else 0.0,
                 passed=passed, sample=sample)


def _passes(spec: dict, score: float, score_range: tuple[float, float] = (0.0, 1.0)) -> bool:
    """At or above pass_threshold; without one, at or above the middle of the score range."""
    threshold = spec.get("pass_threshold")
    if threshold is None:
        threshold = (score_range[0] + score_range[1]) / 2
    return score >= threshold


def _string_check(spec: dict, item: dict, sample: dict | None, _: Any) -> Grade:
    text = render(spec["input"], item=item, sample=sample, param="input")
    reference = render(spec["reference"], item=item, sample=sample, param="reference")
    operation = spec["operation"]
    if operation == "eq":
        passed = text == reference
    elif operation == "ne":
        passed = text != reference
    elif operation == "like":  # the input contains the reference
        passed = reference in text
    else:  # ilike: the same, ignoring case
        passed = reference.casefold() in text.casefold()
    return _binary(spec, passed)


def _text_similarity(spec: dict, item: dict, sample: dict | None, _: Any) -> Grade:
    text = render(spec["input"], item=item, sample=sample, param="input")
    reference = render(spec["reference"], item=item, sample=sample, param="reference")
    score = metrics.similarity(spec["evaluation_metric"], text, reference)
    return Grade(name=spec["name"], type=spec["type"], score=score,
                 passed=_passes(spec, score))


def _json_check(spec: dict, item: dict, sample: dict | None, _: Any) -> Grade:
    """Ours, not OpenAI's: the rendered input must be JSON, and satisfy ``schema`` when one is
    given. A failure says why in ``sample.reason`` (the first failing path, ``$.a[0]: ...``)."""
    text = render(spec["input"], item=item, sample=sample, param="input")
    try:
        value = parse_json(text)
    except ValueError as exc:
        return _binary(spec, False, {"reason": f"not JSON: {exc}"})
    if spec.get("schema") is not None:
        try:
            failure = schema_failure(value, spec["schema"])
        except PatternTimeout as exc:
            return _errored(spec, "schema_pattern_timeout", str(exc))
        if failure is not None:
            return _binary(spec, False, {"reason": failure})
    return Grade(name=spec["name"], type=spec["type"], score=1.0, passed=_passes(spec, 1.0))


def _model_grader(spec: dict, item: dict, sample: dict | None,
                  judge: JudgeAnswer | None) -> Grade:
    request = judges.build_request(spec, item=item, sample=sample)
    trace: dict[str, Any] = {"model": request.model, "input": request.messages, "output": [],
                             "usage": judge.usage if judge else None, **request.sampling}
    if judge is None:
        return _errored(spec, "judge_missing", "a model grader was graded without the "
                        "judge's answer", trace)
    if judge.error is not None or judge.text is None:
        return _errored(spec, "judge_failed", judge.error or "the judge gave no answer", trace)
    trace["output"] = [{"role": "assistant", "content": judge.text}]
    try:
        if spec["type"] == "label_model":
            label = judges.read_label(judge.text, spec["labels"])
            return _binary(spec, label in spec["passing_labels"], {**trace, "label": label})
        score, reason = judges.read_score(judge.text, spec["range"])
    except JudgeUnreadable as exc:
        return _errored(spec, exc.code, exc.message, trace)
    low, high = spec["range"]
    return Grade(name=spec["name"], type=spec["type"], score=score,
                 passed=_passes(spec, score, (low, high)),
                 sample={**trace, "reason": reason} if reason else trace)


def _python(spec: dict, *_: Any) -> Grade:
    return _errored(spec, "python_grader_unavailable", "no sandbox to run python graders exists")


_GRADERS = {
    "string_check": _string_check, "text_similarity": _text_similarity,
    "json_check": _json_check, "label_model": _model_grader, "score_model": _model_grader,
    "python": _python,
}
