"""Model graders (``label_model``, ``score_model``): what to ask the judge, and how to read
its answer. No I/O: the caller sends the :class:`JudgeRequest` to the model through its own
client (the serving pool, under the organization's limits) and hands back a
:class:`JudgeAnswer`.

The request asks for a JSON answer with OpenAI's ``response_format`` (a JSON schema the
engine's guided decoding enforces), and the reader still accepts an answer that ignored it when
it is unambiguous: a bare label, or a bare number.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from .templates import parse_json, render

DEFAULT_TEMPERATURE = 0.0  # a judge should give the same verdict twice
DEFAULT_MAX_COMPLETION_TOKENS = 256  # a label or a score, and a sentence of reason
MAX_REASON_CHARS = 500  # about 125 tokens: the score and its reason fit the default budget
# Quotes, brackets and punctuation a model puts around a bare label: "Correct." -> Correct
_LABEL_WRAPPING = " \t\r\n\"'`*_.,;:!?()[]{}<>"
_FENCE = re.compile(r"^```[a-zA-Z]*\s*\n?(.*?)\n?```$", re.DOTALL)
# The first field of an answer cut off by the token limit ({"score": 0.7, "reason": "Becau...):
# the verdict came before the cut, so it is read.
_CUT_LABEL = re.compile(r'^\{\s*"label"\s*:\s*("(?:[^"\\]|\\.)*")\s*[,}]')
_CUT_SCORE = re.compile(r'^\{\s*"score"\s*:\s*(-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?)\s*[,}]')


@dataclass(frozen=True)
class JudgeRequest:
    """One chat completion to send to the judge model."""

    model: str
    messages: list[dict]  # [{"role", "content": str}], rendered
    sampling: dict  # temperature, max_completion_tokens; top_p, seed, reasoning_effort if set
    response_format: dict | None  # OpenAI's {"type": "json_schema", "json_schema": {...}}


@dataclass(frozen=True)
class JudgeAnswer:
    """The judge's reply: its message content, or why there is none (``error``: the request
    failed, timed out, was refused). ``usage`` is the completion's usage object."""

    text: str | None
    error: str | None = None
    usage: dict | None = None


class JudgeUnreadable(ValueError):
    """The answer is not one the grader can read; ``code`` says how (judge_unparseable,
    judge_out_of_range)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def build_request(spec: dict, *, item: dict, sample: dict | None) -> JudgeRequest:
    """Raises GraderError (TemplateMissing, ...) when a message cannot be rendered."""
    messages = [_render_message(message, index, item=item, sample=sample)
                for index, message in enumerate(spec["input"])]
    params = spec.get("sampling_params") or {}
    sampling: dict[str, Any] = {
        "temperature": params.get("temperature", DEFAULT_TEMPERATURE),
        "max_completion_tokens": params.get("max_completions_tokens",
                                            DEFAULT_MAX_COMPLETION_TOKENS),
    }
    for key in ("top_p", "seed", "reasoning_effort"):
        if params.get(key) is not None:
            sampling[key] = params[key]
    return JudgeRequest(model=spec["model"], messages=messages, sampling=sampling,
                        response_format=_response_format(spec))


def _render_message(message: dict, index: int, *, item: dict, sample: dict | None) -> dict:
    content = message["content"]
    param = f"input[{index}].content"
    if isinstance(content, str):
        text = render(content, item=item, sample=sample, param=param)
    else:
        parts = content if isinstance(content, list) else [content]
        texts = []
        for number, part in enumerate(parts):
            if isinstance(part, str):
                texts.append(render(part, item=item, sample=sample, param=f"{param}[{number}]"))
            else:
                where = f"{param}[{number}].text" if isinstance(content, list) else f"{param}.text"
                texts.append(render(part["text"], item=item, sample=sample, param=where))
        text = "\n".join(texts)  # separate parts stay separate paragraphs of one message
    # Chat templates of open models know system, user and assistant; OpenAI's developer role is
    # the system role of models that are not reasoning models.
    role = "system" if message["role"] == "developer" else message["role"]
    return {"role": role, "content": text}


def _response_format(spec: dict) -> dict:
    if spec["type"] == "label_model":
        name, strict = "label_result", True
        schema = {"type": "object", "properties": {"label": {"type": "string",
                                                              "enum": spec["labels"]}},
                  "required": ["label"], "additionalProperties": False}
    else:
        low, high = spec["range"]
        # Not strict in OpenAI's sense (which wants every property required): the reason is
        # optional. vLLM's guided decoding follows the schema either way.
        name, strict = "score_result", False
        schema = {"type": "object",
                  "properties": {"score": {"type": "number", "minimum": low, "maximum": high},
                                 "reason": {"type": "string", "maxLength": MAX_REASON_CHARS}},
                  "required": ["score"], "additionalProperties": False}
    return {"type": "json_schema", "json_schema": {"name": name, "strict": strict,
                                                   "schema": schema}}


def _unfence(text: str) -> str:
    text = text.strip()
    fenced = _FENCE.match(text)
    return fenced.group(1).strip() if fenced else text


def _json_or_cut(body: str, cut: re.Pattern, key: str) -> Any:
    """The JSON value of ``body``, or ``{key: value}`` from an object cut off after its first
    field, or None."""
    try:
        return parse_json(body)
    except ValueError:
        pass
    found = cut.match(body)
    return {key: parse_json(found.group(1))} if found else None


def read_label(text: str, labels: list[str]) -> str:
    """The label in ``text``: a JSON ``{"label": ...}``, or the bare text equal to one label
    (case-insensitive, quotes and punctuation around it ignored). Raises JudgeUnreadable."""
    body = _unfence(text)
    parsed = _json_or_cut(body, _CUT_LABEL, "label")
    if isinstance(parsed, dict):
        if not isinstance(parsed.get("label"), str):
            raise JudgeUnreadable("judge_unparseable", 'the judge\'s JSON has no string "label"')
        candidate = parsed["label"]
    else:
        candidate = body
    found = _match_label(candidate, labels)
    if found is None:
        raise JudgeUnreadable("judge_unparseable", f"the judge's answer {_clip(text)!r} is none "
                              f"of the labels {labels}")
    return found


def _match_label(candidate: str, labels: list[str]) -> str | None:
    if candidate in labels:
        return candidate
    bare = candidate.strip(_LABEL_WRAPPING).casefold()
    matches = [label for label in labels if label.strip(_LABEL_WRAPPING).casefold() == bare]
    return matches[0] if len(matches) == 1 else None


def read_score(text: str, score_range: list[float]) -> tuple[float, str | None]:
    """The score in ``text`` (a JSON ``{"score": x}`` or a lone number) and the judge's reason
    if it gave one. Raises JudgeUnreadable (judge_unparseable, judge_out_of_range)."""
    body = _unfence(text)
    parsed = _json_or_cut(body, _CUT_SCORE, "score")
    if parsed is None:
        raise JudgeUnreadable("judge_unparseable", f"the judge's answer {_clip(text)!r} is "
                              'neither {"score": number} nor a number')
    reason = None
    if isinstance(parsed, dict):
        reason = parsed.get("reason") if isinstance(parsed.get("reason"), str) else None
        parsed = parsed.get("score")
    if isinstance(parsed, bool) or not isinstance(parsed, (int, float)) \
            or not math.isfinite(parsed):
        raise JudgeUnreadable("judge_unparseable", f"the judge's answer {_clip(text)!r} has no "
                              "finite number as its score")
    low, high = score_range
    if not low <= parsed <= high:
        raise JudgeUnreadable("judge_out_of_range", f"the judge's score {parsed:g} is outside "
                              f"the range [{low:g}, {high:g}]")
    return float(parsed), reason


def _clip(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[:limit] + "…"
