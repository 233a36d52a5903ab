"""Long passes: checkpointed layers' inputs parked in host memory and the MLP run in chunks of
the sequence give the plain path's loss and gradients; the memory plan reaches for them only
when checkpointing every layer does not fit, offloading before chunking."""

from __future__ import annotations

import pytest
import torch

from jobs.training.memory import (
    GIB,
    HEADROOM,
    adapter_bytes,
    estimate,
    lora_parameters,
    plan_activations,
    weight_bytes,
    workspace_bytes,
)
from jobs.training.offload import HostStash
from jobs.training.tokenize import TokenizedExample
from tests.training.test_memory_plan import LLAMA_8B


@pytest.fixture(scope="module")
def long_examples() -> list[TokenizedExample]:
    generator = torch.Generator().manual_seed(5)
    return [TokenizedExample(torch.randint(3, 2000, (n,), generator=generator).tolist(),
                             [0] * 6 + [1] * (n - 6)) for n in (40, 25)]


@pytest.fixture(scope="module")
def plain(smollm, long_examples, step_gradients):
    """The loss and gradients with nothing recomputed, offloaded or chunked."""
    return step_gradients(smollm, long_examples)


def _with_plan(model, examples, step_gradients, **plan):
    from jobs.training.trainer import apply_checkpoint_plan

    apply_checkpoint_plan(model, **plan)
    try:
        return step_gradients(model, examples)
    finally:
        apply_checkpoint_plan(model, 0)


def _assert_same(result, reference):
    loss, grads = result
    assert loss == pytest.approx(reference[0], rel=1e-6)
    assert len(grads) == len(reference[1])
    for ours, theirs in zip(grads, reference[1], strict=True):  # fp32: summation order only
        assert (ours - theirs).norm() <= 1e-5 * theirs.norm()


def test_offloaded_checkpoints_give_the_plain_loss_and_gradients(smollm, long_examples, plain,
                                                                 step_gradients, monkeypatch):
    from jobs.training.trainer import HOST_STASH

    taken = []
    take = HostStash.take
    monkeypatch.setattr(HostStash, "take", lambda self, handle: taken.append(handle)
                        or take(self, handle))
    result = _with_plan(smollm, long_examples, step_gradients, checkpointed_layers=30,
                        offloaded_layers=4)
    _assert_same(result, plain)
    assert len(taken) == 4 and taken == sorted(taken, reverse=True)  # last layer's first
    assert len(getattr(smollm.get_base_model(), HOST_STASH)) == 0  # every input taken back


def test_a_chunked_mlp_gives_the_plain_loss_and_gradients(smollm, long_examples, plain,
                                                          step_gradients, monkeypatch):
    from jobs.training import chunked_mlp

    chunks = []
    forward = chunked_mlp._ChunkedMLP.forward
    monkeypatch.setattr(chunked_mlp._ChunkedMLP, "forward", staticmethod(
        lambda ctx, mlp, chunk, rows, *rest: chunks.append(-(-rows.shape[0] // chunk))
        or forward(ctx, mlp, chunk, rows, *rest)))
    alone = _with_plan(smollm, long_examples, step_gradients, checkpointed_layers=0,
                       mlp_chunk_tokens=16)
    _assert_same(alone, plain)
    assert chunks == [5] * len(chunked_mlp.mlp_modules(smollm))  # 65 packed tokens, by 16
    recomputed = _with_plan(smollm, long_examples, step_gradients, checkpointed_layers=30,
                            mlp_chunk_tokens=24)
    _assert_same(recomputed, plain)


def test_offloaded_checkpoints_and_a_chunked_mlp_together(smollm, long_examples, plain,
                                                          step_gradients):
    layers = len(smollm.get_base_model().model.layers)
    both = _with_plan(smollm, long_examples, step_gradients, checkpointed_layers=layers,
                      offloaded_layers=layers, mlp_chunk_tokens=24)
    _assert_same(both, plain)


def test_the_stash_returns_copies_in_reverse_order():
    stash = HostStash(torch.device("cpu"))
    first, second = torch.arange(6.0), torch.arange(6.0, 12.0)
    handles = [stash.put(first), stash.put(second)]
    first.zero_()  # the layer's own tensor may change or go: the stash holds a copy
    assert len(stash) == 2
    assert torch.equal(stash.take(handles[1]), torch.arange(6.0, 12.0))
    assert torch.equal(stash.take(handles[0]), torch.arange(6.0))
    assert len(stash) == 0


# --- the plan ------------------------------------------------------------------------------------


def _qlora_plan(tokens: int, budget_gib: float = 80, mode=None, long_passes: bool = True):
    weights = weight_bytes(LLAMA_8B, method="qlora", bf16=True, on_gpu=True)
    adapter = adapter_bytes(lora_parameters(LLAMA_8B, 16, None), bf16=True)
    return plan_activations(LLAMA_8B, fixed=weights + adapter, pass_tokens=[tokens],
                            target_share=0.75, method="qlora", bf16=True, fused_kernels=True,
                            fused_head=True, gradient_checkpointing=mode,
                            available=int(budget_gib * GIB), weights=weights, adapter=adapter,
                            long_passes=long_passes)


def test_a_long_example_offloads_the_fewest_layers_then_chunks_the_mlp():
    fits = _qlora_plan(128 * 1024)
    assert fits.offloaded_layers == fits.mlp_chunk_tokens == 0
    assert 0 < fits.checkpointed_layers <= 32
    longer = _qlora_plan(256 * 1024)
    assert longer.checkpointed_layers == 32 and 0 < longer.offloaded_layers < 32
    assert longer.mlp_chunk_tokens == 0
    assert _qlora_plan(256 * 1024, long_passes=False).offloaded_layers == 0  # sharded, graphed
    longest = _qlora_plan(512 * 1024)
    assert longest.offloaded_layers == 32 and longest.mlp_chunk_tokens > 0
    for plan in (fits, longer, longest):
        assert plan.estimate.total <= 80 * GIB * HEADROOM
    assert longer.offloaded_layers < _qlora_plan(320 * 1024).offloaded_layers  # as few as fit
    assert "host memory" in longer.describe() and "chunks of" in longest.describe()
    assert longest.long_pass_for(512 * 1024) == (32, longest.mlp_chunk_tokens)
    assert longest.long_pass_for(4096) == (0, 0)  # a short pass of the same job: neither


def test_the_workspace_outgrows_the_head_only_at_long_lengths():
    short = workspace_bytes(LLAMA_8B, tokens=2048, method="lora", bf16=True)
    long_ = workspace_bytes(LLAMA_8B, tokens=131_072, method="lora", bf16=True)
    assert short < 512 * 2**20 and long_ == 64 * short
    chunked = workspace_bytes(LLAMA_8B, tokens=131_072, method="lora", bf16=True, mlp_chunk=8192)
    assert chunked < long_ / 2


def test_the_preflight_estimate_plans_long_examples_like_the_trainer():
    common = {"method": "qlora", "rank": 16, "targets": None, "micro_batch": 1, "bf16": True,
              "on_gpu": True, "gradient_checkpointing": None, "available": 80 * GIB}
    for tokens in (32_768, 131_072, 262_144):
        preflight = estimate(LLAMA_8B, seq_len=tokens, **common)
        assert preflight.total <= 80 * GIB * HEADROOM
    roomy = estimate(LLAMA_8B, seq_len=262_144, **{**common, "available": 140 * GIB})
    tight = estimate(LLAMA_8B, seq_len=262_144, **common)
    assert tight.activations < roomy.activations  # offloaded inputs leave the GPU
