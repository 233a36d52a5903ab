"""Training data in JSONL: streaming validation and the one internal representation.

Pure Python (no torch): the platform validates uploads with it and the trainer reads examples
with it, so both agree on what a file means.

Formats, detected per file from its first valid line (one format per file):

========================  =====================================================================
chat                      ``{"messages": [{"role", "content", "weight"?}, ...]}``; roles system,
                          user, assistant; multi-turn; ``weight`` 0/1 on a message.
alpaca                    ``{"instruction", "input"?, "output", "system"?}``
prompt_completion         ``{"prompt", "completion"}``
text                      ``{"text"}``
preference                OpenAI's DPO format: ``{"input": {"messages": [...]},
                          "preferred_output": [{"role": "assistant", "content"}],
                          "non_preferred_output": [{"role": "assistant", "content"}]}``; the
                          input ends with a user message, each output is one assistant message.
========================  =====================================================================

Internal representation (:class:`Example`), what the trainer tokenizes:

* chat → ``chat`` messages as given. Loss on assistant messages (weight defaults to 1 for
  assistant turns, 0 for others; ``weight: 0`` on an assistant turn excludes it).
* alpaca → ``chat``: ``system`` (if any) as a system message; ``instruction`` followed by a blank
  line and ``input`` (if non-empty) as the user message; ``output`` as the assistant message.
* prompt_completion → ``raw`` segments: the prompt (no loss) then the completion (loss); no chat
  template is applied.
* text → ``raw``: one segment with loss on every token.
* preference → ``preference``: the input messages (no loss) and the two answers, ``chosen`` and
  ``rejected``; the DPO trainer scores each answer after the templated input.

Preference pairs have codes of their own (every one at its line): ``preference_missing_input``,
``preference_input_must_end_with_user``, ``preference_missing_output`` (a side absent or empty),
``preference_output_role`` (an output that is not exactly one assistant message),
``missing_content`` (an empty answer), ``preference_identical_outputs``. A pair too long after
the chat template (``preference_too_long``) needs the model's tokenizer: the file's statistics
report it, with its line (:mod:`jobs.training.dataset_stats`).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO, Any

CHAT, ALPACA, PROMPT_COMPLETION, TEXT = "chat", "alpaca", "prompt_completion", "text"
PREFERENCE = "preference"
PREFERENCE_SIDES = ("preferred_output", "non_preferred_output")
ROLES = frozenset({"system", "user", "assistant"})
MESSAGE_KEYS = frozenset({"role", "content", "weight", "name"})
MIN_EXAMPLES = 10
DEFAULT_MAX_LINE_BYTES = 8 * 2**20
MAX_REPORTED_ERRORS = 50
_BOM = b"\xef\xbb\xbf"
_CHUNK = 1 << 20


@dataclass
class Problem:
    code: str
    message: str
    line: int | None
    param: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "line": self.line, "param": self.param}


@dataclass
class ValidationReport:
    format: str | None = None
    lines: int = 0
    examples: int = 0
    longest_line_bytes: int = 0
    errors: list[Problem] = field(default_factory=list)
    error_counts: Counter = field(default_factory=Counter)

    @property
    def ok(self) -> bool:
        return not self.error_counts

    def add(self, problem: Problem) -> None:
        self.error_counts[problem.code] += 1
        if len(self.errors) < MAX_REPORTED_ERRORS:
            self.errors.append(problem)

    def as_dict(self) -> dict[str, Any]:
        return {
            "valid": self.ok,
            "format": self.format,
            "lines": self.lines,
            "examples": self.examples,
            "longest_line_bytes": self.longest_line_bytes,
            "error_count": sum(self.error_counts.values()),
            "error_counts": dict(sorted(self.error_counts.items())),
            "errors": [problem.as_dict() for problem in self.errors],
        }


class LineError(Exception):
    def __init__(self, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.param = code, message, param


# --- per-format checks: raise LineError, or return the format -------------------------------------


def _require_string(record: dict, key: str, *, allow_empty: bool = False) -> None:
    value = record[key]
    if not isinstance(value, str):
        raise LineError("data_type", f"'{key}' must be a string, not {_type_name(value)}.", key)
    if not allow_empty and not value.strip():
        raise LineError("missing_content", f"'{key}' is empty.", key)


def _check_chat(record: dict) -> None:
    messages = record["messages"]
    if not isinstance(messages, list):
        raise LineError("missing_messages_list",
                        f"'messages' must be a list of messages, not {_type_name(messages)}.",
                        "messages")
    if not messages:
        raise LineError("missing_messages_list", "'messages' is an empty list.", "messages")
    if not _check_messages(messages, "messages"):
        raise LineError("example_missing_assistant_message",
                        "The example has no assistant message to learn from.", "messages")


def _check_messages(messages: list, path: str) -> bool:
    """Each message's keys, role and content; returns whether there is an assistant message."""
    has_assistant = False
    for index, message in enumerate(messages):
        where = f"{path}[{index}]"
        if not isinstance(message, dict):
            raise LineError("data_type", f"{where} must be an object, not {_type_name(message)}.",
                            where)
        if "role" not in message:
            raise LineError("message_missing_key", f"{where} has no 'role'.", f"{where}.role")
        unknown = message.keys() - MESSAGE_KEYS
        if unknown:
            name = sorted(unknown)[0]
            raise LineError("message_unrecognized_key",
                            f"{where} has an unrecognized key '{name}' (allowed: role, content, "
                            "weight, name).", f"{where}.{name}")
        role = message["role"]
        if not isinstance(role, str) or role not in ROLES:  # a dict or list is unhashable
            raise LineError("unrecognized_role",
                            f"{where}.role is {role!r}; use system, user or assistant.",
                            f"{where}.role")
        content = message.get("content")
        if content is None:
            raise LineError("missing_content", f"{where} has no content.", f"{where}.content")
        if not isinstance(content, str):
            raise LineError("data_type",
                            f"{where}.content must be a string, not {_type_name(content)}.",
                            f"{where}.content")
        if role == "assistant" and not content.strip():
            raise LineError("missing_content", f"{where} is an empty assistant message.",
                            f"{where}.content")
        weight = message.get("weight", 1)
        if weight not in (0, 1) or isinstance(weight, bool):
            raise LineError("data_type", f"{where}.weight must be 0 or 1.", f"{where}.weight")
        if role == "assistant":
            has_assistant = True
    return has_assistant


def _check_preference(record: dict) -> None:
    """OpenAI's DPO pair: a prompt (input.messages, ending with the user's turn) and two
    different one-message assistant answers."""
    prompt = record.get("input")
    messages = prompt.get("messages") if isinstance(prompt, dict) else None
    if not isinstance(messages, list) or not messages:
        raise LineError("preference_missing_input",
                        "A preference pair needs 'input': {'messages': [...]} with at least one "
                        "message.", "input.messages")
    _check_messages(messages, "input.messages")
    if messages[-1]["role"] != "user":
        raise LineError("preference_input_must_end_with_user",
                        f"input.messages must end with a user message (the last is "
                        f"{messages[-1]['role']!r}); the outputs answer it.",
                        f"input.messages[{len(messages) - 1}].role")
    answers = []
    for side in PREFERENCE_SIDES:
        output = record.get(side)
        if output is None or output == []:
            raise LineError("preference_missing_output",
                            f"The pair has no '{side}' (a list with one assistant message).", side)
        if not isinstance(output, list) or len(output) != 1 or not isinstance(output[0], dict):
            raise LineError("preference_output_role",
                            f"'{side}' must be a list of exactly one assistant message.", side)
        message = output[0]
        if message.get("role") != "assistant":
            raise LineError("preference_output_role",
                            f"{side}[0].role is {message.get('role')!r}; an output is the "
                            "assistant's answer.", f"{side}[0].role")
        _check_messages(output, side)
        answers.append(message["content"])
    if answers[0].strip() == answers[1].strip():
        raise LineError("preference_identical_outputs",
                        "preferred_output and non_preferred_output are the same answer; a pair "
                        "teaches nothing unless they differ.", "non_preferred_output[0].content")


def _check_alpaca(record: dict) -> None:
    for key in ("instruction", "output"):
        _require_string(record, key)
    for key in ("input", "system"):
        if key in record and record[key] is not None:
            _require_string(record, key, allow_empty=True)


def _check_prompt_completion(record: dict) -> None:
    _require_string(record, "prompt", allow_empty=True)
    _require_string(record, "completion")


def _check_text(record: dict) -> None:
    _require_string(record, "text")


def detect_format(record: dict) -> str:
    if any(side in record for side in PREFERENCE_SIDES):
        return PREFERENCE
    if "messages" in record:
        return CHAT
    if "instruction" in record or "output" in record:
        if "instruction" not in record:
            raise LineError("missing_content", "An alpaca example needs 'instruction'.",
                            "instruction")
        if "output" not in record:
            raise LineError("missing_content", "An alpaca example needs 'output'.", "output")
        return ALPACA
    if "prompt" in record or "completion" in record:
        missing = "prompt" if "prompt" not in record else "completion"
        if missing not in record:
            raise LineError("missing_content", f"A prompt-completion example needs '{missing}'.",
                            missing)
        return PROMPT_COMPLETION
    if "text" in record:
        return TEXT
    if isinstance(record.get("input"), dict):  # alpaca's "input" is a string, checked above
        return PREFERENCE
    keys = ", ".join(sorted(record)[:5]) or "none"
    raise LineError("missing_messages_list",
                    "No known format: expected 'messages' (chat), 'instruction'+'output' "
                    "(alpaca), 'prompt'+'completion', 'text', or 'input'+'preferred_output'+"
                    f"'non_preferred_output' (preference); found keys: {keys}.")


_CHECKS = {CHAT: _check_chat, ALPACA: _check_alpaca, PROMPT_COMPLETION: _check_prompt_completion,
           TEXT: _check_text, PREFERENCE: _check_preference}


def check_record(record: dict, file_format: str) -> None:
    """The checks of one format on one parsed line; raises LineError."""
    _CHECKS[file_format](record)


def _type_name(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
            type(None): "null", int: "a number", float: "a number"}.get(type(value), "a value")


# --- the line reader ------------------------------------------------------------------------------


def _sniff(head: bytes) -> str | None:
    if head.startswith(b"\x1f\x8b"):
        return "The file is gzip-compressed; decompress it and upload the .jsonl file."
    if head.startswith((b"\xff\xfe", b"\xfe\xff")) or (len(head) > 1 and head[1:2] == b"\x00"):
        return "The file looks like UTF-16; save it as UTF-8."
    if head.startswith(b"PK\x03\x04"):
        return "The file is a zip archive; upload the .jsonl file itself."
    return None


def iter_lines(stream: IO[bytes], *, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES
               ) -> Iterator[tuple[int, bytes | None]]:
    """Yield (line number, raw line without EOL) from a binary stream, in bounded memory.

    A line longer than ``max_line_bytes`` is yielded as None (and skipped without being held).
    """
    number = 0
    readline = stream.readline
    while True:
        raw = readline(max_line_bytes + 1)
        if not raw:
            return
        number += 1
        if len(raw) > max_line_bytes and not raw.endswith(b"\n"):
            # Skip the rest of the line in bounded chunks.
            while True:
                rest = readline(_CHUNK)
                if not rest or rest.endswith(b"\n"):
                    break
            yield number, None
            continue
        if number == 1 and raw.startswith(_BOM):
            raw = raw[3:]
        yield number, raw.rstrip(b"\r\n")


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def unencodable_text(value: Any, text: str) -> str | None:
    """The first string in ``value`` (parsed from ``text``) that UTF-8 cannot encode: an unpaired
    UTF-16 surrogate written as a ``\\uD800``-style escape. Valid UTF-8 input can only hold one
    through such an escape, so the walk runs only when ``text`` has one."""
    if "\\u" not in text or not _SURROGATE_ESCAPE.search(text):
        return None
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, dict):
            pending.extend(item.keys())
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
        elif isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return item
    return None


def loads_strict(text: str) -> Any:
    """json.loads that turns what Python accepts but nothing downstream can store into
    ValueError: nesting beyond the parser's depth, and unpaired surrogates."""
    try:
        value = json.loads(text)
    except RecursionError:
        raise ValueError("The JSON is nested too deeply.") from None
    bad = unencodable_text(value, text)
    if bad is not None:
        raise ValueError("The JSON holds text that cannot be encoded as UTF-8 (an unpaired "
                         "surrogate escape such as \\ud800).")
    return value


def parse_line(raw: bytes) -> dict:
    """One JSON object from one line, or LineError."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise LineError("invalid_encoding",
                        f"The line is not valid UTF-8 (byte {exc.start + 1}).") from None
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        raise LineError("invalid_json", f"Invalid JSON: {exc.msg} at column {exc.colno}.") from None
    except RecursionError:
        raise LineError("json_too_deep", "The JSON is nested too deeply.") from None
    if unencodable_text(record, text) is not None:
        raise LineError("invalid_text", "The line holds text that cannot be encoded as UTF-8 (an "
                        "unpaired surrogate escape such as \\ud800).")
    if not isinstance(record, dict):
        hint = " (a JSON array? put one object per line)" if isinstance(record, list) else ""
        raise LineError("not_an_object", f"Each line must be a JSON object, not "
                        f"{_type_name(record)}{hint}.")
    return record


def validate_jsonl(stream: IO[bytes], *, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
                   min_examples: int = MIN_EXAMPLES) -> ValidationReport:
    """Check a whole JSONL file, streaming; every problem has a line number and a code."""
    report = ValidationReport()
    head = stream.peek(4)[:4] if hasattr(stream, "peek") else b""
    sniffed = _sniff(head)
    if sniffed:
        report.add(Problem("invalid_encoding", sniffed, 1))
        return report
    pending_blank: list[int] = []
    file_format: str | None = None
    for number, raw in iter_lines(stream, max_line_bytes=max_line_bytes):
        report.lines = number
        if raw is None:
            report.add(Problem("line_too_long",
                               f"The line is longer than {max_line_bytes} bytes.", number))
            continue
        if not raw.strip():
            pending_blank.append(number)
            continue
        if len(raw) > report.longest_line_bytes:
            report.longest_line_bytes = len(raw)
        for blank in pending_blank:  # blank lines are only accepted at the end
            report.add(Problem("invalid_json", "Blank line in the middle of the file.", blank))
        pending_blank.clear()
        try:
            record = parse_line(raw)
            line_format = detect_format(record)
            if file_format is None:
                file_format = line_format
            elif line_format != file_format:
                raise LineError("mixed_formats",
                                f"This line is {line_format} but the file's first example is "
                                f"{file_format}; use one format per file.")
            _CHECKS[line_format](record)
        except LineError as error:
            report.add(Problem(error.code, error.message, number, error.param))
            continue
        report.examples += 1
    report.format = file_format
    if report.lines == 0 or (report.examples == 0 and not report.error_counts):
        report.add(Problem("empty_file", "The file has no examples.", None))
    elif report.ok and report.examples < min_examples:
        report.add(Problem("too_few_examples",
                           f"The file has {report.examples} examples; at least {min_examples} "
                           "are needed.", None))
    return report


# --- the internal representation ------------------------------------------------------------------


@dataclass(frozen=True)
class Segment:
    text: str
    train: bool


@dataclass(frozen=True)
class Example:
    """``chat``: messages (role, content, weight) for the chat template; ``raw``: segments;
    ``preference``: the prompt's messages and the chosen and rejected assistant answers."""

    kind: str
    messages: tuple[dict, ...] = ()
    segments: tuple[Segment, ...] = ()
    chosen: dict | None = None
    rejected: dict | None = None

    def with_answer(self, answer: dict) -> Example:
        """A preference example's prompt followed by one of its answers, as a chat example
        that trains only on that answer."""
        return Example(kind="chat", messages=(*self.messages, answer))


def _answer(record: dict, side: str) -> dict:
    return {"role": "assistant", "content": record[side][0]["content"], "weight": 1}


def to_example(record: dict, file_format: str) -> Example:
    if file_format == PREFERENCE:
        prompt = tuple({"role": m["role"], "content": m["content"], "weight": 0}
                       for m in record["input"]["messages"])
        return Example(kind=PREFERENCE, messages=prompt, chosen=_answer(record, PREFERENCE_SIDES[0]),
                       rejected=_answer(record, PREFERENCE_SIDES[1]))
    if file_format == CHAT:
        messages = tuple(
            {"role": m["role"], "content": m["content"],
             "weight": m.get("weight", 1 if m["role"] == "assistant" else 0)}
            for m in record["messages"]
        )
        return Example(kind="chat", messages=messages)
    if file_format == ALPACA:
        user = record["instruction"]
        if record.get("input"):
            user = f"{user}\n\n{record['input']}"
        messages = []
        if record.get("system"):
            messages.append({"role": "system", "content": record["system"], "weight": 0})
        messages += [{"role": "user", "content": user, "weight": 0},
                     {"role": "assistant", "content": record["output"], "weight": 1}]
        return Example(kind="chat", messages=tuple(messages))
    if file_format == PROMPT_COMPLETION:
        return Example(kind="raw", segments=(Segment(record["prompt"], False),
                                             Segment(record["completion"], True)))
    return Example(kind="raw", segments=(Segment(record["text"], True),))


def read_examples(stream: IO[bytes], *, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES
                  ) -> Iterator[tuple[int, Example]]:
    """Examples of an already validated file, with their line numbers."""
    file_format: str | None = None
    for number, raw in iter_lines(stream, max_line_bytes=max_line_bytes):
        if raw is None or not raw.strip():
            continue
        record = parse_line(raw)
        if file_format is None:
            file_format = detect_format(record)
        yield number, to_example(record, file_format)
