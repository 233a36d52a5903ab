"""bf16 base weights: the adapters compute in bf16 under autocast, their weights stay fp32."""

from __future__ import annotations

import torch

from jobs.training.config import TrainingConfig
from jobs.training.data import collate
from jobs.training.tokenize import TokenizedExample
from jobs.training.trainer import AUTOCAST_DTYPE, forward_loss, load_model


def test_bf16_base_trains_fp32_adapters_through_autocast_without_peft_casts(base_model_dir):
    from peft.tuners.tuners_utils import BaseTunerLayer

    config = TrainingConfig(base_model_dir=str(base_model_dir), train_file="x", output_dir="x",
                            device="cpu", bf16=True, lora_dropout=0.0)
    model = load_model(config, torch.device("cpu"))
    assert getattr(model, AUTOCAST_DTYPE) == torch.bfloat16
    adapters = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    assert adapters and not any(m.cast_input_dtype_enabled for m in adapters)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {p.dtype for p in trainable} == {torch.float32}
    examples = [TokenizedExample([1, 520, 30, 44, 90, 2], [0, 0, 1, 1, 1, 1])]
    loss, _ = forward_loss(model, collate(examples, packing=True, pad_id=0))
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in trainable)


def test_fp32_base_keeps_the_plain_fp32_path(base_model_dir):
    config = TrainingConfig(base_model_dir=str(base_model_dir), train_file="x", output_dir="x",
                            device="cpu", bf16=False)
    assert not hasattr(load_model(config, torch.device("cpu")), AUTOCAST_DTYPE)
