"""The fused head + loss and the one-addmm LoRA forward equal the plain computations (CPU)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from jobs.training.kernels import (
    chunked_linear_cross_entropy,
    fuse_lora_scale_add,
    fuse_swiglu_adapters,
    linear_cross_entropy,
)


def _plain(hidden, weight, labels):
    logits = (hidden @ weight.t()).to(torch.promote_types(hidden.dtype, torch.float32))
    return F.cross_entropy(logits, labels, reduction="sum"), (logits.argmax(-1) == labels).sum()


@pytest.mark.parametrize("chunk_rows", [1, 7, 64])
def test_chunked_head_loss_equals_the_full_logits_loss_and_gradients(chunk_rows):
    torch.manual_seed(0)
    hidden = torch.randn(37, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 50, (37,))
    loss, correct = chunked_linear_cross_entropy(hidden, weight, labels, chunk_rows=chunk_rows)
    (loss * 0.3).backward()  # a scale, as the trainer's 1/targets is
    ours = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    ref_loss, ref_correct = _plain(hidden, weight, labels)
    (ref_loss * 0.3).backward()
    assert torch.allclose(loss.double(), ref_loss.double(), rtol=1e-5)
    assert int(correct) == int(ref_correct)
    assert torch.allclose(ours[0], hidden.grad, rtol=1e-5, atol=1e-8)
    assert torch.allclose(ours[1], weight.grad, rtol=1e-5, atol=1e-8)


def test_a_frozen_linear_head_goes_through_the_fused_path_without_keeping_logits():
    torch.manual_seed(1)
    head = torch.nn.Linear(8, 30, bias=False).requires_grad_(False)
    hidden = torch.randn(12, 8, requires_grad=True)
    labels = torch.randint(0, 30, (12,))
    loss, correct = linear_cross_entropy(head, hidden, labels)
    # Only the hidden states' gradient is kept for backward (not a tokens x vocabulary tensor).
    saved = [t.numel() for t in loss.grad_fn.saved_tensors if t is not None]
    assert saved == [12 * 8]
    loss.backward()
    ref_hidden = hidden.detach().clone().requires_grad_()
    ref_loss, ref_correct = _plain(ref_hidden, head.weight, labels)
    ref_loss.backward()
    assert torch.allclose(loss, ref_loss, rtol=1e-5)
    assert int(correct) == int(ref_correct)
    assert torch.allclose(hidden.grad, ref_hidden.grad, rtol=1e-4, atol=1e-6)


def test_an_adapted_or_biased_head_uses_the_plain_logits():
    head = torch.nn.Linear(8, 30, bias=True)
    hidden, labels = torch.randn(5, 8), torch.randint(0, 30, (5,))
    loss, correct = linear_cross_entropy(head, hidden, labels)
    ref_loss = F.cross_entropy(head(hidden).float(), labels, reduction="sum")
    assert torch.allclose(loss, ref_loss) and 0 <= int(correct) <= 5


def test_no_target_tokens_give_a_zero_loss_that_still_backpropagates():
    head = torch.nn.Linear(8, 30, bias=False).requires_grad_(False)
    hidden = torch.randn(0, 8, requires_grad=True)
    loss, correct = linear_cross_entropy(head, hidden, torch.zeros(0, dtype=torch.long))
    loss.backward()
    assert float(loss) == 0.0 and int(correct) == 0


def test_the_one_addmm_lora_forward_equals_peft_forward_and_gradients():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(2)
    base = torch.nn.Sequential(torch.nn.Linear(16, 24), torch.nn.ReLU(), torch.nn.Linear(24, 8))
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"],
                                            lora_dropout=0.0))
    for name, param in model.named_parameters():
        if "lora_B" in name:  # peft starts B at zero; make the adapter matter
            torch.nn.init.normal_(param)
    x = torch.randn(3, 5, 16)
    reference = model(x)
    reference.square().sum().backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    assert fuse_lora_scale_add(model) == 2
    out = model(x)
    out.square().sum().backward()
    assert torch.allclose(out, reference, atol=1e-5)
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert torch.allclose(param.grad, ref_grads[name], rtol=1e-4, atol=1e-5), name


def test_the_fused_lora_forward_steps_aside_when_the_adapter_is_disabled():
    from peft import LoraConfig, get_peft_model

    base = torch.nn.Sequential(torch.nn.Linear(6, 6))
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["0"], lora_dropout=0.0))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param)
    fuse_lora_scale_add(model)
    x = torch.randn(2, 6)
    with model.disable_adapter():
        assert torch.allclose(model(x), base[0].base_layer(x))


class _SwiGLU(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate_proj = torch.nn.Linear(12, 40, bias=False)
        self.up_proj = torch.nn.Linear(12, 40, bias=False)
        self.down_proj = torch.nn.Linear(40, 12, bias=False)
        self.act_fn = torch.nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def test_the_swiglu_mlp_keeps_no_product_and_gives_peft_outputs_and_gradients():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(4)
    model = get_peft_model(torch.nn.Sequential(_SwiGLU()),
                           LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                      target_modules=["gate_proj", "up_proj", "down_proj"]))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param)
    x = torch.randn(2, 7, 12, requires_grad=True)

    def kept_wide_tensors(run):
        storages: set[int] = set()

        def pack(tensor):
            if tensor.shape[-1] == 40 and tensor.numel() == 14 * 40:  # activations, not weights
                storages.add(tensor.untyped_storage().data_ptr())
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = run(x)
        return out, len(storages)

    reference, kept_before = kept_wide_tensors(model)
    reference.square().sum().backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    ref_x = x.grad.clone()
    model.zero_grad()
    x.grad = None
    fuse_lora_scale_add(model)
    assert fuse_swiglu_adapters(model) == 1
    out, kept_after = kept_wide_tensors(model)
    assert (kept_before, kept_after) == (4, 3)  # gate, silu(gate), up; no longer the product
    out.square().sum().backward()
    assert torch.allclose(out, reference, atol=1e-5)
    assert torch.allclose(x.grad, ref_x, rtol=1e-4, atol=1e-5)
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert torch.allclose(param.grad, ref_grads[name], rtol=1e-4, atol=1e-5), name
