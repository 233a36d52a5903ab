"""The eval pages' two forms, read into the services' arguments, and their errors placed.

* The new-eval form: a name, the item schema (blank: any object) and the testing criteria, made
  in an editor (one block per grader, showing that grader's fields) or pasted as JSON.
* The start-a-run form: who answers (a model with a message template and sampling settings, or
  answers made elsewhere that each line carries), and the items (pasted JSONL or a file).

Nothing here checks what the services check: a field that is not even a number or JSON is
refused here, everything else by the service, whose ``ApiError.param`` is mapped back to the form
field it names (:func:`eval_errors`, :func:`run_errors`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from jobs.grading import metrics
from jobs.grading.spec import STRING_OPERATIONS
from tuneplex.core.errors import ApiError

GRADER_TYPES = {  # type → (label, what it does)
    "string_check": ("String check", ("The input compared with a reference: equal, not equal, "
                                      "contains, or contains ignoring case.")),
    "text_similarity": ("Text similarity", ("A fuzzy, BLEU, GLEU or ROUGE score of the input "
                                            "against a reference; passes at the threshold.")),
    "json_check": ("JSON check", "The input is valid JSON, and matches a JSON schema if given."),
    "label_model": ("Label by a judge model", ("A judge model picks one of the labels; some "
                                               "labels pass.")),
    "score_model": ("Score by a judge model", ("A judge model gives a score within a range; "
                                               "it passes at the threshold.")),
}
MODEL_GRADERS = ("label_model", "score_model")
# The editor's fields of each grader type, in the order the block shows them.
GRADER_FIELDS: dict[str, tuple[str, ...]] = {
    "string_check": ("input", "operation", "reference"),
    "text_similarity": ("input", "reference", "evaluation_metric", "pass_threshold"),
    "json_check": ("input", "schema", "pass_threshold"),
    "label_model": ("model", "system", "prompt", "labels", "passing_labels"),
    "score_model": ("model", "system", "prompt", "range", "pass_threshold"),
}
OPERATIONS = {"eq": "equals", "ne": "does not equal", "like": "contains",
              "ilike": "contains, ignoring case"}
assert tuple(OPERATIONS) == STRING_OPERATIONS
METRICS = metrics.SUPPORTED
DEFAULT_INPUT = "{{ sample.output_text }}"
DEFAULT_REFERENCE = "{{ item.expected }}"
JUDGE_PROMPT = ("Question: {{ item.input }}\nReference answer: {{ item.expected }}\n"
                "Answer to judge: {{ sample.output_text }}")
DEFAULTS: dict[str, dict[str, str]] = {
    "string_check": {"input": DEFAULT_INPUT, "reference": DEFAULT_REFERENCE, "operation": "eq"},
    "text_similarity": {"input": DEFAULT_INPUT, "reference": DEFAULT_REFERENCE,
                        "evaluation_metric": "fuzzy_match", "pass_threshold": "0.8"},
    "json_check": {"input": DEFAULT_INPUT, "schema": "", "pass_threshold": ""},
    "label_model": {"system": "Does the answer say the same as the reference answer? Answer "
                              "with one label: correct or incorrect.",
                    "prompt": JUDGE_PROMPT, "labels": "correct, incorrect",
                    "passing_labels": "correct"},
    "score_model": {"system": "Score how well the answer matches the reference answer, from 0 "
                              "(wrong) to 1 (the same).",
                    "prompt": JUDGE_PROMPT, "range_low": "0", "range_high": "1",
                    "pass_threshold": "0.5"},
}
MAX_EDITOR_CRITERIA = 16  # specs.MAX_CRITERIA
ANY_OBJECT = {"type": "object"}
DEFAULT_TEMPLATE = "{{ item.input }}"
_NUMBER = "Enter a number."
_PARAM = re.compile(r"^testing_criteria\[(\d+)\](?:\.(.*))?$")
_HEAD = re.compile(r"^([A-Za-z_]+)(?:\[(\d+)\])?")


def _inputs(values) -> dict[str, str]:
    """The posted fields as one string each (a QueryDict or a plain dict)."""
    return {key: values.get(key) for key in values}


# --- the criteria editor ---------------------------------------------------------------------------

@dataclass
class CriterionBlock:
    """One grader in the editor: its index, type, the values its fields show, and its errors."""

    index: int
    type: str
    values: dict[str, str]
    errors: dict[str, str] = field(default_factory=dict)
    messages: dict[int, str] = field(default_factory=dict)  # input message index → field

    @property
    def fields(self) -> tuple[str, ...]:
        return GRADER_FIELDS[self.type]

    @property
    def prefix(self) -> str:
        """Its fields' names start with this (c0-type, c0-name, ...)."""
        return f"c{self.index}-"


def new_block(index: int, kind: str = "string_check", *, model: str = "") -> CriterionBlock:
    values = {"name": "exact match" if index == 0 else f"criterion {index + 1}",
              **DEFAULTS[kind]}
    if kind in MODEL_GRADERS:
        values["model"] = model
    return CriterionBlock(index, kind, values)


def editor_blocks(post, *, model: str = "") -> list[CriterionBlock]:
    """The editor's blocks as posted; a block whose type was changed gets the new type's
    defaults in the fields it had not shown (what was typed in shared fields is kept)."""
    data = _inputs(post)
    try:
        count = min(max(int(data.get("criteria_count") or 1), 0), MAX_EDITOR_CRITERIA)
    except ValueError:
        count = 1
    blocks = []
    for index in range(count):
        kind = data.get(f"c{index}-type") or "string_check"
        kind = kind if kind in GRADER_TYPES else "string_check"
        defaults = new_block(index, kind, model=model).values
        values = {}
        for key, default in defaults.items():
            posted = data.get(f"c{index}-{key}")
            values[key] = default if posted is None else posted
        blocks.append(CriterionBlock(index, kind, values))
    return blocks


def edit(blocks: list[CriterionBlock], action: str, *, model: str = "") -> list[CriterionBlock]:
    """The editor after one of its buttons: ``add`` a block, ``remove-<i>`` one (or ``refresh``
    after a type was changed: the blocks as read already show the new type)."""
    if action == "add" and len(blocks) < MAX_EDITOR_CRITERIA:
        return [*blocks, new_block(len(blocks), model=model)]
    if action.startswith("remove-") and len(blocks) > 1:
        gone = action.removeprefix("remove-")
        kept = [b for b in blocks if str(b.index) != gone]
        return [CriterionBlock(i, b.type, b.values) for i, b in enumerate(kept)]
    return blocks


def _number(text: str, key: str, errors: dict[str, str]) -> float | None:
    text = (text or "").strip()
    if not text:
        return None
    try:
        return float(text)
    except ValueError:
        errors[key] = _NUMBER
        return None


def _json(text: str, key: str, errors: dict[str, str]):
    """The text's JSON value, or None with the error on ``key``."""
    try:
        return json.loads(text)
    except ValueError as exc:
        errors[key] = f"Not valid JSON: {exc}"
        return None


def block_spec(block: CriterionBlock) -> dict:
    """The grader spec the block says (its number and JSON fields parsed; errors on the block)."""
    v, errors = block.values, block.errors
    spec: dict = {"type": block.type, "name": v.get("name", "")}
    if block.type in MODEL_GRADERS:
        spec["model"] = v.get("model", "")
        spec["input"] = []
        if (v.get("system") or "").strip():
            block.messages[len(spec["input"])] = "system"
            spec["input"].append({"role": "system", "content": v["system"]})
        block.messages[len(spec["input"])] = "prompt"
        spec["input"].append({"role": "user", "content": v.get("prompt", "")})
    else:
        spec["input"] = v.get("input", "")
    if "reference" in block.fields:
        spec["reference"] = v.get("reference", "")
    if "operation" in block.fields:
        spec["operation"] = v.get("operation", "")
    if "evaluation_metric" in block.fields:
        spec["evaluation_metric"] = v.get("evaluation_metric", "")
    if block.type == "label_model":
        for key in ("labels", "passing_labels"):
            spec[key] = [label.strip() for label in (v.get(key) or "").split(",") if label.strip()]
    if "schema" in block.fields and (v.get("schema") or "").strip():
        spec["schema"] = _json(v["schema"], "schema", errors)
    if "range" in block.fields:
        low = _number(v.get("range_low", ""), "range", errors)
        high = _number(v.get("range_high", ""), "range", errors)
        if low is not None and high is not None:
            spec["range"] = [low, high]
    if "pass_threshold" in block.fields:
        threshold = _number(v.get("pass_threshold", ""), "pass_threshold", errors)
        if threshold is not None:
            spec["pass_threshold"] = threshold
    return spec


# --- the new-eval form -----------------------------------------------------------------------------

@dataclass
class EvalForm:
    """What the new-eval form says, and what is wrong with it so far (field → message; a
    block's own errors stay on the block)."""

    name: str
    item_schema: Any
    criteria: Any  # as given: the service says what is wrong with it
    blocks: list[CriterionBlock]
    pasted: bool  # the criteria came from the JSON box, not the editor
    errors: dict[str, str]

    @property
    def valid(self) -> bool:
        return not self.errors and not any(b.errors for b in self.blocks)

    def arguments(self) -> dict:
        return {"name": self.name, "testing_criteria": self.criteria, "data_source_config": {
            "type": "custom", "item_schema": self.item_schema, "include_sample_schema": True}}


def read_eval_form(post, *, model: str = "") -> EvalForm:
    errors: dict[str, str] = {}
    schema_text = (post.get("item_schema") or "").strip()
    item_schema = _json(schema_text, "item_schema", errors) if schema_text else dict(ANY_OBJECT)
    blocks = editor_blocks(post, model=model)
    pasted_text = (post.get("criteria_json") or "").strip()
    criteria = (_json(pasted_text, "criteria_json", errors) if pasted_text
                else [block_spec(block) for block in blocks])
    return EvalForm(name=(post.get("name") or "").strip(), item_schema=item_schema,
                    criteria=criteria, blocks=blocks, pasted=bool(pasted_text), errors=errors)


def place_eval_error(form: EvalForm, error: ApiError) -> None:
    """Put a service's refusal next to the field its ``param`` names."""
    param = error.param or ""
    if param == "name":
        form.errors["name"] = error.message
    elif param.startswith("data_source_config"):
        where = param.removeprefix("data_source_config.item_schema").lstrip(".")
        form.errors["item_schema"] = f"{where}: {error.message}" if where else error.message
    elif param.startswith("testing_criteria") and form.pasted:
        form.errors["criteria_json"] = f"{param}: {error.message}"
    elif (match := _PARAM.match(param)) and int(match[1]) < len(form.blocks):
        block = form.blocks[int(match[1])]
        rest = match[2] or ""
        where = _block_field(block, rest)
        # A path inside a field (labels[2], schema.properties.age) is said; a block-wide error
        # names what it is about.
        deeper = rest != where and (where in ("labels", "passing_labels", "schema") or
                                    where == "block" and rest)
        block.errors[where] = f"{rest}: {error.message}" if deeper else error.message
    elif param.startswith("testing_criteria"):
        form.errors["criteria"] = error.message
    else:
        form.errors["form"] = error.message


def _block_field(block: CriterionBlock, rest: str) -> str:
    """The editor field of a block that a param inside its grader names ("block": none)."""
    head = _HEAD.match(rest)
    if head is None:
        return "block"
    key, position = head[1], head[2]
    if key == "input" and block.type in MODEL_GRADERS:
        return block.messages.get(int(position), "prompt") if position else "prompt"
    if key in block.fields or key in ("name", "type"):
        return key
    return "block"


# --- the start-a-run form --------------------------------------------------------------------------

@dataclass
class RunForm:
    """What the start-a-run form says: the run's data source, or what is wrong with it."""

    values: dict[str, str]
    data_source: dict | None = None
    errors: dict[str, str] = field(default_factory=dict)
    pasted_lines: list[int] = field(default_factory=list)  # content index → line number

    @property
    def answers_given(self) -> bool:
        return self.values.get("source") == "answers"


def run_defaults(model: str) -> dict[str, str]:
    return {"source": "model", "model": model, "items_from": "paste", "items": "", "system": "",
            "prompt": DEFAULT_TEMPLATE, "temperature": "0", "max_tokens": "256", "name": ""}


def read_run_form(post, *, file_id: str | None) -> RunForm:
    """The form's data source; ``file_id``: the file chosen or just uploaded (items_from file)."""
    form = RunForm(values={**run_defaults(""), **_inputs(post)})
    v, errors = form.values, form.errors
    if v.get("items_from") == "file":
        if not file_id:
            errors.setdefault("file", "Choose a file of items, or upload one.")
        source = {"type": "file_id", "id": file_id or ""}
    else:
        content = []
        for number, line in enumerate((v.get("items") or "").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                content.append(json.loads(line))
            except ValueError as exc:
                errors["items"] = f"Line {number}: not valid JSON ({exc.msg})."
                break
            form.pasted_lines.append(number)
        if not content and "items" not in errors:
            errors["items"] = 'Paste at least one line, such as {"item": {"input": "2 + 2?", ' \
                              '"expected": "4"}}.'
        source = {"type": "file_content", "content": content}
    if form.answers_given:
        form.data_source = {"type": "jsonl", "source": source}
        return form
    template = []
    if (v.get("system") or "").strip():
        template.append({"role": "system", "content": v["system"]})
    template.append({"role": "user", "content": v.get("prompt") or ""})
    sampling: dict = {}
    temperature = _number(v.get("temperature", ""), "temperature", errors)
    if temperature is not None:
        sampling["temperature"] = temperature
    tokens = (v.get("max_tokens") or "").strip()
    if tokens:
        try:
            sampling["max_completion_tokens"] = int(tokens)
        except ValueError:
            errors["max_tokens"] = "Enter a whole number."
    form.data_source = {"type": "completions", "model": v.get("model") or "", "source": source,
                        "input_messages": {"type": "template", "template": template},
                        "sampling_params": sampling}
    return form


_RUN_FIELDS = {"data_source.model": "model", "data_source.source.id": "file", "file_id": "file",
               "data_source.sampling_params.temperature": "temperature",
               "data_source.sampling_params.max_completion_tokens": "max_tokens", "name": "name"}
_CONTENT = re.compile(r"^data_source\.source\.content\[(\d+)\]")
_TEMPLATE = re.compile(r"^data_source\.input_messages\.template\[(\d+)\]")


def place_run_error(form: RunForm, error: ApiError) -> None:
    """Put a service's refusal of the run next to the field its ``param`` names."""
    param = error.param or ""
    if param in _RUN_FIELDS:
        form.errors[_RUN_FIELDS[param]] = error.message
    elif match := _CONTENT.match(param):
        index = int(match[1])
        line = form.pasted_lines[index] if index < len(form.pasted_lines) else index + 1
        form.errors["items"] = f"Line {line}: {error.message}"
    elif param.startswith("data_source.source"):
        form.errors["file" if form.values.get("items_from") == "file" else "items"] = error.message
    elif match := _TEMPLATE.match(param):
        has_system = bool((form.values.get("system") or "").strip())
        form.errors["system" if has_system and match[1] == "0" else "prompt"] = error.message
    elif param.startswith("data_source.input_messages"):
        form.errors["prompt"] = error.message
    else:
        form.errors["form"] = error.message
