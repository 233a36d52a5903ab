"""Exports: an adapter's model in a format other tools run (llama.cpp, Ollama, ONNX Runtime).

Runs in the trainer's environment (torch, transformers, peft, gguf, onnxruntime), as

    python -m jobs.export --format FORMAT [--quantization Q] --base BASE_DIR
                          (--merged MERGED_DIR | --adapter ADAPTER_DIR) --out OUT_DIR

and prints its progress and its end on stdout, one JSON object a line (jobs.export.protocol).
The formats, their quantizations and what each needs are in jobs.export.formats (pure Python:
the platform validates requests with it). Every export is checked before it is offered: the
check's figures are part of its result line, and a failed check is an error line with them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class ExportRequest:
    format: str
    quantization: str  # resolved: the format's default when none was asked ("" when it has none)
    base: Path  # the base model's Hugging Face directory
    merged: Path | None  # the merged model's directory (formats.Format.merged), else None
    adapter: Path | None  # the adapter's directory (always given when the platform has it)
    out: Path  # an empty folder for the artifact
    name: str = "model"  # the artifact's file name without its suffix


class CheckFailed(Exception):
    def __init__(self, message: str, check: dict[str, Any]):
        super().__init__(message)
        self.check = check


class InvalidInput(Exception):
    pass
