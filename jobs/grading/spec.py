"""Validation of grader specs, in the shapes of OpenAI's graders (``openai.types.graders``)
plus our ``json_check``. :func:`validate` returns the spec normalised (defaults filled in,
numbers as floats) or raises GraderError with a code and the path of the field at fault."""

from __future__ import annotations

import math
from typing import Any

from . import metrics
from .errors import GraderError
from .jsoncheck import check_schema
from .templates import check_template

MAX_NAME_CHARS = 256
MAX_MODEL_CHARS = 256
MAX_LABELS = 32
MAX_LABEL_CHARS = 256
MAX_MESSAGES = 16
MAX_CONTENT_PARTS = 16  # per message
MAX_PYTHON_SOURCE_CHARS = 256 * 1024
MAX_JUDGE_TOKENS = 4096  # sampling_params.max_completions_tokens
STRING_OPERATIONS = ("eq", "ne", "like", "ilike")
OPENAI_METRICS = ("cosine", "fuzzy_match", "bleu", "gleu", "meteor", "rouge_1", "rouge_2",
                  "rouge_3", "rouge_4", "rouge_5", "rouge_l")
ROLES = ("user", "assistant", "system", "developer")
REASONING_EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh", "max")
GRADER_TYPES = ("string_check", "text_similarity", "json_check", "label_model", "score_model",
                "python", "multi")
DEFAULT_SCORE_RANGE = (0.0, 1.0)

_COMMON = {"type", "name"}
_KEYS = {
    "string_check": _COMMON | {"input", "reference", "operation"},
    "text_similarity": _COMMON | {"input", "reference", "evaluation_metric", "pass_threshold"},
    "json_check": _COMMON | {"input", "schema", "pass_threshold"},
    "label_model": _COMMON | {"input", "labels", "passing_labels", "model"},
    "score_model": _COMMON | {"input", "model", "range", "sampling_params", "pass_threshold"},
    "python": _COMMON | {"source", "image_tag", "pass_threshold"},
}


def validate(spec: dict, *, allow_python: bool = False) -> dict:
    """The spec normalised, or GraderError.

    ``allow_python``: whether the operator turned on a sandbox for OpenAI's ``python`` grader.
    Off, a python grader is refused with ``python_grader_disabled``; on, it is refused with
    ``python_grader_unavailable`` after its fields are checked, as no sandbox exists yet.
    """
    if not isinstance(spec, dict):
        raise GraderError("invalid_type", "a grader must be a JSON object", None)
    kind = spec.get("type")
    if kind is None:
        raise GraderError("missing_required_parameter", "the grader has no type", "type")
    if kind not in GRADER_TYPES:
        raise GraderError("invalid_value", f"unknown grader type {kind!r}; one of "
                          f"{', '.join(GRADER_TYPES)}", "type")
    if kind == "multi":
        raise GraderError("unsupported_grader", "multi graders are not supported yet: give "
                          "each grader as its own testing criterion", "type")
    unknown = sorted(set(spec) - _KEYS[kind])
    if unknown:
        raise GraderError("unknown_parameter", f"{kind} graders have no parameter "
                          f"{unknown[0]!r}", unknown[0])
    out: dict[str, Any] = {"type": kind, "name": _string(spec, "name", MAX_NAME_CHARS)}
    _VALIDATORS[kind](spec, out, allow_python)
    return out


def _string_check(spec: dict, out: dict, _: bool) -> None:
    out["input"] = _template(spec, "input")
    out["reference"] = _template(spec, "reference")
    out["operation"] = _choice(spec, "operation", STRING_OPERATIONS)


def _text_similarity(spec: dict, out: dict, _: bool) -> None:
    out["input"] = _template(spec, "input")
    out["reference"] = _template(spec, "reference")
    metric = _choice(spec, "evaluation_metric", OPENAI_METRICS)
    if metric in metrics.UNSUPPORTED:
        raise GraderError("unsupported_metric", f"{metrics.UNSUPPORTED[metric]}; supported: "
                          f"{', '.join(metrics.SUPPORTED)}", "evaluation_metric")
    out["evaluation_metric"] = metric
    _threshold(spec, out, DEFAULT_SCORE_RANGE)


def _json_check(spec: dict, out: dict, _: bool) -> None:
    out["input"] = _template(spec, "input")
    if spec.get("schema") is not None:
        out["schema"] = check_schema(spec["schema"])
    _threshold(spec, out, DEFAULT_SCORE_RANGE)


def _label_model(spec: dict, out: dict, _: bool) -> None:
    out["input"] = _messages(spec)
    out["model"] = _string(spec, "model", MAX_MODEL_CHARS)
    labels = _labels(spec, "labels")
    passing = _labels(spec, "passing_labels")
    for index, label in enumerate(passing):
        if label not in labels:
            raise GraderError("invalid_value", f"{label!r} is not one of the labels",
                              f"passing_labels[{index}]")
    out["labels"], out["passing_labels"] = labels, passing


def _score_model(spec: dict, out: dict, _: bool) -> None:
    out["input"] = _messages(spec)
    out["model"] = _string(spec, "model", MAX_MODEL_CHARS)
    score_range = spec.get("range")
    if score_range is None:
        score_range = list(DEFAULT_SCORE_RANGE)
    if not isinstance(score_range, list) or len(score_range) != 2:
        raise GraderError("invalid_type", "range must be two numbers, [low, high]", "range")
    low = _number(score_range[0], "range[0]")
    high = _number(score_range[1], "range[1]")
    if not low < high:
        raise GraderError("invalid_value", "range must be [low, high] with low < high", "range")
    out["range"] = [low, high]
    if spec.get("sampling_params") is not None:
        out["sampling_params"] = _sampling_params(spec["sampling_params"])
    _threshold(spec, out, (low, high))


def _python(spec: dict, out: dict, allow_python: bool) -> None:
    if not allow_python:
        raise GraderError("python_grader_disabled", "python graders run tenant code and are "
                          "turned off on this platform (docs/security.md)", "type")
    _string(spec, "source", MAX_PYTHON_SOURCE_CHARS)
    if spec.get("image_tag") is not None:
        _string(spec, "image_tag", MAX_NAME_CHARS)
    _threshold(spec, out, (-math.inf, math.inf))
    raise GraderError("python_grader_unavailable", "python graders are allowed here but no "
                      "sandbox to run them exists yet", "type")


_VALIDATORS = {
    "string_check": _string_check, "text_similarity": _text_similarity,
    "json_check": _json_check, "label_model": _label_model, "score_model": _score_model,
    "python": _python,
}


def _string(spec: dict, key: str, limit: int) -> str:
    value = spec.get(key)
    if value is None:
        raise GraderError("missing_required_parameter", f"{key} is required", key)
    if not isinstance(value, str):
        raise GraderError("invalid_type", f"{key} must be a string", key)
    if not value.strip():
        raise GraderError("invalid_value", f"{key} must not be empty", key)
    if len(value) > limit:
        raise GraderError("limit_exceeded", f"{key} may be at most {limit} characters", key)
    return value


def _template(spec: dict, key: str) -> str:
    if spec.get(key) is None:
        raise GraderError("missing_required_parameter", f"{key} is required", key)
    return check_template(spec[key], key)


def _choice(spec: dict, key: str, choices: tuple) -> str:
    value = spec.get(key)
    if value is None:
        raise GraderError("missing_required_parameter", f"{key} is required", key)
    if value not in choices:
        raise GraderError("invalid_value", f"{key} must be one of {', '.join(choices)}", key)
    return value


def _number(value: Any, param: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise GraderError("invalid_type", "must be a number", param)
    if not math.isfinite(value):
        raise GraderError("invalid_value", "must be a finite number", param)
    return float(value)


def _threshold(spec: dict, out: dict, score_range: tuple[float, float]) -> None:
    if spec.get("pass_threshold") is None:
        return
    threshold = _number(spec["pass_threshold"], "pass_threshold")
    low, high = score_range
    if not low <= threshold <= high:
        raise GraderError("invalid_value", f"pass_threshold must lie within the score range "
                          f"[{low:g}, {high:g}]", "pass_threshold")
    out["pass_threshold"] = threshold


def _labels(spec: dict, key: str) -> list[str]:
    labels = spec.get(key)
    if labels is None:
        raise GraderError("missing_required_parameter", f"{key} is required", key)
    if not isinstance(labels, list) or not labels:
        raise GraderError("invalid_type", f"{key} must be a non-empty list of strings", key)
    if len(labels) > MAX_LABELS:
        raise GraderError("limit_exceeded", f"{key} may hold at most {MAX_LABELS} labels", key)
    for index, label in enumerate(labels):
        param = f"{key}[{index}]"
        if not isinstance(label, str) or not label.strip():
            raise GraderError("invalid_type", "a label must be a non-empty string", param)
        if len(label) > MAX_LABEL_CHARS:
            raise GraderError("limit_exceeded", f"a label may be at most {MAX_LABEL_CHARS} "
                              "characters", param)
        if label in labels[:index]:
            raise GraderError("invalid_value", f"{label!r} is listed twice", param)
    return list(labels)


def _messages(spec: dict) -> list[dict]:
    messages = spec.get("input")
    if messages is None:
        raise GraderError("missing_required_parameter", "input is required", "input")
    if not isinstance(messages, list) or not messages:
        raise GraderError("invalid_type", "input must be a non-empty list of messages", "input")
    if len(messages) > MAX_MESSAGES:
        raise GraderError("limit_exceeded", f"input may hold at most {MAX_MESSAGES} messages",
                          "input")
    return [_message(message, f"input[{index}]") for index, message in enumerate(messages)]


def _message(message: Any, param: str) -> dict:
    if not isinstance(message, dict):
        raise GraderError("invalid_type", "a message must be an object with role and content",
                          param)
    unknown = sorted(set(message) - {"role", "content", "type"})
    if unknown:
        raise GraderError("unknown_parameter", f"a message has no parameter {unknown[0]!r}",
                          f"{param}.{unknown[0]}")
    if message.get("type", "message") != "message":
        raise GraderError("invalid_value", "type must be 'message'", f"{param}.type")
    if message.get("role") not in ROLES:
        raise GraderError("invalid_value", f"role must be one of {', '.join(ROLES)}",
                          f"{param}.role")
    content = message.get("content")
    if content is None:
        raise GraderError("missing_required_parameter", "content is required",
                          f"{param}.content")
    out = {"role": message["role"], "content": _content(content, f"{param}.content")}
    if "type" in message:
        out["type"] = "message"
    return out


def _content(content: Any, param: str) -> Any:
    if isinstance(content, str):
        return check_template(content, param)
    if isinstance(content, dict):
        return _part(content, param)
    if not isinstance(content, list) or not content:
        raise GraderError("invalid_type", "content must be a string, a content part or a "
                          "non-empty list of them", param)
    if len(content) > MAX_CONTENT_PARTS:
        raise GraderError("limit_exceeded", f"a message may hold at most {MAX_CONTENT_PARTS} "
                          "content parts", param)
    return [check_template(part, f"{param}[{index}]") if isinstance(part, str)
            else _part(part, f"{param}[{index}]") for index, part in enumerate(content)]


def _part(part: Any, param: str) -> dict:
    if not isinstance(part, dict):
        raise GraderError("invalid_type", "a content part must be a string or an object",
                          param)
    kind = part.get("type")
    if kind in ("input_image", "input_audio"):
        raise GraderError("unsupported_content", f"{kind} content is not supported: judges "
                          "here read text only", f"{param}.type")
    if kind not in ("input_text", "output_text"):
        raise GraderError("invalid_value", "a content part's type must be input_text or "
                          "output_text", f"{param}.type")
    unknown = sorted(set(part) - {"type", "text", "prompt_cache_breakpoint"})
    if unknown:
        raise GraderError("unknown_parameter", f"a content part has no parameter "
                          f"{unknown[0]!r}", f"{param}.{unknown[0]}")
    if part.get("text") is None:
        raise GraderError("missing_required_parameter", "text is required", f"{param}.text")
    return {"type": kind, "text": check_template(part["text"], f"{param}.text")}


def _sampling_params(params: Any) -> dict:
    if not isinstance(params, dict):
        raise GraderError("invalid_type", "sampling_params must be an object",
                          "sampling_params")
    params = dict(params)
    if "max_completion_tokens" in params:  # the chat API's spelling of OpenAI's field
        if "max_completions_tokens" in params:
            raise GraderError("invalid_value", "give max_completions_tokens once",
                              "sampling_params.max_completion_tokens")
        params["max_completions_tokens"] = params.pop("max_completion_tokens")
    known = ("temperature", "top_p", "seed", "max_completions_tokens", "reasoning_effort")
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise GraderError("unknown_parameter", f"sampling_params has no parameter "
                          f"{unknown[0]!r}", f"sampling_params.{unknown[0]}")
    out: dict[str, Any] = {}
    bounds = {"temperature": (0.0, 2.0), "top_p": (0.0, 1.0)}
    for key, (low, high) in bounds.items():
        if params.get(key) is not None:
            value = _number(params[key], f"sampling_params.{key}")
            if not low <= value <= high or (key == "top_p" and value == 0):
                raise GraderError("invalid_value", f"{key} must lie in "
                                  f"{'(' if key == 'top_p' else '['}{low:g}, {high:g}]",
                                  f"sampling_params.{key}")
            out[key] = value
    for key, low, high in (("seed", -2**63, 2**63 - 1),
                           ("max_completions_tokens", 1, MAX_JUDGE_TOKENS)):
        value = params.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise GraderError("invalid_type", f"{key} must be an integer",
                              f"sampling_params.{key}")
        if not low <= value <= high:
            raise GraderError("invalid_value", f"{key} must lie in [{low}, {high}]",
                              f"sampling_params.{key}")
        out[key] = value
    if params.get("reasoning_effort") is not None:
        if params["reasoning_effort"] not in REASONING_EFFORTS:
            raise GraderError("invalid_value", "reasoning_effort must be one of "
                              f"{', '.join(REASONING_EFFORTS)}",
                              "sampling_params.reasoning_effort")
        out["reasoning_effort"] = params["reasoning_effort"]
    return out
