"""QLoRA's 4-bit loading. The only module that touches bitsandbytes, behind an availability check."""

from __future__ import annotations

import importlib.util


class QuantizationUnavailable(RuntimeError):
    pass


def qlora_unavailable_reason() -> str | None:
    """Why QLoRA cannot run here, or None if it can."""
    import torch

    if not torch.cuda.is_available():
        return "QLoRA needs a CUDA GPU; none is visible to this worker."
    if importlib.util.find_spec("bitsandbytes") is None:
        return "QLoRA needs the bitsandbytes package (install the gpu dependency group)."
    return None


def four_bit_config():
    """NF4 weights with double quantization, bf16 compute: the QLoRA recipe."""
    import torch
    from transformers import BitsAndBytesConfig

    reason = qlora_unavailable_reason()
    if reason:
        raise QuantizationUnavailable(reason)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )


def prepare_quantized(model, *, gradient_checkpointing: bool):
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
