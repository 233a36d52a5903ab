"""Variable-length attention for packed rows: each example attends only to itself, no mask.

A packed micro-batch is one row of concatenated examples. With transformers' sdpa, a packed row
gets a block-diagonal mask, which rules out sdpa's flash kernel: the row is attended as a whole
(quadratic in the row's length) through the masked kernel, and on CUDA packing lost to padding
(benchmarks/RESULTS.md). PyTorch's own flash varlen kernel (``torch.nn.attention.varlen``) takes
the example boundaries instead (``cu_seqlens``: 0, l1, l1+l2, ...) and computes only each
example's causal triangle.

It is plugged into transformers through its ``AttentionInterface`` under the name :data:`VARLEN`;
the trainer passes the boundaries as the ``cu_seq_lens_q/k`` and ``max_length_q/k`` keyword
arguments, which transformers hands down to every attention call (the names its flash-attention
integration uses). No mask function is registered for it, so transformers builds no mask at all
(its documented path for attention kernels that need none): the boundaries are the mask.

Off CUDA, or where PyTorch has no varlen kernel, the same function runs the examples one at a
time through sdpa: correct but slow, which is what the CPU tests need.
"""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Sequence
from functools import cache
from typing import Any

import torch
import torch.nn.functional as F

VARLEN = "tuneplex_varlen"


def cu_seqlens(lengths: Sequence[int]) -> torch.Tensor:
    """Cumulative example boundaries of a packed row, as the kernel wants them: int32, [0, ...]."""
    if not lengths or min(lengths) < 1:
        raise ValueError("a packed row needs examples of at least one token")
    bounds = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    bounds[1:] = torch.tensor(list(lengths), dtype=torch.int64).cumsum(0)
    return bounds


@cache
def _varlen_kernel() -> tuple[Any, dict[str, Any]] | None:
    """PyTorch's varlen_attn and the keyword arguments that make it causal with GQA, or None.

    Its signature moved between releases: ``is_causal=True`` in the first ones became
    ``window_size=(-1, 0)`` (2.11 has the latter), and grouped-query heads need
    ``enable_gqa=True`` where that argument exists (2.13); without it the flash kernel takes them
    natively (checked on 2.11 against attending each example separately).
    """
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    kwargs: dict[str, Any] = {}
    if "window_size" in params:
        kwargs["window_size"] = (-1, 0)
    elif "is_causal" in params:
        kwargs["is_causal"] = True
    else:
        return None
    if "enable_gqa" in params:
        kwargs["enable_gqa"] = True
    return varlen_attn, kwargs


def varlen_kernel_available() -> bool:
    """Whether packed rows can use the flash varlen kernel here (CUDA and a PyTorch that has it)."""
    return torch.cuda.is_available() and _varlen_kernel() is not None


def varlen_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                             value: torch.Tensor, attention_mask: torch.Tensor | None,
                             dropout: float = 0.0, scaling: float | None = None, **kwargs: Any
                             ) -> tuple[torch.Tensor, None]:
    """transformers attention function: (1, heads, tokens, dim) in, (1, tokens, heads, dim) out."""
    bounds = kwargs.get("cu_seq_lens_q")
    longest = kwargs.get("max_length_q")
    if bounds is None or longest is None:
        raise ValueError(f"{VARLEN} attention needs cu_seq_lens_q and max_length_q (a packed row)")
    if query.shape[0] != 1 or attention_mask is not None:
        raise ValueError(f"{VARLEN} attention takes one packed row and no attention mask")
    if dropout:
        raise ValueError(f"{VARLEN} attention has no attention dropout")
    # (1, heads, tokens, dim) -> (tokens, heads, dim): a view, the last dim stays contiguous.
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))
    kernel = _varlen_kernel() if q.is_cuda else None
    if kernel is not None:
        varlen_attn, causal_kwargs = kernel
        dtype = _kernel_dtype(q)
        q, k, v = (t.to(dtype) for t in (q, k, v))
        out = varlen_attn(q, k, v, bounds, bounds, int(longest), int(longest), scale=scaling,
                          **causal_kwargs)
    else:
        out = _one_example_at_a_time(q, k, v, bounds, scaling)
    return out.unsqueeze(0), None


def _kernel_dtype(q: torch.Tensor) -> torch.dtype:
    """The flash kernel takes fp16/bf16 only. Under autocast, fp32 inputs (QLoRA keeps the hidden
    states in fp32, and the rotary embedding keeps q and k there) are cast to autocast's dtype, as
    autocast itself does for sdpa."""
    if q.dtype in (torch.float16, torch.bfloat16):
        return q.dtype
    if torch.is_autocast_enabled(q.device.type):
        return torch.get_autocast_dtype(q.device.type)
    raise ValueError(f"{VARLEN} attention on CUDA needs fp16/bf16 inputs or autocast, "
                     f"not {q.dtype}")


def _one_example_at_a_time(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           bounds: torch.Tensor, scaling: float | None) -> torch.Tensor:
    groups = q.shape[1] // k.shape[1]
    outputs = []
    edges = bounds.tolist()
    for start, end in itertools.pairwise(edges):
        if end == start:  # an empty example (a row padded to its exact length, data.pad_packed)
            continue
        # (tokens, heads, dim) -> (heads, tokens, dim) for sdpa; repeat key/value heads for GQA.
        qs = q[start:end].transpose(0, 1)
        ks = k[start:end].transpose(0, 1).repeat_interleave(groups, dim=0)
        vs = v[start:end].transpose(0, 1).repeat_interleave(groups, dim=0)
        outputs.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scaling)
                       .transpose(0, 1))
    return torch.cat(outputs, dim=0)


def register_varlen_attention() -> str:
    """Make :data:`VARLEN` a valid ``attn_implementation`` (idempotent) and return the name."""
    from transformers import AttentionInterface

    AttentionInterface.register(VARLEN, varlen_attention_forward)
    return VARLEN


def packed_attention_kwargs(bounds: torch.Tensor, longest: int) -> dict[str, Any]:
    """The keyword arguments that carry a packed row's boundaries down to the attention calls."""
    return {"cu_seq_lens_q": bounds, "cu_seq_lens_k": bounds,
            "max_length_q": longest, "max_length_k": longest}
