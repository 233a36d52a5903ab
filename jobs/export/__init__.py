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

import os
import tarfile
from collections.abc import Callable
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


def write_tar(path: Path, files: list[Path], name: str,
              progress: Callable[[float, str], None] | None = None) -> Path:
    """``files`` under ``name/`` in an uncompressed tar at ``path``, added one by one (tarfile
    copies each file's content in bounded chunks), owners left out; written beside ``path`` and
    renamed into place when complete. ``progress`` hears the share of the bytes added (to 0.9)."""
    def anonymous(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        return info

    total = sum(p.stat().st_size for p in files) or 1
    partial = path.with_name(f".{path.name}.partial")
    done = 0
    with tarfile.open(partial, "w", format=tarfile.PAX_FORMAT) as tar:
        for file in files:
            tar.add(file, arcname=f"{name}/{file.name}", recursive=False, filter=anonymous)
            done += file.stat().st_size
            if progress is not None:
                progress(0.9 * done / total, f"added {file.name}")
    os.replace(partial, path)
    return path
