"""``gguf`` and ``gguf-lora``: the merged model, or the adapter alone, as GGUF for llama.cpp.

``gguf``: llama.cpp's convert_hf_to_gguf.py writes the merged model (weights, tokenizer, chat
template) in f16; q8_0, q4_0 and q4_k_m are that file requantized by llama.cpp's own quantizer.
``gguf-lora``: llama.cpp's convert_lora_to_gguf.py writes the peft adapter as a GGUF LoRA, for
``llama-cli -m base.gguf --lora adapter.gguf``. Both are checked in llama.cpp before they are
offered (jobs.export.gguf_check states the rules).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from jobs.export import ExportRequest, InvalidInput, gguf_check, llamacpp

Progress = Callable[[float, str], None]


def export(request: ExportRequest, progress: Progress) -> tuple[Path, dict]:
    if request.format == "gguf-lora":
        return export_lora(request, progress)
    return export_model(request, progress)


def export_model(request: ExportRequest, progress: Progress, *,
                 f16_gguf: Path | None = None) -> tuple[Path, dict]:
    """The merged model's GGUF in ``request.quantization``, checked. ``f16_gguf``: the merged
    model's f16 GGUF when one was already converted (it is then only requantized)."""
    target = request.out / f"{request.name}.gguf"
    with _scratch(request.out) as scratch:
        f16 = write_model_gguf(request.merged, request.quantization, target, scratch, progress,
                               f16_gguf=f16_gguf)
        progress(0.6, f"checking the {request.quantization} GGUF in llama.cpp against "
                      "transformers")
        check = gguf_check.check_model(target, request.merged, request.quantization,
                                       f16_gguf=f16)
    progress(1.0, "checked")
    return target, check


def write_model_gguf(merged: Path | None, quantization: str, target: Path, scratch: Path,
                     progress: Progress, *, f16_gguf: Path | None = None) -> Path:
    """The merged model as one GGUF file at ``target`` (unchecked); returns the f16 GGUF it
    was quantized from (``target`` itself for f16, else in ``scratch`` unless given)."""
    _require_model_dir(merged)
    if quantization not in llamacpp.FTYPES:
        raise InvalidInput(f"gguf has no quantization {quantization!r}")
    if f16_gguf is None:
        progress(0.05, "converting the merged model with llama.cpp's convert_hf_to_gguf.py")
        f16_gguf = target if quantization == "f16" else scratch / "model.f16.gguf"
        _converting(llamacpp.convert_model, merged, f16_gguf)
    elif quantization == "f16":
        shutil.copyfile(f16_gguf, target)
        return target
    if quantization != "f16":
        progress(0.45, f"quantizing to {quantization} with llama.cpp's quantizer")
        llamacpp.quantize(f16_gguf, target, quantization)
    return f16_gguf


def export_lora(request: ExportRequest, progress: Progress, *,
                base_gguf: Path | None = None) -> tuple[Path, dict]:
    """The adapter as a GGUF LoRA, checked over the base model's f16 GGUF (converted here unless
    ``base_gguf`` gives it)."""
    adapter = request.adapter
    if adapter is None or not (adapter / "adapter_config.json").is_file():
        raise InvalidInput(f"{adapter} is not a peft adapter (no adapter_config.json)")
    _require_model_dir(request.base)
    target = request.out / f"{request.name}.gguf"
    progress(0.05, "converting the adapter with llama.cpp's convert_lora_to_gguf.py")
    _converting(llamacpp.convert_lora, adapter, request.base, target)
    with _scratch(request.out) as scratch:
        if base_gguf is None:
            progress(0.25, "converting the base model to f16 GGUF for the check")
            base_gguf = _converting(llamacpp.convert_model, request.base, scratch / "base.gguf")
        progress(0.6, "checking the LoRA over the base GGUF in llama.cpp against transformers")
        check = gguf_check.check_lora(target, base_gguf, request.base, adapter)
    progress(1.0, "checked")
    return target, check


def _require_model_dir(directory: Path | None) -> None:
    if directory is None or not (directory / "config.json").is_file():
        raise InvalidInput(f"{directory} is not a Hugging Face model directory (no config.json)")
    if not any((directory / name).is_file() for name in ("tokenizer.json", "tokenizer.model")):
        raise InvalidInput(f"{directory} has no tokenizer: a GGUF carries the model's tokenizer")


def _converting(convert, *args):
    try:
        return convert(*args)
    except llamacpp.ConversionFailed as exc:
        raise InvalidInput(str(exc)) from exc


@contextmanager
def _scratch(parent: Path):
    """A folder beside the artifact for intermediate files, gone afterwards."""
    folder = parent / ".gguf-work"
    folder.mkdir(parents=True, exist_ok=True)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
