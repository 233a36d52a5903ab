"""The export formats: their quantizations and what each needs (pure Python, no torch; the
platform validates requests with it and the trainer's ``python -m jobs.export`` runs them)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Format:
    name: str
    quantizations: tuple[str, ...]  # the first is the default; () when it has none
    merged: bool  # needs the merged model (the adapter's merge runs first), else the adapter
    suffix: str  # the artifact's file name ends so
    content_type: str
    summary: str

    @property
    def default_quantization(self) -> str:
        return self.quantizations[0] if self.quantizations else ""


FORMATS: dict[str, Format] = {f.name: f for f in (
    Format("safetensors", (), True, ".tar", "application/x-tar",
           "The merged model as Hugging Face safetensors shards with its tokenizer, in a tar."),
    Format("gguf", ("f16", "q8_0", "q4_0", "q4_k_m"), True, ".gguf", "application/octet-stream",
           "The merged model as one GGUF file for llama.cpp, chat template and tokenizer inside."),
    Format("gguf-lora", ("f16",), False, ".gguf", "application/octet-stream",
           "The adapter alone as a GGUF LoRA, for llama.cpp's --lora over the base model's GGUF."),
    Format("ollama", ("q8_0", "f16", "q4_0", "q4_k_m"), True, ".tar", "application/x-tar",
           "A Modelfile (template, parameters) beside the merged model's GGUF, in a tar."),
    Format("onnx", ("fp32", "fp16", "int8"), True, ".tar", "application/x-tar",
           "The merged model for ONNX Runtime, with past key values, and its tokenizer, in a tar."),
)}


def resolve(format_name: str, quantization: str | None) -> tuple[Format, str]:
    """The format and the quantization to use (its default when None or empty).

    ValueError names the field at fault ("format" or "quantization") as its first argument and
    says what is allowed as its second."""
    spec = FORMATS.get(format_name)
    if spec is None:
        raise ValueError("format", f"{format_name!r} is not one of {', '.join(FORMATS)}")
    if not quantization:
        return spec, spec.default_quantization
    if quantization not in spec.quantizations:
        allowed = ", ".join(spec.quantizations) if spec.quantizations else "none (leave it out)"
        raise ValueError("quantization", f"{quantization!r} is not a quantization of "
                                         f"{spec.name}: {allowed}")
    return spec, quantization
