"""``python -m jobs.export``: one export, its progress and its end on stdout (jobs.export.protocol).

Each format is a module of this package with one function::

    def export(request: ExportRequest, progress: Callable[[float, str], None]) -> tuple[Path, dict]

which writes its artifact into ``request.out`` and returns the artifact's path and the check's
result (``{"passed": True, "kind": ..., figures}``); it raises :class:`CheckFailed` with the
figures when the export does not answer like its model, :class:`InvalidInput` when the model
or adapter cannot be exported in that format.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback
from pathlib import Path

# Defined in the package, not here: under `python -m jobs.export` this file runs as __main__, and a
# format module importing jobs.export.__main__ would get a second copy whose CheckFailed the
# except clauses below never catch.
from jobs.export import CheckFailed, ExportRequest, InvalidInput, formats, protocol

# format → the module that runs it
RUNNERS = {
    "safetensors": "jobs.export.safetensors_tar",
    "gguf": "jobs.export.gguf",
    "gguf-lora": "jobs.export.gguf",
    "ollama": "jobs.export.ollama",
    "onnx": "jobs.export.onnx",
}


def _progress(fraction: float, message: str) -> None:
    print(protocol.Progress(fraction=max(0.0, min(1.0, float(fraction))),
                            message=message).to_json(), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.export", description=__doc__.split("\n")[0])
    parser.add_argument("--format", required=True, choices=sorted(formats.FORMATS))
    parser.add_argument("--quantization", default="")
    parser.add_argument("--base", type=Path, required=True)
    parser.add_argument("--merged", type=Path)
    parser.add_argument("--adapter", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--name", default="model")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        spec, quantization = formats.resolve(args.format, args.quantization)
    except ValueError as exc:
        return _fail("invalid_input", f"{exc.args[0]}: {exc.args[1]}")
    if spec.merged and args.merged is None:
        return _fail("invalid_input", f"{spec.name} exports the merged model: --merged is required")
    if not spec.merged and args.adapter is None:
        return _fail("invalid_input", f"{spec.name} exports the adapter: --adapter is required")
    args.out.mkdir(parents=True, exist_ok=True)
    request = ExportRequest(format=spec.name, quantization=quantization, base=args.base,
                            merged=args.merged, adapter=args.adapter, out=args.out, name=args.name)
    runner = importlib.import_module(RUNNERS[spec.name])
    try:
        path, check = runner.export(request, _progress)
    except CheckFailed as exc:
        return _fail("check_failed", str(exc), exc.check)
    except InvalidInput as exc:
        return _fail("invalid_input", str(exc))
    except Exception as exc:  # noqa: BLE001 - reported as the export's error, traceback on stderr
        traceback.print_exc()
        return _fail("export_error", f"{type(exc).__name__}: {exc}")
    print(protocol.Exported(file=str(path), check=check).to_json(), flush=True)
    return protocol.EXIT_OK


def _fail(code: str, message: str, check: dict | None = None) -> int:
    print(protocol.ExportError(code=code, message=message, check=check or {}).to_json(), flush=True)
    return protocol.EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
