"""LoRA projections computed as one autograd node per input.

q, k and v of an attention block read the same normalised hidden states, and so do gate and up
of a SwiGLU MLP; every other adapted projection is a group of one. For each LoRA layer, peft's
forward (even with :func:`jobs.training.kernels.fuse_lora_scale_add`) is a base matmul, the
adapter's two matmuls with their fp32 weights cast to bf16 under autocast, and autograd records
five nodes for it. In the backward pass the base's and the adapter's input gradients are then
added by a separate full-width kernel, and q's, k's and v's by two more. :class:`_Projections`
runs a group as one node:

* forward: ``low = x @ A^T`` once for the group (A: the members' ``lora_A`` stacked), then per
  member ``y_i = base_i(x) + s_i * low_i @ B_i^T`` with the scale and the add as the epilogue of
  the ``lora_B`` matmul;
* backward: ``grad_low_i = s_i * g_i @ B_i``, ``grad_B_i = s_i * g_i^T @ low_i``,
  ``grad_A = grad_low^T @ x`` (one matmul), and ``grad_x = sum_i g_i @ W_i + grad_low @ A``
  accumulated in place in one buffer.

It keeps what autograd kept (x and the low-rank product, tokens x group rank) and computes the
same products in the same dtypes (bf16 under autocast, the adapter's gradients returned in its
weights' dtype). QLoRA's 4-bit base layers run their own forward (bitsandbytes' 4-bit GEMM) and,
for the input gradient, the weight dequantised, as bitsandbytes' autograd function does. For QLoRA
at micro-batch 1 the step is bound by the host launching kernels (benchmarks/RESULTS.md, GPU run
4: 4,652 launches a step, the GPU busy 24% of it), so fewer nodes and kernels are the lever.

A member is called by the model as usual (``self.q_proj(x)``, ``self.k_proj(x)``, ...): the call
of the first member computes the whole group and keeps the others' outputs until they are asked
for with the same input tensor; a member called on another input (cross-attention's k and v)
computes only itself. Layers in a state the fast path does
not handle (dropout on the adapter's input, several or no active adapters, merged, disabled) run
:func:`jobs.training.kernels.fuse_lora_scale_add`'s forward, which falls back to peft's.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MethodType

import torch

from jobs.training.kernels import _lora_forward, _plain_adapter, lora_layer_classes

# Attribute names of the projections that an architecture applies to one input, in call order.
SHARED_INPUT = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def fuse_lora_projections(model, *, keep_copies: bool = True) -> int:
    """Give every LoRA linear layer of ``model`` the grouped forward; returns how many layers
    are in a group of more than one. ``keep_copies``: each group keeps its adapter weights' copy
    in the compute dtype (bf16: 2 bytes a LoRA parameter) until the weights change, instead of
    casting them at every call (forward and recomputation): call :func:`forget_copies` after
    each optimizer step. Not where FSDP gathers the weights for each forward (sharded: its mixed
    precision casts them)."""
    classes = lora_layer_classes()
    grouped: set[int] = set()
    for module in model.modules():
        for names in SHARED_INPUT:
            members = [getattr(module, name, None) for name in names]
            if all(isinstance(member, classes) for member in members):
                _install(_Group(members, keep_copies))
                grouped.update(id(member) for member in members)
    for module in model.modules():
        if isinstance(module, classes) and id(module) not in grouped:
            _install(_Group([module], keep_copies))
    return len(grouped)


def forget_copies(model) -> None:
    """Drop the kept adapter copies: the trainer calls it after each optimizer step (fused
    AdamW updates the weights without bumping their version, so the copies cannot tell)."""
    for module in model.modules():
        group = vars(module).get("_tuneplex_group")
        if group is not None:
            group.copies = None


def _install(group: _Group) -> None:
    for layer in group.layers:
        layer._tuneplex_group = group
        layer.forward = MethodType(_grouped_forward, layer)


def _grouped_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    return self._tuneplex_group.output(self, x, *args, **kwargs)


class _Group:
    """LoRA layers that the model applies to the same input one after another."""

    def __init__(self, layers: list, keep_copies: bool = False) -> None:
        self.layers = layers
        self.keep_copies = keep_copies
        self.pending: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(layer): (x, output)
        self.copies: tuple[tuple, _Copies] | None = None  # (what they are of, the copies)

    def output(self, layer, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if not args and not kwargs:
            kept = self.pending.pop(id(layer), None)
            if kept is not None and kept[0] is x:
                return kept[1]
        self.pending.clear()
        # The first member computes the group; another one, called without its output waiting
        # (its input differs from the first's), only itself.
        layers = self.layers if layer is self.layers[0] else [layer]
        name = self._adapter(layers)
        compute = _compute_dtype(x, layers)
        if args or kwargs or name is None or compute is None:
            return _lora_forward(layer, x, *args, **kwargs)
        outputs = project(x, layers, name, self._copies(layers, name, compute))
        for other, out in zip(layers[1:], outputs[1:], strict=True):
            self.pending[id(other)] = (x, out)
        return outputs[0]

    def _copies(self, layers, name: str, compute: torch.dtype) -> _Copies:
        """The adapter weights in ``compute``: kept from the last call until
        :func:`forget_copies` or a weight's version changes (a load, an in-place update)."""
        weights = [w for layer in layers for w in (layer.lora_A[name].weight,
                                                    layer.lora_B[name].weight)]
        key = (compute, *((id(w), w._version) for w in weights))
        if self.copies is not None and self.copies[0] == key:
            return self.copies[1]
        copies = _Copies.of(weights, compute)
        self.copies = (key, copies) if self.keep_copies else None
        return copies

    @staticmethod
    def _adapter(layers) -> str | None:
        names = {_plain_adapter(layer) for layer in layers}
        return names.pop() if len(names) == 1 else None


def _compute_dtype(x: torch.Tensor, layers) -> torch.dtype | None:
    """The dtype the group computes in: autocast's, else the input's; None where a plain base
    weight is in another dtype (the unfused path casts as autocast would)."""
    compute = (torch.get_autocast_dtype(x.device.type)
               if torch.is_autocast_enabled(x.device.type) else x.dtype)
    for layer in layers:
        weight = layer.base_layer.weight
        if getattr(weight, "quant_state", None) is None and weight.dtype != compute:
            return None
    return compute


class _Copies:
    """A group's adapter weights in the compute dtype: the lora_A matrices stacked (one matmul
    for the group) and each lora_B. Made without autograd: the gradients go to the weights
    themselves (:class:`_Projections` returns them)."""

    def __init__(self, down: torch.Tensor, up: list[torch.Tensor], ranks: list[int]) -> None:
        self.down, self.up, self.ranks = down, up, ranks

    @classmethod
    @torch.no_grad()
    def of(cls, weights: list[torch.Tensor], compute: torch.dtype) -> _Copies:
        down = [w.to(compute) for w in weights[0::2]]
        return cls(torch.cat(down) if len(down) > 1 else down[0],
                   [w.to(compute) for w in weights[1::2]], [w.shape[0] for w in down])


def project(x: torch.Tensor, layers, name: str, copies: _Copies) -> list[torch.Tensor]:
    """Each layer's output on ``x`` (base plus adapter ``name``), through one autograd node.
    Where ``x`` is an RMSNorm's output (:func:`recompute_norm_outputs`), the node keeps the
    norm's input, which the norm keeps anyway, and normalises it again in the backward pass."""
    rows = x.reshape(-1, x.shape[-1])
    norm, norm_input, version = getattr(x, NORMALISED, (None, None, None))
    if norm is not None and x._version != version:  # changed in place since: keep it
        norm = norm_input = None
    device = x.device.type
    spec = _Spec(bases=tuple(layer.base_layer for layer in layers),
                 scales=tuple(float(layer.scaling[name]) for layer in layers), copies=copies,
                 norm=norm, autocast=(torch.is_autocast_enabled(device),
                                      torch.get_autocast_dtype(device)))
    adapters = [w for layer in layers
                for w in (layer.lora_A[name].weight, layer.lora_B[name].weight)]
    outputs = _Projections.apply(rows, norm_input, spec, *adapters)
    return [out.view(*x.shape[:-1], out.shape[-1]) for out in outputs]


# --- normalised inputs: recomputed, not kept ------------------------------------------------------

# on an RMSNorm's output: (the norm, its input, the output's version when it was made)
NORMALISED = "_tuneplex_normalised"


def recompute_norm_outputs(model) -> int:
    """Let grouped projections recompute the RMSNorm output they read instead of keeping it:
    every RMSNorm module of ``model`` marks its output with itself and its input. The norm
    (Liger's or the model's own) keeps its input for its own backward pass, so the projections'
    copy of the normalised value, the hidden width per token, twice a layer (before attention and
    before the MLP), is no longer kept: 16 KB a token a layer on an 8B model, a seventh of what a
    layer keeps. Returns how many norms were marked."""
    count = 0
    for module in model.modules():
        if type(module).__name__.endswith("RMSNorm") and "_tuneplex_norm_forward" not in vars(module):
            module._tuneplex_norm_forward = module.forward
            module.forward = MethodType(_marked_norm_forward, module)
            count += 1
    return count


def _marked_norm_forward(self, x: torch.Tensor) -> torch.Tensor:
    out = self._tuneplex_norm_forward(x)
    if torch.is_grad_enabled():
        setattr(out, NORMALISED, (self, x, out._version))
    return out


def _normalise_again(spec: _Spec, norm_input: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The norm's output as the forward pass computed it: the same module on the same input
    under the same autocast state."""
    enabled, autocast_dtype = spec.autocast
    with torch.no_grad(), torch.autocast(norm_input.device.type, dtype=autocast_dtype,
                                         enabled=enabled):
        out = spec.norm._tuneplex_norm_forward(norm_input)
    return out.reshape(-1, out.shape[-1]).to(dtype)


def _base_weight(base: torch.nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """A frozen base layer's weight as a dense (out, in) matrix: 4-bit weights dequantised."""
    weight = base.weight
    state = getattr(weight, "quant_state", None)
    if state is None:
        return weight.to(dtype)
    import bitsandbytes.functional as bnb_functional

    return bnb_functional.dequantize_4bit(weight.data, state).to(dtype)


@dataclass(frozen=True)
class _Spec:
    """What :class:`_Projections` needs besides tensors."""

    bases: tuple
    scales: tuple[float, ...]
    copies: _Copies
    norm: torch.nn.Module | None  # recompute the input from the norm's input, or keep it
    autocast: tuple[bool, torch.dtype]


class _Projections(torch.autograd.Function):
    """``y_i = base_i(x) + s_i * (x @ A_i^T) @ B_i^T`` for a group sharing ``x`` (tokens, in)."""

    @staticmethod
    def forward(ctx, x, norm_input, spec: _Spec, *adapters):
        copies = spec.copies
        with torch.autocast(x.device.type, enabled=False):
            rows = x.to(copies.down.dtype)
            low = rows @ copies.down.t()
            outputs = []
            for base, up, low_i, scale in zip(spec.bases, copies.up,
                                              low.split(copies.ranks, dim=1), spec.scales,
                                              strict=True):
                result = base(rows).to(rows.dtype)  # frozen: no graph inside a Function anyway
                outputs.append(result.addmm_(low_i, up.t(), alpha=scale))
        recompute = spec.norm is not None
        ctx.save_for_backward(norm_input if recompute else rows, low, copies.down, *copies.up)
        ctx.spec, ctx.recompute = spec, recompute
        ctx.input_dtype, ctx.compute = x.dtype, rows.dtype
        ctx.adapter_dtypes = [w.dtype for w in adapters]
        return tuple(outputs)

    @staticmethod
    def backward(ctx, *grads):
        kept, low, stacked, *up = ctx.saved_tensors
        spec = ctx.spec
        rows = _normalise_again(spec, kept, ctx.compute) if ctx.recompute else kept
        want_input = ctx.needs_input_grad[0]
        grad_low, grad_up, grad_input = [], [], None
        for grad, base, up_i, low_i, scale in zip(grads, spec.bases, up,
                                                  low.split(spec.copies.ranks, 1), spec.scales,
                                                  strict=True):
            if grad is None:  # an output nothing used
                grad = rows.new_zeros(rows.shape[0], up_i.shape[0])
            grad = grad.to(rows.dtype)
            grad_low.append(grad @ (up_i * scale))
            grad_up.append((grad.t() @ low_i).mul_(scale))
            if want_input:
                weight = _base_weight(base, rows.dtype)
                grad_input = grad @ weight if grad_input is None else grad_input.addmm_(grad, weight)
        grad_low = torch.cat(grad_low, dim=1) if len(grad_low) > 1 else grad_low[0]
        if want_input:
            grad_input = grad_input.addmm_(grad_low, stacked).to(ctx.input_dtype)
        grad_down = (grad_low.t() @ rows).split(spec.copies.ranks, dim=0)
        adapter_grads = []
        for index, (down_i, up_i) in enumerate(zip(grad_down, grad_up, strict=True)):
            wanted = ctx.needs_input_grad[3 + 2 * index: 5 + 2 * index]
            adapter_grads += [down_i.to(ctx.adapter_dtypes[2 * index]) if wanted[0] else None,
                              up_i.to(ctx.adapter_dtypes[2 * index + 1]) if wanted[1] else None]
        return (grad_input, None, None, *adapter_grads)
