"""Graders: plain functions (spec, item, sample) -> score and pass, in the shape of OpenAI's
graders, for eval runs, the ``/v1/fine_tuning/alpha/graders`` endpoints and, next, rewards in
reinforcement fine-tuning (the trainer's environment: no Django, no I/O here).

    spec = validate(raw_spec)                           # once, when the eval is created
    sample = sample_namespace(model_output_text)
    request = judge_request(spec, item=item, sample=sample)  # None unless a model grader
    answer = JudgeAnswer(text=...) if request else None      # the caller asks the judge model
    result = grade(spec, item=item, sample=sample, judge=answer).to_result()

Statistics over many grades: :mod:`jobs.grading.stats`. Documentation: docs/evaluation.md.
"""

from .errors import GraderError, TemplateMissing
from .graders import Grade, grade, judge_request
from .judges import JudgeAnswer, JudgeRequest
from .spec import validate
from .templates import render, sample_namespace

__all__ = [
    "Grade", "GraderError", "JudgeAnswer", "JudgeRequest", "TemplateMissing", "grade",
    "judge_request", "render", "sample_namespace", "validate",
]
