"""What ``python -m jobs.export`` prints, one JSON object a line on stdout (the trainer's
protocol machinery: jobs.training.protocol), and how the platform reads it back.

    {"type": "progress", "fraction", "message"}   how far the export is (0 to 1), and the step
    {"type": "exported", "file", "check"}          the end: the artifact (a file in --out) and
                                                   the check it passed, with its figures
    {"type": "export_error", "code", "message", "check"}   the end: it failed; ``check`` holds
                                                   the figures when the check is what failed

Exit status 0 after an exported line, 1 after an export_error line (or a crash without one).
A check's result is a dict: ``{"passed": bool, "kind": str, ...figures}``, for example
``{"passed": true, "kind": "greedy_tokens", "engine": "llama.cpp", "prompts": 4,
"matching_tokens": 64, "tokens": 64}`` or ``{"passed": false, "kind": "logits",
"max_abs_diff": 0.31, "tolerance": 0.05}``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from jobs.training.protocol import _Message, parse_kinds

EXIT_OK, EXIT_ERROR = 0, 1


@dataclass(frozen=True)
class Progress(_Message):
    TYPE: ClassVar[str] = "progress"
    fraction: float | int  # 0 to 1 of the whole export
    message: str


@dataclass(frozen=True)
class Exported(_Message):
    TYPE: ClassVar[str] = "exported"
    file: str  # its path
    check: dict[str, Any]


@dataclass(frozen=True)
class ExportError(_Message):
    """``code``: check_failed (the export does not answer like its model), invalid_input (the
    model or adapter cannot be exported so), export_error (anything else)."""

    TYPE: ClassVar[str] = "export_error"
    code: str
    message: str
    check: dict[str, Any] = field(default_factory=dict)


Message = Progress | Exported | ExportError
KINDS: dict[str, type[Message]] = {kind.TYPE: kind for kind in (Progress, Exported, ExportError)}


def parse(line: str | bytes) -> Message | None:
    """The message on one line, or None for a line of another shape."""
    return parse_kinds(line, KINDS)
