"""JSON Schema (Draft 2020-12) checks for the ``json_check`` grader, with the ``jsonschema``
library, hardened for schemas a tenant writes and answers a model writes:

* ``pattern`` runs on the ``regex`` module with a time limit (Python's ``re`` has none, and a
  pattern such as ``(a+)+$`` takes forever on a long answer); past it the item is errored.
* ``patternProperties`` is refused: jsonschema matches it (and additional/unevaluated properties
  against it) with ``re`` inside the library, where no time limit can be set.
* References must point inside the schema (``#...``): nothing is fetched.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator
from typing import Any

import regex
from jsonschema import Draft202012Validator, ValidationError, validators
from jsonschema.exceptions import SchemaError, best_match

from .errors import GraderError

MAX_SCHEMA_CHARS = 64 * 1024  # the schema as JSON
PATTERN_TIMEOUT_S = 0.25  # one regular expression on one string
_MAX_MESSAGE_CHARS = 400


class PatternTimeout(Exception):
    """A schema's pattern ran past PATTERN_TIMEOUT_S on the answer."""


def _pattern(validator: Any, pattern: str, instance: Any, schema: dict) -> Iterator:
    if not validator.is_type(instance, "string"):
        return
    try:
        found = regex.search(pattern, instance, timeout=PATTERN_TIMEOUT_S)
    except TimeoutError:
        raise PatternTimeout(f"the pattern {pattern!r} ran longer than {PATTERN_TIMEOUT_S} s "
                             "on this answer") from None
    if not found:
        yield ValidationError(f"{_clip(repr(instance))} does not match {pattern!r}")


_Validator = validators.extend(Draft202012Validator, {"pattern": _pattern})


def check_schema(schema: Any, param: str = "schema") -> dict:
    """The schema if it is a valid Draft 2020-12 schema we can run; GraderError otherwise."""
    if not isinstance(schema, dict):
        raise GraderError("invalid_type", "must be a JSON Schema object", param)
    size = len(json.dumps(schema))
    if size > MAX_SCHEMA_CHARS:
        raise GraderError("limit_exceeded", f"the schema may be at most {MAX_SCHEMA_CHARS} "
                          f"characters as JSON (this one has {size})", param)
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as exc:
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in exc.path)
        raise GraderError("invalid_schema", f"not a valid JSON Schema (Draft 2020-12): "
                          f"{_clip(exc.message)}", param + where) from None
    _refuse_what_we_cannot_run(schema, param)
    return schema


def _refuse_what_we_cannot_run(node: Any, path: str) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            here = f"{path}.{key}"
            if key == "patternProperties":
                raise GraderError("invalid_schema", "patternProperties is not supported (its "
                                  "regular expressions cannot be given a time limit); list the "
                                  "properties, or use propertyNames with a pattern", here)
            if key in ("$ref", "$dynamicRef") and isinstance(value, str) \
                    and not value.startswith("#"):
                raise GraderError("invalid_schema", f"{key} must point inside the schema "
                                  f"(start with '#'); {value!r} would be fetched", here)
            if key == "pattern" and isinstance(value, str):
                try:
                    regex.compile(value)
                except regex.error as exc:
                    raise GraderError("invalid_schema", f"not a valid regular expression: "
                                      f"{exc}", here) from None
            _refuse_what_we_cannot_run(value, here)
    elif isinstance(node, list):
        for index, value in enumerate(node):
            _refuse_what_we_cannot_run(value, f"{path}[{index}]")


@functools.lru_cache(maxsize=128)
def _validator(schema_json: str) -> Any:
    return _Validator(json.loads(schema_json))


def schema_failure(instance: Any, schema: dict) -> str | None:
    """None when ``instance`` satisfies ``schema``, else the most relevant failure as
    ``$.path: message``. Raises PatternTimeout (the item cannot be graded)."""
    validator = _validator(json.dumps(schema, sort_keys=True))
    error = best_match(validator.iter_errors(instance))
    if error is None:
        return None
    return f"{error.json_path}: {_clip(error.message)}"


def _clip(text: str) -> str:
    return text if len(text) <= _MAX_MESSAGE_CHARS else text[:_MAX_MESSAGE_CHARS] + "…"
