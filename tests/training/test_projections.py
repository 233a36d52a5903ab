"""LoRA projections that share an input run as one autograd node and give peft's outputs and
gradients (CPU: fp64 exactly, bf16 under autocast within bf16's rounding)."""

from __future__ import annotations

import copy

import pytest
import torch

from jobs.training import projections
from jobs.training.kernels import fuse_swiglu_adapters
from jobs.training.projections import (
    forget_copies,
    fuse_lora_projections,
    recompute_norm_outputs,
)


class _Attention(torch.nn.Module):
    def __init__(self, width: int, bias: bool) -> None:
        super().__init__()
        self.q_proj = torch.nn.Linear(width, width, bias=bias)
        self.k_proj = torch.nn.Linear(width, 4, bias=bias)
        self.v_proj = torch.nn.Linear(width, 4, bias=bias)
        self.o_proj = torch.nn.Linear(4, width, bias=False)

    def forward(self, x):
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        return self.o_proj(torch.tanh(k) * v) + q


class _MLP(torch.nn.Module):
    def __init__(self, width: int, inner: int) -> None:
        super().__init__()
        self.gate_proj = torch.nn.Linear(width, inner, bias=False)
        self.up_proj = torch.nn.Linear(width, inner, bias=False)
        self.down_proj = torch.nn.Linear(inner, width, bias=False)
        self.act_fn = torch.nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class _Block(torch.nn.Module):
    """An attention-like part (q, k, v on one input, o on another) and a SwiGLU MLP."""

    def __init__(self, width: int = 12, inner: int = 20, bias: bool = False) -> None:
        super().__init__()
        self.self_attn = _Attention(width, bias)
        self.mlp = _MLP(width, inner)

    def forward(self, x):
        h = x + self.self_attn(x)
        return h + self.mlp(h)


def _model(dtype=torch.float64, dropout: float = 0.0, bias: bool = False):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(7)
    model = get_peft_model(torch.nn.Sequential(_Block(bias=bias)).to(dtype), LoraConfig(
        r=4, lora_alpha=8, lora_dropout=dropout, target_modules=[
            "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    for name, param in model.named_parameters():
        if "lora_B" in name:  # peft starts B at zero; make the adapter matter
            torch.nn.init.normal_(param)
    return model


def _run(model, x):
    x = x.clone().requires_grad_()
    out = model(x)
    (out * torch.linspace(-1, 1, out.shape[-1], dtype=out.dtype)).square().sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.detach(), x.grad, grads


def _count_nodes(monkeypatch) -> list[int]:
    calls: list[int] = []
    apply = projections._Projections.apply

    def counted(rows, norm_input, spec, *adapters):
        calls.append(len(spec.bases))
        return apply(rows, norm_input, spec, *adapters)

    monkeypatch.setattr(projections._Projections, "apply", counted)
    return calls


@pytest.mark.parametrize("bias", [False, True])
def test_grouped_projections_give_peft_outputs_and_gradients(monkeypatch, bias):
    model = _model(bias=bias)
    reference = copy.deepcopy(model)
    x = torch.randn(2, 5, 12, dtype=torch.float64)
    ref_out, ref_x, ref_grads = _run(reference, x)
    assert fuse_lora_projections(model) == 5  # q, k, v and gate, up
    fuse_swiglu_adapters(model)
    calls = _count_nodes(monkeypatch)
    out, grad_x, grads = _run(model, x)
    # q, k, v in one node, o alone, gate and up in one node (down: the SwiGLU adapter's own path)
    assert calls == [3, 1, 2]
    assert torch.allclose(out, ref_out, rtol=1e-10, atol=1e-12)
    assert torch.allclose(grad_x, ref_x, rtol=1e-10, atol=1e-12)
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        assert torch.allclose(grad, ref_grads[name], rtol=1e-10, atol=1e-12), name


def test_under_bf16_autocast_the_group_is_as_close_to_exact_as_peft():
    model = _model(dtype=torch.bfloat16)
    for param in model.parameters():
        if param.requires_grad:  # adapters stay fp32, as the trainer keeps them
            param.data = param.data.float()
    exact = copy.deepcopy(model).double()
    reference = copy.deepcopy(model)
    x = torch.randn(3, 6, 12, dtype=torch.bfloat16)
    exact_out, exact_x, exact_grads = _run(exact, x.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_out, ref_x, ref_grads = _run(reference, x)
        fuse_lora_projections(model)
        out, grad_x, grads = _run(model, x)

    def error(value, truth):
        return float((value.double() - truth).norm() / truth.norm())

    assert out.dtype == ref_out.dtype == torch.bfloat16
    assert error(out, exact_out) <= 1.5 * error(ref_out, exact_out) + 1e-3
    assert error(grad_x, exact_x) <= 1.5 * error(ref_x, exact_x) + 1e-3
    for name, grad in grads.items():
        assert grad.dtype == torch.float32, name
        assert error(grad, exact_grads[name]) <= 1.5 * error(ref_grads[name], exact_grads[name]) \
            + 1e-3, name


def test_a_member_called_on_another_input_is_computed_for_that_input():
    model = _model()
    block = model.base_model.model[0].self_attn
    reference = copy.deepcopy(block)
    fuse_lora_projections(model)
    a, b = torch.randn(4, 12, dtype=torch.float64), torch.randn(4, 12, dtype=torch.float64)
    q = block.q_proj(a)  # k and v of `a` are now kept for their call
    k = block.k_proj(b)  # ... but k is asked for another input: k alone
    v = block.v_proj(b)
    assert torch.allclose(q, reference.q_proj(a))
    assert torch.allclose(k, reference.k_proj(b))
    assert torch.allclose(v, reference.v_proj(b))
    assert not block.q_proj._tuneplex_group.pending  # nothing left waiting after the group's calls


def test_dropout_or_a_disabled_adapter_leaves_the_group_path(monkeypatch):
    model = _model(dropout=0.5)
    fuse_lora_projections(model)
    calls = _count_nodes(monkeypatch)
    x = torch.randn(2, 12, dtype=torch.float64)
    model.train()
    model(x)
    assert calls == []  # peft's dropout per layer: the unfused path
    plain = _model()
    base = copy.deepcopy(plain.base_model.model[0])
    fuse_lora_projections(plain)
    with plain.disable_adapter():
        out = plain(x)
    assert calls == []
    for part, names in ((base.self_attn, ("q_proj", "k_proj", "v_proj", "o_proj")),
                        (base.mlp, ("gate_proj", "up_proj", "down_proj"))):
        for name in names:
            setattr(part, name, getattr(part, name).base_layer)
    assert torch.allclose(out, base(x))


@pytest.mark.parametrize("fused_optimizer", [False, True])
def test_kept_bf16_copies_follow_every_optimizer_step(fused_optimizer):
    """The copies are remade after each optimizer step (fused AdamW does not bump the weights'
    versions, foreach AdamW does): training with them equals training that casts at every call,
    step for step."""
    runs = []
    for keep in (True, False):
        model = _model(dtype=torch.bfloat16)
        for param in model.parameters():
            if param.requires_grad:
                param.data = param.data.float()
        fuse_lora_projections(model, keep_copies=keep)
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=1e-2, fused=fused_optimizer or None,
                                      foreach=None if fused_optimizer else True)
        optimizer.register_step_post_hook(lambda *_: forget_copies(model))  # as the trainer
        losses = []
        for step in range(3):
            x = torch.randn(2, 5, 12, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(step))
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(x).float().square().mean()
                # a second pass before the step (gradient accumulation) reuses the same copies
                loss = loss + model(x * 0.5).float().square().mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(float(loss))
        runs.append((losses, [p.detach().clone() for p in trainable]))
    (kept_losses, kept_weights), (cast_losses, cast_weights) = runs
    assert kept_losses == cast_losses
    assert len(set(kept_losses)) == 3  # the weights did change between steps
    for kept, cast in zip(kept_weights, cast_weights, strict=True):
        assert torch.equal(kept, cast)


def _tiny_llama():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(11)
    config = LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=50,
                         max_position_embeddings=64)
    model = get_peft_model(LlamaForCausalLM(config).double(), LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear"))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)
    return model


def test_projections_recompute_the_norm_output_instead_of_keeping_it():
    """On a (tiny) Llama: no saved tensor is an RMSNorm's output any more, and the losses and
    gradients are those of peft's own forward."""
    model = _tiny_llama()
    reference = copy.deepcopy(model)
    ids = torch.randint(0, 50, (2, 9))

    def run(m):
        norm_outputs, saved = [], set()  # the outputs held, so no address is reused
        hooks = [module.register_forward_hook(lambda _m, _i, out: norm_outputs.append(out))
                 for module in m.modules() if type(module).__name__ == "LlamaRMSNorm"]

        def pack(tensor):
            saved.add(tensor.untyped_storage().data_ptr())
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = m(input_ids=ids, labels=ids).loss
        for hook in hooks:
            hook.remove()
        loss.backward()
        grads = {n: p.grad for n, p in m.named_parameters() if p.requires_grad}
        kept = {out.untyped_storage().data_ptr() for out in norm_outputs} & saved
        return loss, grads, len(kept)

    ref_loss, ref_grads, kept_before = run(reference)
    fuse_lora_projections(model)
    assert recompute_norm_outputs(model) == 5  # two per layer and the final one
    loss, grads, kept_after = run(model)
    # before: the norms before attention and before the MLP of both layers (the final norm
    # feeds the frozen head, whose matmul keeps nothing)
    assert (kept_before, kept_after) == (4, 0)
    assert torch.allclose(loss, ref_loss, rtol=1e-12)
    for name, grad in grads.items():
        assert torch.allclose(grad, ref_grads[name], rtol=1e-9, atol=1e-12), name


class _NormThenProjections(torch.nn.Module):
    """A norm whose output is changed in place before q, k and v read it."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = torch.nn.RMSNorm(12)
        self.attn = _Attention(12, bias=False)

    def forward(self, x):
        h = self.norm(x)
        h.mul_(2.0)
        return self.attn(h)


def test_a_norm_output_changed_in_place_is_kept_not_recomputed():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(5)
    model = get_peft_model(_NormThenProjections().double(), LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj"]))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param)
    reference = copy.deepcopy(model)
    x = torch.randn(3, 12, dtype=torch.float64)
    _, ref_x, ref_grads = _run(reference, x)
    fuse_lora_projections(model)
    assert recompute_norm_outputs(model) == 1
    _, grad_x, grads = _run(model, x)
    assert torch.allclose(grad_x, ref_x, rtol=1e-10, atol=1e-12)
    for name, grad in grads.items():
        assert torch.allclose(grad, ref_grads[name], rtol=1e-10, atol=1e-12), name
