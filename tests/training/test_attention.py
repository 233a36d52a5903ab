"""Variable-length attention for packed rows: the boundaries, and the transformers plumbing.

The flash varlen kernel itself needs CUDA (benchmarks/gpu_step_profile.py checks it against this
same per-example reference on the GPU); on the CPU the attention function attends each example
separately, which exercises everything around the kernel.
"""

from __future__ import annotations

import pytest
import torch

from jobs.training.attention import VARLEN, cu_seqlens, register_varlen_attention
from jobs.training.config import TrainingConfig
from jobs.training.data import collate
from jobs.training.tokenize import TokenizedExample
from jobs.training.trainer import forward_loss, load_model


def test_cu_seqlens_are_the_cumulative_example_boundaries():
    bounds = cu_seqlens([3, 1, 4])
    assert bounds.dtype == torch.int32
    assert bounds.tolist() == [0, 3, 4, 8]


@pytest.mark.parametrize("lengths", [[], [3, 0]])
def test_cu_seqlens_rejects_empty_rows_and_examples(lengths):
    with pytest.raises(ValueError):
        cu_seqlens(lengths)


def test_a_packed_batch_carries_its_boundaries():
    examples = [TokenizedExample([1, 2, 3], [0, 1, 1]), TokenizedExample([4, 5], [0, 1]),
                TokenizedExample([6, 7, 8, 9], [0, 0, 1, 1])]
    batch = collate(examples, packing=True, pad_id=0)
    assert batch.cu_seqlens.tolist() == [0, 3, 5, 9]
    assert batch.max_length == 4
    assert batch.position_ids.tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3]]
    assert collate(examples, packing=False, pad_id=0).cu_seqlens is None


def test_varlen_attention_gives_each_packed_example_its_own_attention(base_model_dir):
    config = TrainingConfig(base_model_dir=str(base_model_dir), train_file="x", output_dir="x",
                            device="cpu", lora_dropout=0.0, gradient_checkpointing=True)
    model = load_model(config, torch.device("cpu"), attention=register_varlen_attention())
    assert model.get_base_model().config._attn_implementation == VARLEN
    examples = [TokenizedExample([1, 520, 30, 44, 90, 2], [0, 0, 1, 1, 1, 1]),
                TokenizedExample([1, 77, 31, 12], [0, 1, 1, 1]),
                TokenizedExample([1, 9, 8, 7, 6, 5, 4], [0, 0, 0, 1, 1, 1, 1])]
    packed, _ = forward_loss(model, collate(examples, packing=True, pad_id=0))
    packed.backward()  # through gradient checkpointing, with the boundaries as keyword arguments
    with torch.no_grad():
        separate = sum(forward_loss(model, collate([e], packing=True, pad_id=0))[0]
                       for e in examples)
    assert packed.item() == pytest.approx(separate.item(), rel=1e-4)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_the_kernel_gets_autocasts_dtype_for_fp32_inputs():
    from jobs.training.attention import _kernel_dtype

    q = torch.zeros(4, 2, 8)  # QLoRA's hidden states stay fp32; autocast decides the kernel's
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _kernel_dtype(q) == torch.bfloat16
    assert _kernel_dtype(q.to(torch.bfloat16)) == torch.bfloat16
    with pytest.raises(ValueError):
        _kernel_dtype(q)
