"""Fused kernels for the training step. The only module that imports liger-kernel, behind an
availability check; without it (and on the CPU, where the tests run) the plain modules run.

* :func:`linear_cross_entropy`: the output head and the loss over target tokens without ever
  holding the full-vocabulary logits, Liger's fused-linear-cross-entropy idea in plain torch: per
  chunk of rows, logits -> loss, accuracy and the gradient of the hidden states, computed in the
  forward pass (the loss is the last op, so its gradient is known up to the scalar the backward
  pass multiplies in). For Llama-3's 128k vocabulary at 7k target tokens the full logits with their
  gradient were about 9 GB. Liger's own Triton version measured no faster on an H200 (the head is
  ~3% of an 8B step), recompiled for new shapes mid-run (a 2.5 s step) and synchronises on an
  ``.item()``, so this one runs everywhere (benchmarks/RESULTS.md, GPU run 3).
* :func:`apply_fused_kernels`: Liger's RMSNorm, SwiGLU and RoPE kernels on the model's modules
  (fewer, fused elementwise kernels; RMSNorm and SwiGLU also keep fewer tensors for backward).
* :func:`fuse_lora_scale_add`: peft computes ``base + lora_B(lora_A(x)) * scaling`` as a matmul, a
  full-width scale and a full-width add (QLoRA: and a defensive clone); here the scale and the add
  are the epilogue of the ``lora_B`` matmul (one ``addmm``). The trainer runs
  :mod:`jobs.training.projections` instead, which falls back to this forward for layers it does
  not handle (adapter dropout, several adapters).
"""

from __future__ import annotations

import importlib.util
from functools import cache
from types import MethodType

import torch
import torch.nn.functional as F

from jobs.training.data import IGNORE_INDEX

# Rows of logits per chunk in the torch version: about this many bytes of fp32 logits at a time.
CHUNK_LOGIT_BYTES = 256 * 2**20


@cache
def liger_available() -> bool:
    """liger-kernel is installed and a CUDA GPU is visible (its kernels are Triton, CUDA only)."""
    return torch.cuda.is_available() and importlib.util.find_spec("liger_kernel") is not None


def liger_version() -> str | None:
    if not liger_available():
        return None
    from importlib.metadata import version

    return version("liger-kernel")


# --- output head + cross-entropy -----------------------------------------------------------------


def linear_cross_entropy(head: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor,
                         reduction: str = "sum", *, ignored: bool = False
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of token losses, correct argmax predictions) of ``head(hidden)`` against ``labels``;
    with ``reduction="none"`` each token's loss instead of the sum (DPO sums them per sequence).

    ``hidden`` (tokens, width) holds only the target positions, or, with ``ignored``, every
    position, those without loss labelled ``IGNORE_INDEX`` (-100): they add nothing to the loss,
    the count or the gradient. That costs the head's matmuls on rows without loss but keeps the
    shapes fixed (no selection of a data-dependent number of rows), which CUDA graphs need.
    A plain bias-free ``nn.Linear``
    head (the usual, frozen) goes through a fused path that never materialises all the logits;
    anything else (an adapted head, a biased one, per-token losses of a trained head) through the
    plain logits.
    """
    weight = getattr(head, "weight", None)
    per_token = reduction == "none"
    if (type(head) is not torch.nn.Linear or head.bias is not None or weight is None
            or not weight.is_floating_point() or (per_token and weight.requires_grad)):
        logits = head(hidden).float()
        return (F.cross_entropy(logits, labels, reduction=reduction),
                (logits.detach().argmax(-1) == labels).sum())
    hidden = hidden.to(weight.dtype)  # what autocast does for the head's matmul
    if hidden.shape[0] == 0:
        zero = hidden.sum(-1) * 0.0 if per_token else hidden.sum() * 0.0
        return zero.float(), torch.zeros((), dtype=torch.long, device=hidden.device)
    return chunked_linear_cross_entropy(hidden, weight, labels, per_token=per_token,
                                        ignored=ignored)


def chunked_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor,
                                 labels: torch.Tensor, chunk_rows: int | None = None, *,
                                 per_token: bool = False, ignored: bool = False
                                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The torch fused head + loss: (loss sum, or each token's loss with ``per_token``; correct)
    with at most one chunk of logits alive. Per token, the head's weight gets no gradient (the
    gradient of a row depends on the weight the backward pass brings for its loss). With
    ``ignored``, rows labelled ``IGNORE_INDEX`` count for nothing (see
    :func:`linear_cross_entropy`)."""
    rows = chunk_rows or max(1, CHUNK_LOGIT_BYTES // (4 * weight.shape[0]))
    return _ChunkedLinearCrossEntropy.apply(hidden, weight, labels, rows, per_token, ignored)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_rows, per_token=False, ignored=False):
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if per_token and want_weight:
            raise ValueError("per-token losses of a trained head need the plain logits path")
        exact = torch.promote_types(hidden.dtype, torch.float32)  # fp32 logits, fp64 in tests
        loss = torch.zeros(hidden.shape[0] if per_token else (), dtype=exact, device=hidden.device)
        correct = torch.zeros((), dtype=torch.long, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=exact) if want_weight else None
        for start in range(0, hidden.shape[0], chunk_rows):
            rows = hidden[start:start + chunk_rows]
            target = labels[start:start + chunk_rows]
            counted = None
            if ignored:  # an ignored row scores nothing: any class, its loss and gradient zeroed
                counted = (target != IGNORE_INDEX).to(exact)
                target = target.clamp_min(0)
            logits = (rows @ weight.t()).to(exact)
            lse = torch.logsumexp(logits, dim=-1)
            token_loss = lse - logits.gather(1, target[:, None]).squeeze(1)
            if counted is not None:
                token_loss = token_loss * counted
            if per_token:
                loss[start:start + chunk_rows] = token_loss
            else:
                loss += token_loss.sum()
            hits = logits.argmax(-1) == target
            correct += (hits & (counted > 0) if counted is not None else hits).sum()
            if not (want_hidden or want_weight):
                continue
            # d(sum of losses)/d(logits) = softmax - one_hot, built in the logits' own buffer.
            grad_logits = logits.sub_(lse[:, None]).exp_()
            grad_logits[torch.arange(rows.shape[0], device=rows.device), target] -= 1.0
            if counted is not None:
                grad_logits.mul_(counted[:, None])
            grad_logits = grad_logits.to(weight.dtype)
            if want_hidden:
                grad_hidden[start:start + chunk_rows] = grad_logits @ weight
            if want_weight:
                grad_weight += (grad_logits.t() @ rows).to(exact)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        ctx.per_token = per_token
        ctx.mark_non_differentiable(correct)
        return loss, correct

    @staticmethod
    def backward(ctx, grad_loss, _grad_correct):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            scale = grad_loss.to(grad_hidden.dtype)
            grad_hidden = grad_hidden * (scale[:, None] if ctx.per_token else scale)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_loss).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None, None


# --- fused elementwise kernels -------------------------------------------------------------------


def apply_fused_kernels(model) -> bool:
    """Liger's RMSNorm, SwiGLU MLP and RoPE on a (not yet adapted) transformers model, where
    liger-kernel supports its architecture. Returns whether anything was applied."""
    if not liger_available():
        return False
    from liger_kernel.transformers import _apply_liger_kernel_to_instance
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    if getattr(model.config, "model_type", None) not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        return False
    _apply_liger_kernel_to_instance(model=model, rope=True, rms_norm=True, swiglu=True,
                                    cross_entropy=False, fused_linear_cross_entropy=False)
    return True


def fuse_lora_scale_add(model) -> int:
    """Give every peft LoRA linear layer (plain and 4-bit) the one-``addmm`` forward; returns
    how many layers got it. Layers in any other state fall back to peft's own forward."""
    classes = lora_layer_classes()
    count = 0
    for module in model.modules():
        if isinstance(module, classes):
            module.forward = MethodType(_lora_forward, module)
            count += 1
    return count


def lora_layer_classes() -> tuple[type, ...]:
    """peft's LoRA linear layer classes: plain, and 4-bit where bitsandbytes can run."""
    from peft.tuners.lora import Linear as LoraLinear

    classes: tuple[type, ...] = (LoraLinear,)
    if importlib.util.find_spec("bitsandbytes") is not None and torch.cuda.is_available():
        from peft.tuners.lora.bnb import Linear4bit

        classes += (Linear4bit,)
    return classes


def _lora_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """``base(x) + scaling * lora_B(lora_A(dropout(x)))`` with the scale and the add inside the
    ``lora_B`` matmul. Under autocast addmm casts to bf16 like peft's own modules do; without
    autocast the dtypes must already agree (fp32 on the CPU), else peft's forward runs."""
    adapters = self.active_adapters
    name = adapters[0] if len(adapters) == 1 else None
    if (args or kwargs or self.disable_adapters or self.merged or name is None
            or name not in self.lora_A or name in self.lora_variant
            or self.lora_B[name].bias is not None):
        return type(self).forward(self, x, *args, **kwargs)
    result = self.base_layer(x)
    down = self.lora_A[name](self.lora_dropout[name](x))
    up = self.lora_B[name].weight
    if not torch.is_autocast_enabled(x.device.type) and not (
            result.dtype == down.dtype == up.dtype):
        return type(self).forward(self, x)
    fused = torch.addmm(result.reshape(-1, result.shape[-1]), down.reshape(-1, down.shape[-1]),
                        up.t(), alpha=self.scaling[name])
    return fused.view(result.shape)


# --- SwiGLU MLP: the down projection's adapter without keeping its input ------------------------


def fuse_swiglu_adapters(model) -> int:
    """Give every SwiGLU MLP (gate, up, down projections with SiLU) whose ``down_proj`` is a
    plain LoRA layer a forward that keeps nothing of width ``intermediate`` but the gate and up
    outputs (which SwiGLU's backward needs anyway). Returns how many MLPs got it.

    The product ``silu(gate) * up`` is the down projection's input: its frozen base weight needs
    no copy of it for the backward pass, but ``lora_A``'s weight gradient does, so autograd kept a
    third tensor of width ``intermediate`` per token per layer: 28 KB a token a layer on an 8B
    model, a fifth of a layer's activations. Here ``lora_A``'s gradient recomputes the product from
    the gate and up outputs (one elementwise pass in the backward) instead.
    """
    count = 0
    for module in model.modules():
        if all(hasattr(module, name) for name in ("gate_proj", "up_proj", "down_proj", "act_fn")) \
                and type(module.act_fn).__name__ in ("SiLU", "SiLUActivation") \
                and _plain_adapter(module.down_proj) is not None:
            module._tuneplex_unfused_forward = module.forward
            module.forward = MethodType(_swiglu_mlp_forward, module)
            count += 1
    return count


def _plain_adapter(layer) -> str | None:
    """The adapter name if ``layer`` is a LoRA linear layer in the state the fast paths handle."""
    from peft.tuners.lora import LoraLayer

    if not isinstance(layer, LoraLayer) or layer.disable_adapters or layer.merged:
        return None
    adapters = layer.active_adapters
    name = adapters[0] if len(adapters) == 1 else None
    if (name is None or name not in layer.lora_A or name in layer.lora_variant
            or layer.lora_B[name].bias is not None
            or not isinstance(layer.lora_dropout[name], torch.nn.Identity)
            or not isinstance(layer.base_layer, torch.nn.Linear)
            or layer.base_layer.weight.requires_grad):
        return None
    return name


def _silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    if gate.is_cuda and liger_available():
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction

        return LigerSiLUMulFunction.apply(gate, up)
    return F.silu(gate) * up


def _swiglu_mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    down = self.down_proj
    name = _plain_adapter(down)
    if name is None:
        return self._tuneplex_unfused_forward(x)
    gate, up = self.gate_proj(x), self.up_proj(x)
    product = _silu_mul(gate, up)
    result = down.base_layer(product)
    low = _AdapterOfSwiGLU.apply(product, gate, up, down.lora_A[name].weight)
    fused = torch.addmm(result.reshape(-1, result.shape[-1]), low.reshape(-1, low.shape[-1]),
                        down.lora_B[name].weight.t(), alpha=down.scaling[name])
    return fused.view(result.shape)


class _AdapterOfSwiGLU(torch.autograd.Function):
    """``lora_A(silu(gate) * up)`` given the product, keeping gate and up instead of the product."""

    @staticmethod
    def forward(ctx, product, gate, up, weight):
        compute = torch.get_autocast_dtype(product.device.type) if torch.is_autocast_enabled(
            product.device.type) else product.dtype
        ctx.save_for_backward(gate, up, weight)
        ctx.compute = compute
        return F.linear(product.to(compute), weight.to(compute))

    @staticmethod
    def backward(ctx, grad_low):
        gate, up, weight = ctx.saved_tensors
        with torch.no_grad():
            product = (F.silu(gate) * up).to(ctx.compute)
        grad_low = grad_low.to(ctx.compute)
        grad_product = grad_low @ weight.to(ctx.compute)
        grad_weight = (grad_low.reshape(-1, grad_low.shape[-1]).t()
                       @ product.reshape(-1, product.shape[-1])).to(weight.dtype)
        return grad_product.to(gate.dtype), None, None, grad_weight
