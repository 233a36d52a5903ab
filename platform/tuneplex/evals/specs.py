"""What an eval and a run may say, checked field by field: each refusal is a 400 naming the field
(``param``) with its own code, before anything is stored. Pure functions over the request's JSON.

Supported, in OpenAI's shapes: a ``custom`` data source config; testing criteria of the graders
in :mod:`jobs.grading`; runs with a ``jsonl`` source (samples already made) or a ``completions``
source (a model answers a message template per item), items given inline (``file_content``) or
in an uploaded file (``file_id``). Not supported: ``logs``/``stored_completions``/``responses``
sources (this platform keeps no completion logs), image and audio inputs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError

import jobs.grading as grading
from jobs.grading.templates import check_template
from tuneplex.core.errors import ApiError

MAX_CRITERIA = 16
MAX_TEMPLATE_MESSAGES = 32
MAX_METADATA_KEYS, MAX_METADATA_KEY, MAX_METADATA_VALUE = 16, 64, 512
SAMPLING_PARAMS = {"temperature": (float, 0, 2), "top_p": (float, 0, 1),
                   "seed": (int, -(2**63), 2**63 - 1), "max_completion_tokens": (int, 1, None)}
ROLES = {"system", "developer", "user", "assistant"}


def _invalid(message: str, param: str, code: str = "invalid_value") -> ApiError:
    return ApiError(message, code=code, param=param)


def _object(value: Any, param: str) -> dict:
    if not isinstance(value, dict):
        raise _invalid(f"{param} must be an object.", param, "invalid_type")
    return value


def grader(spec: Any, param: str) -> dict:
    """A grader checked by jobs.grading, its error a 400 whose param is the field under ``param``."""
    try:
        return grading.validate(_object(spec, param))
    except grading.GraderError as exc:
        raise ApiError(exc.message, code=exc.code,
                       param=f"{param}.{exc.param}" if exc.param else param) from None


def metadata(value: Any, param: str = "metadata") -> dict[str, str]:
    """OpenAI's metadata: at most 16 pairs of strings (keys up to 64, values up to 512 chars)."""
    if value is None:
        return {}
    value = _object(value, param)
    if len(value) > MAX_METADATA_KEYS:
        raise _invalid(f"{param} holds at most {MAX_METADATA_KEYS} pairs.", param)
    for key, item in value.items():
        if len(key) > MAX_METADATA_KEY or not isinstance(item, str) or len(item) > MAX_METADATA_VALUE:
            raise _invalid(f"{param} maps keys of up to {MAX_METADATA_KEY} characters to strings "
                           f"of up to {MAX_METADATA_VALUE}.", f"{param}.{key}")
    return value


# --- the eval --------------------------------------------------------------------------------------

def data_source_config(value: Any) -> dict:
    """The stored form: type custom, item_schema (a valid JSON schema), include_sample_schema."""
    param = "data_source_config"
    value = _object(value, param)
    kind = value.get("type")
    if kind in ("logs", "stored_completions"):
        raise _invalid(f"data_source_config of type {kind!r} needs stored completion logs, which "
                       "this platform does not keep; use type 'custom'.", f"{param}.type",
                       "unsupported_data_source")
    if kind != "custom":
        raise _invalid("data_source_config.type must be 'custom'.", f"{param}.type")
    schema = _object(value.get("item_schema"), f"{param}.item_schema")
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as exc:
        raise _invalid(f"item_schema is not a valid JSON schema: {exc.message}",
                       f"{param}.item_schema", "invalid_schema") from None
    include = value.get("include_sample_schema", False)
    if not isinstance(include, bool):
        raise _invalid("include_sample_schema must be true or false.",
                       f"{param}.include_sample_schema", "invalid_type")
    return {"type": "custom", "item_schema": schema, "include_sample_schema": include}


SAMPLE_SCHEMA = {"type": "object", "properties": {
    "model": {"type": "string"}, "choices": {"type": "array"}, "output_text": {"type": "string"},
    "output_json": {}, "finish_reason": {"type": "string"}}, "required": ["output_text"]}


def shown_data_source_config(stored: dict) -> dict:
    """As OpenAI shows it: the whole schema the templates see (item, and sample if asked)."""
    properties = {"item": stored["item_schema"]}
    if stored["include_sample_schema"]:
        properties["sample"] = SAMPLE_SCHEMA
    return {"type": "custom", "schema": {"type": "object", "properties": properties,
                                         "required": list(properties)}}


def testing_criteria(value: Any) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise _invalid("testing_criteria must be a non-empty list of graders.", "testing_criteria",
                       "invalid_type")
    if len(value) > MAX_CRITERIA:
        raise _invalid(f"An eval has at most {MAX_CRITERIA} testing criteria.", "testing_criteria")
    criteria, names = [], set()
    for index, spec in enumerate(value):
        param = f"testing_criteria[{index}]"
        criterion = grader(spec, param)
        if criterion["name"] in names:
            raise _invalid(f"Two testing criteria are named {criterion['name']!r}; each needs its "
                           "own name (the results are reported by name).", f"{param}.name",
                           "duplicate_name")
        names.add(criterion["name"])
        criteria.append(criterion)
    return criteria


def judge_models(criteria: list[dict]) -> list[tuple[str, str]]:
    """(model, param) of every criterion that asks a model."""
    return [(c["model"], f"testing_criteria[{i}].model") for i, c in enumerate(criteria) if "model" in c
            and c.get("type") in ("label_model", "score_model")]


# --- a run -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RunSource:
    """A run's data source, checked: its kind, model and template, and where its items are."""

    kind: str  # "jsonl" or "completions"
    stored: dict  # the data_source as stored and shown (inline items left out)
    model: str
    inline: list[dict] | None  # file_content's entries
    file_id: str | None


def run_source(value: Any) -> RunSource:
    param = "data_source"
    value = _object(value, param)
    kind = value.get("type")
    if kind == "responses":
        raise _invalid("A data source of type 'responses' reads stored responses, which this "
                       "platform does not keep; use 'completions' or 'jsonl'.", f"{param}.type",
                       "unsupported_data_source")
    if kind not in ("jsonl", "completions", "pairwise"):
        raise _invalid("data_source.type must be 'completions', 'jsonl' or 'pairwise'.",
                       f"{param}.type")
    source = _object(value.get("source"), f"{param}.source")
    inline, file_id = _items_source(source, f"{param}.source")
    stored: dict[str, Any] = {"type": kind, "source": (
        {"type": "file_id", "id": file_id} if file_id is not None
        else {"type": "file_content", "content": []})}
    model = ""
    if kind == "pairwise":
        models = value.get("models")
        if (not isinstance(models, list) or len(models) != 2
                or not all(isinstance(m, str) and m for m in models) or models[0] == models[1]):
            raise _invalid("A pairwise data source compares two different models: models is a "
                           "list of their two names.", f"{param}.models", "invalid_type")
        stored["models"] = models
        model = models[0]
        stored["input_messages"] = input_messages(value.get("input_messages"),
                                                  f"{param}.input_messages")
        stored["sampling_params"] = sampling_params(value.get("sampling_params"),
                                                    f"{param}.sampling_params")
        stored["judge"] = pairwise_judge(value.get("judge"), f"{param}.judge")
    elif kind == "completions":
        model = value.get("model")
        if not isinstance(model, str) or not model:
            raise _invalid("A completions data source needs the model that answers.",
                           f"{param}.model", "invalid_type")
        stored["model"] = model
        stored["input_messages"] = input_messages(value.get("input_messages"),
                                                  f"{param}.input_messages")
        stored["sampling_params"] = sampling_params(value.get("sampling_params"),
                                                    f"{param}.sampling_params")
    elif value.get("model") is not None or value.get("input_messages") is not None:
        raise _invalid("A jsonl data source carries its samples: it takes no model or "
                       "input_messages.", f"{param}.type")
    return RunSource(kind, stored, model, inline, file_id)


def _items_source(source: dict, param: str) -> tuple[list[dict] | None, str | None]:
    kind = source.get("type")
    if kind == "file_content":
        content = source.get("content")
        if not isinstance(content, list) or not content:
            raise _invalid("file_content needs a non-empty content list of {item, sample?}.",
                           f"{param}.content", "invalid_type")
        if len(content) > settings.EVAL_MAX_ITEMS:
            raise _invalid(f"A run has at most {settings.EVAL_MAX_ITEMS} items "
                           "(TUNEPLEX_EVAL_MAX_ITEMS).", f"{param}.content", "too_many_items")
        return content, None
    if kind == "file_id":
        file_id = source.get("id")
        if not isinstance(file_id, str) or not file_id:
            raise _invalid("file_id needs the id of an uploaded file.", f"{param}.id", "invalid_type")
        return None, file_id
    if kind == "stored_completions":
        raise _invalid("stored_completions needs completion logs, which this platform does not "
                       "keep.", f"{param}.type", "unsupported_data_source")
    raise _invalid("source.type must be 'file_content' or 'file_id'.", f"{param}.type")


VERDICTS = ["first", "second", "tie"]


def pairwise_judge(value: Any, param: str) -> dict:
    """The judge of a pairwise run: a model and its messages, which read the item and the two
    answers as ``{{sample.first.output_text}}`` and ``{{sample.second.output_text}}``. Stored as
    the label grader it is (labels first, second, tie): each item is judged twice, the answers
    in both orders, so that a judge that prefers a position decides nothing."""
    value = _object(value, param)
    spec = {"type": "label_model", "name": "pairwise", "model": value.get("model"),
            "input": value.get("input"), "labels": VERDICTS, "passing_labels": ["first"]}
    unknown = set(value) - {"model", "input", "sampling_params"}
    if unknown:
        raise _invalid(f"A pairwise judge takes model, input and sampling_params, not "
                       f"{', '.join(sorted(unknown))}.", f"{param}.{sorted(unknown)[0]}",
                       "unknown_parameter")
    spec = grader(spec, param)
    given = dict(value.get("sampling_params") or {}) if isinstance(
        value.get("sampling_params"), dict) else value.get("sampling_params")
    if isinstance(given, dict) and "max_completions_tokens" in given:  # the graders' spelling
        given["max_completion_tokens"] = given.pop("max_completions_tokens")
    params = sampling_params(given, f"{param}.sampling_params")
    params.pop("response_format", None)  # the verdict's own format is asked for
    if "max_completion_tokens" in params:
        params["max_completions_tokens"] = params.pop("max_completion_tokens")
    return {**spec, "sampling_params": params}


def judge_models_of_source(stored: dict) -> list[tuple[str, str]]:
    """(model, param) of every model a run's source asks besides its own."""
    if stored["type"] != "pairwise":
        return []
    return [(stored["models"][1], "data_source.models[1]"),
            (stored["judge"]["model"], "data_source.judge.model")]


def input_messages(value: Any, param: str) -> dict:
    value = _object(value, param)
    kind = value.get("type")
    if kind == "item_reference":
        reference = value.get("item_reference")
        if not isinstance(reference, str) or not reference.startswith("item."):
            raise _invalid("item_reference names a field of the item holding chat messages, "
                           "such as 'item.messages'.", f"{param}.item_reference")
        return {"type": "item_reference", "item_reference": reference}
    if kind != "template":
        raise _invalid("input_messages.type must be 'template' or 'item_reference'.", f"{param}.type")
    template = value.get("template")
    if not isinstance(template, list) or not template or len(template) > MAX_TEMPLATE_MESSAGES:
        raise _invalid(f"template must be a list of 1 to {MAX_TEMPLATE_MESSAGES} messages.",
                       f"{param}.template", "invalid_type")
    messages = []
    for index, message in enumerate(template):
        where = f"{param}.template[{index}]"
        message = _object(message, where)
        role = message.get("role")
        if role not in ROLES:
            raise _invalid(f"role must be one of {', '.join(sorted(ROLES))}.", f"{where}.role")
        content = message_text(message.get("content"), f"{where}.content")
        try:
            check_template(content, f"{where}.content")
        except grading.GraderError as exc:
            raise _invalid(exc.message, f"{where}.content", exc.code) from None
        messages.append({"role": role, "content": content})
    return {"type": "template", "template": messages}


def message_text(content: Any, param: str) -> str:
    """A template message's text: a string, or OpenAI's text content parts joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        content = [content]
    if isinstance(content, list):
        texts = []
        for index, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") not in ("input_text", "output_text"):
                raise _invalid("Only text content (a string, input_text or output_text) can be "
                               "sent to these models.", f"{param}[{index}]", "unsupported_content")
            if not isinstance(part.get("text"), str):
                raise _invalid("A text part needs its text.", f"{param}[{index}].text", "invalid_type")
            texts.append(part["text"])
        return "".join(texts)
    raise _invalid("content must be a string or a list of text parts.", param, "invalid_type")


def sampling_params(value: Any, param: str) -> dict:
    if value is None:
        return {}
    value = _object(value, param)
    params = {}
    for name, given in value.items():
        if name == "response_format":
            params[name] = _object(given, f"{param}.{name}")
            continue
        if name not in SAMPLING_PARAMS:
            raise _invalid(f"Unknown sampling parameter {name!r}; these are taken: "
                           f"{', '.join(sorted(SAMPLING_PARAMS) + ['response_format'])}.",
                           f"{param}.{name}", "unknown_parameter")
        kind, low, high = SAMPLING_PARAMS[name]
        if given is None:
            continue
        if isinstance(given, bool) or not isinstance(given, int if kind is int else (int, float)):
            raise _invalid(f"{name} must be a number{' (an integer)' if kind is int else ''}.",
                           f"{param}.{name}", "invalid_type")
        if given < low or (high is not None and given > high):
            raise _invalid(f"{name} must be between {low} and {high if high is not None else 'any'}.",
                           f"{param}.{name}")
        params[name] = given
    return params


def run_entry(entry: Any, *, kind: str, item_schema: dict, where: str) -> dict:
    """One line of a run's items, checked: {item} (and for jsonl, the sample already made)."""
    if not isinstance(entry, dict) or not isinstance(entry.get("item"), dict):
        raise _invalid("Each entry is an object with an 'item' object.", where, "invalid_item")
    item = entry["item"]
    error = next(Draft202012Validator(item_schema).iter_errors(item), None)
    if error is not None:
        path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path)
        raise _invalid(f"The item does not match the eval's item_schema at '{path or '.'}': "
                       f"{error.message}", f"{where}.item{path}", "item_schema_mismatch")
    line = {"item": item}
    if kind == "jsonl":
        line["sample"] = jsonl_sample(entry.get("sample"), f"{where}.sample")
    if len(json.dumps(line)) > settings.EVAL_MAX_ITEM_BYTES:
        raise _invalid(f"An entry is at most {settings.EVAL_MAX_ITEM_BYTES} bytes of JSON "
                       "(TUNEPLEX_EVAL_MAX_ITEM_BYTES).", where, "item_too_large")
    return line


def jsonl_sample(sample: Any, param: str) -> dict:
    """A sample made elsewhere: its output_text, or OpenAI's ``output`` messages / ``choices``."""
    if not isinstance(sample, dict):
        raise _invalid("A jsonl data source's entries carry the sample to grade: an object with "
                       "output_text.", param, "missing_sample")
    text = sample.get("output_text")
    if text is None and isinstance(sample.get("output"), list) and sample["output"]:
        text = (sample["output"][-1] or {}).get("content")
    if text is None and isinstance(sample.get("choices"), list) and sample["choices"]:
        text = ((sample["choices"][0] or {}).get("message") or {}).get("content")
    if not isinstance(text, str):
        raise _invalid("The sample needs its text: output_text, output[-1].content or "
                       "choices[0].message.content.", f"{param}.output_text", "missing_sample")
    return {"output_text": text, "model": sample.get("model") if isinstance(sample.get("model"), str)
            else ""}
