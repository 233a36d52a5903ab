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


def prepare_quantized(model, device):
    """Freeze the 4-bit model for LoRA: every weight frozen, everything that is not 4-bit left in
    bf16, the input embedding moved to host memory.

    peft's ``prepare_model_for_kbit_training`` upcasts every weight that is not 4-bit to fp32, for
    fp16 training's sake. The trainer computes in bf16 under autocast (as for LoRA on a bf16 base),
    where fp32 copies only cost memory: for Llama-3.1-8B's 128k vocabulary the embedding and head
    alone are 4.2 GB in fp32 (12.2 GiB peak at micro-batch 1 on an H100 with them; 9.2 GiB after
    casting them back), the fp32 norms make the whole residual stream fp32 (twice the bytes in
    every saved activation), and the upcast itself needs 4 GB more while loading. The frozen input
    embedding is a lookup table: only a batch's rows are needed, so it stays in host memory
    (:func:`jobs.training.offload.embedding_to_host`, not when tied to the head): 1 GB less.
    Activation checkpointing is the trainer's own plan, not peft's (which checkpoints every layer).
    """
    from jobs.training.offload import embedding_to_host

    for param in model.parameters():
        param.requires_grad_(False)
    embedding_to_host(model, device)
    return model
