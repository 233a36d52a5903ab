"""Templates: ``{{ item.answer }}`` and ``{{ sample.output_text }}`` in grader fields.

OpenAI's graders substitute ``{{ namespace.path }}`` with values of two namespaces, ``item`` (the
data row) and ``sample`` (the model's answer). We render with Jinja2's
``ImmutableSandboxedEnvironment`` and narrow it further, because a tenant writes the template and
a worker renders it:

* A template is checked once, when the grader is validated: only the constructs listed in
  :data:`ALLOWED_FILTERS`, :data:`ALLOWED_TESTS` and :func:`_check_node` (paths, ``if``, a few
  filters, comparisons) are accepted; no loops, calls, arithmetic or other names, so rendering
  costs at most the size of the template times the size of the data, and no template reaches a
  Python object's attributes (lookups are data-only: a dict's keys, a list's positions).
* A missing value is an error (``StrictUndefined``), never an empty string: the item is graded as
  errored with code ``template_missing_value``. Guard optional fields with
  ``{% if item.x is defined %}`` or ``{{ item.x | default("") }}``.
* Values render as text: strings as they are, ``None`` as an empty string, everything else
  (dicts, lists, numbers, booleans) as JSON. OpenAI does not document how it renders null or
  structured values; JSON is what a model or a string comparison can read back.
* The rendered text is capped at :data:`MAX_RENDERED_CHARS` (code ``template_output_too_large``).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from typing import Any

from jinja2 import StrictUndefined, TemplateSyntaxError, UndefinedError, nodes
from jinja2.runtime import Undefined
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import GraderError, TemplateMissing

MAX_TEMPLATE_CHARS = 64 * 1024  # one template field, before rendering
MAX_RENDERED_CHARS = 128 * 1024  # one rendered field (about 32k tokens of English)
NAMESPACES = ("item", "sample")
ALLOWED_FILTERS = frozenset({
    "default", "d", "lower", "upper", "trim", "capitalize", "title", "length", "count",
    "first", "last", "join", "int", "float", "round", "abs",
})
ALLOWED_TESTS = frozenset({
    "defined", "undefined", "none", "number", "string", "mapping", "sequence", "boolean",
    "true", "false", "integer", "float", "eq", "ne", "lt", "le", "gt", "ge", "in",
})
MAX_JOIN_SEPARATOR = 16  # characters: a join may not multiply a long list by a long literal
_ALLOWED_NODES = (
    nodes.Template, nodes.Output, nodes.TemplateData, nodes.Const, nodes.Name, nodes.Getattr,
    nodes.Getitem, nodes.Filter, nodes.Test, nodes.If, nodes.CondExpr, nodes.Compare,
    nodes.Operand, nodes.And, nodes.Or, nodes.Not, nodes.Neg,
)


class _DataOnlyEnvironment(ImmutableSandboxedEnvironment):
    """``a.b`` and ``a[b]`` look up a dict's key or a list's position, nothing else: no method,
    no attribute, so ``item.keys`` or ``item.__class__`` is a missing value, never an object."""

    def getattr(self, obj: Any, attribute: str) -> Any:
        return self._lookup(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        return self._lookup(obj, argument)

    def _lookup(self, obj: Any, key: Any) -> Any:
        if isinstance(obj, Mapping):
            found = isinstance(key, str) and key in obj
        else:
            found = isinstance(obj, (list, tuple)) and isinstance(key, int) \
                and not isinstance(key, bool) and -len(obj) <= key < len(obj)
        return obj[key] if found else self.undefined(obj=obj, name=key)


def _finalize(value: Any) -> Any:
    if isinstance(value, Undefined):
        return value  # StrictUndefined raises when it is turned into text
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False)


_ENV = _DataOnlyEnvironment(undefined=StrictUndefined, autoescape=False, finalize=_finalize,
                            keep_trailing_newline=True)
_ENV.globals.clear()  # no range(), lipsum(), dict(), namespace(): only item and sample


@functools.lru_cache(maxsize=512)
def _compile(source: str) -> tuple[Any, tuple[tuple[str, tuple], ...]]:
    """Checks and compiles one template; returns it with the literal paths it reads, in order
    (for naming the missing one). Raises GraderError without a param (the caller adds it)."""
    if len(source) > MAX_TEMPLATE_CHARS:
        raise GraderError("limit_exceeded",
                          f"a template may be at most {MAX_TEMPLATE_CHARS} characters long "
                          f"(this one has {len(source)})")
    try:
        tree = _ENV.parse(source)
    except TemplateSyntaxError as exc:
        raise GraderError("template_syntax_error",
                          f"template syntax error on line {exc.lineno}: {exc.message}") from None
    paths: list[tuple[str, tuple]] = []
    _check_node(tree, paths)
    return _ENV.from_string(tree), tuple(paths)


def _path_of(node: nodes.Node) -> tuple[str, tuple] | None:
    """``item.a[0].b`` as ("item", ("a", 0, "b")), or None when a step is not a literal."""
    steps: list[Any] = []
    while True:
        if isinstance(node, nodes.Getattr):
            steps.append(node.attr)
        elif isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Const):
            steps.append(node.arg.value)
        elif isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Neg) \
                and isinstance(node.arg.node, nodes.Const):
            steps.append(-node.arg.node.value)
        elif isinstance(node, nodes.Name):
            return node.name, tuple(reversed(steps))
        else:
            return None
        node = node.node


def _check_node(node: nodes.Node, paths: list) -> None:
    def refuse(what: str) -> GraderError:
        return GraderError("template_unsupported",
                           f"line {node.lineno}: {what} is not allowed in a grader template; use "
                           f"{{{{ item.path }}}}, {{{{ sample.path }}}}, if/else, comparisons "
                           f"and the filters {', '.join(sorted(ALLOWED_FILTERS))}")

    if not isinstance(node, _ALLOWED_NODES):
        raise refuse(f"'{type(node).__name__}'")
    if isinstance(node, nodes.Name):
        if node.name not in NAMESPACES:
            raise refuse(f"the name '{node.name}' (only item and sample exist)")
    elif isinstance(node, (nodes.Getattr, nodes.Getitem)):
        key = node.attr if isinstance(node, nodes.Getattr) else getattr(node.arg, "value", None)
        if isinstance(key, str) and key.startswith("_"):
            raise refuse(f"the name '{key}' (names starting with _ are reserved)")
        if not isinstance(node.node, (nodes.Name, nodes.Getattr, nodes.Getitem)):
            raise refuse("a lookup in something other than item or sample")
    elif isinstance(node, (nodes.Filter, nodes.Test)):
        allowed = ALLOWED_FILTERS if isinstance(node, nodes.Filter) else ALLOWED_TESTS
        kind = "filter" if isinstance(node, nodes.Filter) else "test"
        if node.name not in allowed:
            raise refuse(f"the {kind} '{node.name}'")
        if node.kwargs or node.dyn_args or node.dyn_kwargs:
            raise refuse(f"a keyword argument to the {kind} '{node.name}'")
        if kind == "filter" and not all(isinstance(arg, nodes.Const) for arg in node.args):
            raise refuse(f"an argument to the filter '{node.name}' that is not a literal")
        if node.name == "join" and node.args and len(str(node.args[0].value)) > MAX_JOIN_SEPARATOR:
            raise refuse(f"a join separator longer than {MAX_JOIN_SEPARATOR} characters")
    elif isinstance(node, nodes.Neg) and not isinstance(node.node, nodes.Const):
        raise refuse("arithmetic")
    if isinstance(node, (nodes.Getattr, nodes.Getitem)):
        path = _path_of(node)
        if path is not None:
            paths.append(path)
    for child in node.iter_child_nodes():
        _check_node(child, paths)


def check_template(source: Any, param: str) -> str:
    """The template if it is a string that compiles under our rules; GraderError naming
    ``param`` otherwise (used by validate for every template field)."""
    if not isinstance(source, str):
        raise GraderError("invalid_type", "must be a string (a template)", param)
    try:
        _compile(source)
    except GraderError as exc:
        raise GraderError(exc.code, exc.message, param) from None
    return source


def render(template: str, *, item: dict, sample: dict | None, param: str | None = None) -> str:
    """Renders ``template`` with the ``item`` and ``sample`` namespaces (``sample`` None: the
    grader was given no sample, and a template that reads it is missing a value).

    Raises TemplateMissing (code ``template_missing_value``) for a value the data does not have,
    GraderError ``template_output_too_large`` past MAX_RENDERED_CHARS, and the validation errors
    of a template that was never validated. ``param`` names the field in those errors.
    """
    try:
        compiled, paths = _compile(template)
    except GraderError as exc:
        raise GraderError(exc.code, exc.message, param) from None
    context = {"item": item} if sample is None else {"item": item, "sample": sample}
    pieces: list[str] = []
    size = 0
    try:
        for piece in compiled.generate(context):
            size += len(piece)
            if size > MAX_RENDERED_CHARS:
                raise GraderError("template_output_too_large",
                                  f"the rendered text is longer than {MAX_RENDERED_CHARS} "
                                  "characters", param)
            pieces.append(piece)
    except UndefinedError as exc:
        raise TemplateMissing(_missing_message(paths, context, exc), param) from None
    except GraderError:
        raise
    except (TypeError, ValueError, OverflowError) as exc:  # e.g. int("x") in a filter
        raise GraderError("template_render_error", f"the template failed on this item: {exc}",
                          param) from None
    return "".join(pieces)


def _missing_message(paths: tuple, context: dict, exc: UndefinedError) -> str:
    for namespace, steps in paths:
        value: Any = context.get(namespace, _MISSING)
        shown = namespace
        if value is _MISSING:
            return (f"{namespace} is missing: this grader was given no {namespace} "
                    f"(the template reads {_show(namespace, steps)})")
        for step in steps:
            value = _ENV._lookup(value, step)
            shown += f"[{step}]" if isinstance(step, int) else f".{step}"
            if isinstance(value, Undefined):
                return f"{shown} is missing from this {namespace}"
    return f"a value the template reads is missing ({exc.message})"


def _show(namespace: str, steps: tuple) -> str:
    return namespace + "".join(f"[{s}]" if isinstance(s, int) else f".{s}" for s in steps)


_MISSING = object()


def parse_json(text: str) -> Any:
    """``json.loads`` that fails with ValueError only (nesting too deep is a RecursionError
    in the standard library: a hostile answer must not crash a grader)."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("the JSON is nested too deeply") from None


def sample_namespace(output_text: str, *, choices: list | None = None,
                     finish_reason: str | None = None) -> dict:
    """The ``sample`` the templates see, from one model answer: ``output_text``,
    ``output_json`` (the answer parsed when it is valid JSON, else None), ``choices`` (the
    chat-completion choices; one built from the answer when not given) and ``finish_reason``."""
    try:
        output_json = parse_json(output_text)
    except ValueError:
        output_json = None
    if choices is None:
        choices = [{"index": 0, "finish_reason": finish_reason,
                    "message": {"role": "assistant", "content": output_text}}]
    return {"output_text": output_text, "output_json": output_json, "choices": choices,
            "finish_reason": finish_reason}

