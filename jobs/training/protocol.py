"""The trainer's output protocol: what ``python -m jobs.training.run`` prints, one JSON object a
line on stdout, and how the platform's runner reads it back.

    {"type": "event", "message", "level", "data"}         a line for the job's event log
    {"type": "metrics", "data": {step, train_loss, ...}}  after each optimizer step
    {"type": "checkpoint", "step", "path", "metrics"}     a resumable checkpoint is on disk
    {"type": "result", "status", "adapter_dir", ...}      the end: succeeded, cancelled or paused
    {"type": "error", "code", "message"}                  the end: the job failed

Each kind is a frozen dataclass below; the trainer writes ``message.to_json()`` and the runner
calls :func:`parse`, which gives None for a line of another shape (library output that reached
stdout, a line cut short). Pure Python, no torch: the platform imports it.

Exit codes of the process: ``EXIT_OK`` (a succeeded result), ``EXIT_ERROR`` (an error line, or a
crash with none), ``EXIT_CONFIG`` (an ``invalid_config`` error), ``EXIT_CANCELLED`` (SIGTERM:
a cancelled result) and ``EXIT_PAUSED`` (a paused result).

The other way, the runner asks the trainer to pause by creating the file ``PAUSE_REQUEST`` in the
trainer's output folder: at the end of its step the trainer saves a checkpoint (its checkpoint
line comes first), prints a paused result and exits. A file rather than a signal: a signal that
comes before the trainer has set its handler kills it, torchrun's launcher dies of one it does
not handle, and every rank of a job (one node) sees the file; a request made before the trainer
started is seen at its first check.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar

EXIT_OK, EXIT_ERROR, EXIT_CONFIG, EXIT_CANCELLED, EXIT_PAUSED = 0, 1, 2, 3, 4
PAUSE_REQUEST = "pause-requested"  # in the trainer's output folder: save a checkpoint and stop


class _Message:
    TYPE: ClassVar[str]

    def to_json(self) -> str:
        return json.dumps({"type": self.TYPE, **dataclasses.asdict(self)})

    def __post_init__(self) -> None:
        """Each field holds a value of its annotated type (its outer type: a dict's contents are
        not checked); a bool is no int here (never a step or a count)."""
        for name, allowed in _field_types(type(self)).items():
            value = getattr(self, name)
            if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
                raise TypeError(f"{self.TYPE}.{name}: {type(value).__name__} is not "
                                f"{' or '.join(t.__name__ for t in allowed)}")


@functools.cache
def _field_types(kind: type) -> dict[str, tuple[type, ...]]:
    hints = typing.get_type_hints(kind)
    return {f.name: _outer_types(hints[f.name]) for f in dataclasses.fields(kind)}


def _outer_types(hint: Any) -> tuple[type, ...]:
    if isinstance(hint, types.UnionType):  # str | None
        return tuple(t for arg in hint.__args__ for t in _outer_types(arg))
    return (typing.get_origin(hint) or hint,)  # dict[str, Any]: dict


@dataclass(frozen=True)
class Event(_Message):
    """A line for the job's event log (``data``: machine-readable details)."""

    TYPE: ClassVar[str] = "event"
    message: str
    level: str = "info"
    data: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Metrics(_Message):
    """One optimizer step's metrics (step, total_steps, train_loss, tokens_per_second, ...)."""

    TYPE: ClassVar[str] = "metrics"
    data: dict[str, Any]


@dataclass(frozen=True)
class Checkpoint(_Message):
    """A resumable checkpoint of ``step`` is complete in the folder ``path``."""

    TYPE: ClassVar[str] = "checkpoint"
    step: int
    path: str
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Result(_Message):
    """The end of a run: ``succeeded`` with the fields of the trainer's ``TrainResult``,
    ``cancelled`` (then only the status) or ``paused`` (and ``steps``, those done: the newest
    checkpoint is of that step, or of an earlier one when no step was trained since)."""

    TYPE: ClassVar[str] = "result"
    status: str  # succeeded | cancelled | paused
    adapter_dir: str | None = None
    sha256: str | None = None
    steps: int = 0
    trained_tokens: int = 0
    config: dict[str, Any] = field(default_factory=dict)
    final_metrics: dict[str, Any] = field(default_factory=dict)
    stopped_early: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.status not in ("succeeded", "cancelled", "paused"):
            raise ValueError(f"result.status: {self.status!r} is not succeeded, cancelled or "
                             "paused")
        if self.succeeded and self.adapter_dir is None:
            raise ValueError("result.adapter_dir: a succeeded result names its adapter")

    @property
    def succeeded(self) -> bool:
        return self.status == "succeeded"

    @property
    def cancelled(self) -> bool:
        return self.status == "cancelled"

    @property
    def paused(self) -> bool:
        return self.status == "paused"


@dataclass(frozen=True)
class Error(_Message):
    """The run failed: ``code`` (invalid_config, out_of_memory, training_error) and a message
    for the job's owner."""

    TYPE: ClassVar[str] = "error"
    code: str
    message: str


Message = Event | Metrics | Checkpoint | Result | Error
KINDS: dict[str, type[Message]] = {kind.TYPE: kind
                                   for kind in (Event, Metrics, Checkpoint, Result, Error)}


def parse(line: str | bytes) -> Message | None:
    """The message on one line, or None for a line of another shape: not JSON, not an object,
    an unknown type, a required field missing, a field of the wrong type, a result of another
    status or a succeeded one without its adapter. Fields a newer trainer adds are ignored."""
    return parse_kinds(line, KINDS)


def parse_kinds(line: str | bytes, kinds: dict[str, type]) -> Any:
    """The message of one of ``kinds`` (by its ``type``) on one line, or None (see parse)."""
    try:
        payload = json.loads(line)
    except (ValueError, UnicodeDecodeError):  # json.JSONDecodeError is a ValueError
        return None
    if not isinstance(payload, dict) or not isinstance(payload.get("type"), str):
        return None
    kind = kinds.get(payload["type"])
    if kind is None:
        return None
    known = {f.name for f in dataclasses.fields(kind)}
    try:
        return kind(**{name: value for name, value in payload.items() if name in known})
    except (TypeError, ValueError):  # a required field missing, a value of the wrong type
        return None
