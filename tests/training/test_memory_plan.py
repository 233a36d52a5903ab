"""The activation plan: chosen from the memory budget and the job's shape, the same rule for the
pre-flight estimate and the trainer; split forward passes and partial checkpointing leave the
gradient unchanged."""

from __future__ import annotations

import pytest
import torch

from jobs.training.data import forward_passes
from jobs.training.memory import (
    GIB,
    HEADROOM,
    ModelShape,
    advice,
    estimate,
    forward_tokens,
    plan_activations,
    shards,
    split_choices,
    weight_bytes,
)
from jobs.training.tokenize import TokenizedExample

LLAMA_8B = ModelShape(parameters=8_030_261_248, hidden=4096, intermediate=14336, layers=32,
                      vocab=128256, heads=32, kv_heads=8)
LLAMA_70B = ModelShape(parameters=70_553_706_496, hidden=8192, intermediate=28672, layers=80,
                       vocab=128256, heads=64, kv_heads=8)


def _examples(*lengths: int) -> list[TokenizedExample]:
    return [TokenizedExample(list(range(1, n + 1)), [0] + [1] * (n - 1)) for n in lengths]


def test_a_packed_micro_batch_splits_at_example_boundaries_under_the_token_cap():
    examples = _examples(1000, 1500, 900, 3000, 200)
    passes = forward_passes([0, 1, 2, 3, 4], examples, max_tokens=3000, packing=True)
    assert passes == [[0, 1], [2], [3], [4]]
    assert forward_passes([0, 1, 2], examples, max_tokens=10**6, packing=True) == [[0, 1, 2]]


def test_a_padded_micro_batch_splits_by_rows_times_the_longest():
    examples = _examples(100, 300, 200, 250)
    # rows x longest: [100, 300] -> 600, + 200 -> 900, + 250 -> 1200 > 1000
    passes = forward_passes([0, 1, 2, 3], examples, max_tokens=1000, packing=False)
    assert passes == [[0, 1, 2], [3]]


def test_an_example_longer_than_the_cap_gets_a_pass_of_its_own():
    examples = _examples(50, 5000, 60)
    assert forward_passes([0, 1, 2], examples, max_tokens=1000, packing=True) == [[0], [1], [2]]


def _plan(available, mode=None, tokens=4096, longest=2048):
    weights = LLAMA_8B.parameters * 2
    return plan_activations(LLAMA_8B, fixed=weights + GIB,
                            pass_tokens=split_choices(tokens, longest), target_share=0.5,
                            method="lora", bf16=True, fused_kernels=True, fused_head=True,
                            gradient_checkpointing=mode, available=available, weights=weights)


def test_the_plan_checkpoints_the_fewest_layers_that_fit_the_budget():
    roomy, tight, tiny = _plan(140 * GIB), _plan(30 * GIB), _plan(10 * GIB)
    assert roomy.checkpointed_layers == 0
    assert 0 < tight.checkpointed_layers < 32
    assert tight.estimate.total <= 30 * GIB * HEADROOM
    assert not tight.split
    assert tiny.checkpointed_layers == 32 and tiny.split  # the least memory there is
    more = [_plan(g * GIB).checkpointed_layers for g in (24, 28, 32, 36, 40, 60)]
    assert more == sorted(more, reverse=True)  # more memory, fewer recomputed layers


def test_each_forward_pass_recomputes_only_what_its_own_tokens_need():
    plan = _plan(40 * GIB, tokens=11_000)
    assert plan.layers_for(11_000) == plan.checkpointed_layers > 0
    per_pass = [plan.layers_for(t) for t in (2000, 5000, 7000, 9000, 11_000)]
    assert per_pass == sorted(per_pass) and per_pass[0] == 0
    for tokens in (5000, 7000, 9000):
        fitted = _plan(40 * GIB, tokens=tokens)
        assert plan.layers_for(tokens) == fitted.checkpointed_layers
    assert _plan(40 * GIB, mode=True).layers_for(100) == 32  # forced: the same for every pass


def test_forcing_checkpointing_on_or_off_overrides_the_budget():
    assert _plan(140 * GIB, mode=True).checkpointed_layers == 32
    assert _plan(10 * GIB, mode=False).checkpointed_layers == 0
    assert _plan(None).checkpointed_layers == 32  # auto with no budget: the smallest plan


def test_longer_forward_passes_need_more_checkpointing():
    short, long_ = _plan(36 * GIB, tokens=4096), _plan(36 * GIB, tokens=8192)
    assert short.checkpointed_layers < long_.checkpointed_layers


def test_micro_batches_are_split_only_when_every_layer_checkpointed_does_not_fit():
    whole = _plan(40 * GIB, tokens=10_000)
    assert not whole.split and whole.forward_tokens == 10_000
    assert 0 < whole.checkpointed_layers < 32
    squeezed = _plan(19 * GIB, tokens=10_000)
    assert squeezed.split and squeezed.checkpointed_layers > 0
    assert squeezed.forward_tokens < 10_000 and squeezed.estimate.total <= 19 * GIB * HEADROOM
    assert _plan(19 * GIB, mode=False, tokens=10_000).split  # forced off still fits by splitting


def test_split_choices_never_cut_below_the_longest_example():
    assert split_choices(10_000, 1500) == [10_000, 8192, 4096, 2048, 1500]
    assert split_choices(3000, 2048) == [3000, 2048]
    assert split_choices(8 * 1000, 1000, packing=False) == [8000, 4000, 2000, 1000]


def test_forward_tokens_follow_the_cap_and_never_split_an_example():
    assert forward_tokens(micro_batch=8, longest_example=1000) == 8000
    assert forward_tokens(micro_batch=8, longest_example=1000, cap=4096) == 4000
    assert forward_tokens(micro_batch=8, longest_example=6000, cap=4096) == 6000


def test_the_preflight_estimate_follows_the_trainers_plan():
    common = {"method": "lora", "rank": 16, "targets": None, "micro_batch": 8, "seq_len": 2048,
              "bf16": True, "on_gpu": True}
    auto_roomy = estimate(LLAMA_8B, gradient_checkpointing=None, available=140 * GIB, **common)
    none = estimate(LLAMA_8B, gradient_checkpointing=False, **common)
    every = estimate(LLAMA_8B, gradient_checkpointing=True, **common)
    auto_tight = estimate(LLAMA_8B, gradient_checkpointing=None, available=30 * GIB, **common)
    auto_unknown = estimate(LLAMA_8B, gradient_checkpointing=None, **common)
    assert auto_roomy.total == none.total > auto_tight.total > every.total
    assert auto_tight.total <= 30 * GIB * HEADROOM
    assert auto_unknown.total == every.total  # for refusing jobs: the least it can run in
    cpu = estimate(LLAMA_8B, gradient_checkpointing=None, **{**common, "on_gpu": False})
    cpu_off = estimate(LLAMA_8B, gradient_checkpointing=False, **{**common, "on_gpu": False})
    assert cpu.total == cpu_off.total  # the CPU trainer does not recompute


def test_auto_sharding_splits_only_what_one_gpu_cannot_hold_and_the_estimate_follows():
    h200 = 139 * GIB
    lora = {"method": "lora", "bf16": True, "on_gpu": True}
    big, small = weight_bytes(LLAMA_70B, **lora), weight_bytes(LLAMA_8B, **lora)
    assert shards(sharding="auto", method="lora", gpus=2, weights=big, budget=h200) == 2
    assert shards(sharding="auto", method="lora", gpus=2, weights=small, budget=h200) == 1
    assert shards(sharding="fsdp", method="lora", gpus=4, weights=small, budget=h200) == 4
    assert shards(sharding="off", method="lora", gpus=2, weights=big, budget=h200) == 1
    assert shards(sharding="fsdp", method="lora", gpus=1, weights=big, budget=h200) == 1
    assert shards(sharding="auto", method="qlora", gpus=2, weights=big, budget=h200) == 1

    common = {"method": "lora", "rank": 16, "targets": None, "micro_batch": 8, "seq_len": 2048,
              "bf16": True, "on_gpu": True, "gradient_checkpointing": None, "available": h200}
    one = estimate(LLAMA_70B, **common)
    two = estimate(LLAMA_70B, gpus=2, sharding="auto", **common)
    assert one.total > h200 * HEADROOM  # 70B does not fit one H200 ...
    assert two.total <= h200 * HEADROOM  # ... and fits two, sharded
    layer = (LLAMA_70B.parameters - 2 * LLAMA_70B.vocab * LLAMA_70B.hidden) // 80 * 2
    head = LLAMA_70B.vocab * LLAMA_70B.hidden * 2
    assert two.weights == -(-(one.weights - head) // 2) + head + 2 * layer
    # one GPU keeps a bf16 copy of the adapter for its grouped projections; sharded, FSDP casts
    lora_parameters = one.adapter // 18
    assert two.adapter == -(-lora_parameters * 16 // 2)
    replicas = estimate(LLAMA_8B, gpus=2, sharding="auto", **common)
    assert replicas == estimate(LLAMA_8B, **common)  # 8B: a whole copy on each GPU

    tips = {"micro_batch": 8, "seq_len": 2048, "gradient_checkpointing": None, "method": "lora",
            "available": h200}
    assert advice(one, max_gpus=8, **tips).split(": ", 1)[1].startswith(
        "train on more GPUs (gpus up to 8)")  # the weights alone crowd one GPU: first
    assert "more GPUs" not in advice(one, **tips)  # a worker of one GPU: not offered
    assert "more GPUs" not in advice(two, gpus=8, max_gpus=8, **tips)


def test_split_passes_and_partial_checkpointing_leave_the_gradient_unchanged(smollm,
                                                                            step_gradients):
    from jobs.training.trainer import _decoder_layers, apply_checkpoint_plan

    torch.manual_seed(3)
    examples = [TokenizedExample(torch.randint(3, 2000, (n,)).tolist(), [0] * 4 + [1] * (n - 4))
                for n in (40, 25, 33)]
    loss, grads = step_gradients(smollm, examples, max_forward_tokens=None)
    apply_checkpoint_plan(smollm, 3)
    assert [layer.gradient_checkpointing for layer in _decoder_layers(smollm)][:4] == [
        True, True, True, False]
    try:
        split_loss, split_grads = step_gradients(smollm, examples, max_forward_tokens=50)
    finally:
        apply_checkpoint_plan(smollm, 0)
    assert split_loss == pytest.approx(loss, rel=1e-5)
    for ours, reference in zip(split_grads, grads):
        assert torch.allclose(ours, reference, rtol=1e-3, atol=1e-6)


def test_adapter_dropout_counts_the_dropped_inputs_and_checkpoints_more_layers():
    """peft's path with dropout keeps each projection's dropped input and mask: at 40 GiB an
    8B job of 11.8k-token passes recomputes more layers than without it."""
    from jobs.training.memory import layer_bytes_per_token

    plain = layer_bytes_per_token(LLAMA_8B, method="lora", bf16=True, fused_kernels=True)
    dropped = layer_bytes_per_token(LLAMA_8B, method="lora", bf16=True, fused_kernels=True,
                                    dropout=True)
    assert dropped - plain == (6 * 4096 + 14336) * 3  # bf16 input + byte mask, 7 projections
    weights = LLAMA_8B.parameters * 2

    def plan(dropout):
        return plan_activations(LLAMA_8B, fixed=weights + GIB, pass_tokens=[11_777],
                                target_share=0.5, method="lora", bf16=True, fused_kernels=True,
                                fused_head=True, gradient_checkpointing=None, available=40 * GIB,
                                weights=weights, dropout=dropout)

    assert plan(True).checkpointed_layers > plan(False).checkpointed_layers
    common = {"method": "lora", "rank": 16, "targets": None, "micro_batch": 8, "seq_len": 2048,
              "bf16": True, "on_gpu": True, "gradient_checkpointing": False}
    assert (estimate(LLAMA_8B, **common, dropout=True).activations
            > estimate(LLAMA_8B, **common).activations)
