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
    """peft's preparation, then the frozen input embeddings and output head back to bf16.

    peft upcasts every weight that is not 4-bit to fp32, for fp16 training's sake; the trainer
    computes in bf16 under autocast, where an fp32 head is cast to bf16 at every forward anyway
    (a second copy, kept for the backward pass). For Llama-3.1-8B's 128k vocabulary the two fp32
    matrices are 4.2 GB of an under-12-GB budget; in bf16 they are half that and the copy goes
    (measured on an H100, micro-batch 1: 12.2 GiB peak with them in fp32). Norm weights stay fp32.
    """
    import torch
    from peft import prepare_model_for_kbit_training

    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    for module in (model.get_input_embeddings(), model.get_output_embeddings()):
        if module is not None:
            module.to(torch.bfloat16)
    return model
