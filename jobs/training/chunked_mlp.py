"""The MLP run over the sequence a chunk of tokens at a time, where a whole pass does not fit.

An MLP treats every token on its own, so its output for a chunk of tokens is its output on the
chunk. At long lengths its intermediate tensors are the largest a layer makes: on an 8B Llama
(intermediate width 14,336) gate and up outputs are 57 KB a token, 7.5 GB at 128k tokens, and its
backward pass needs about as much again for their gradients (:data:`jobs.training.memory`
counts both). :class:`_ChunkedMLP` keeps only the MLP's input: the forward pass runs the chunks
without a graph; the backward pass runs each chunk again with one, back-propagates it, and frees
it before the next (the "tiled MLP" of Snowflake's Arctic long-sequence training). The price is
one more forward pass of the MLP; the memory of its intermediates is a chunk's, whatever the
length.

Installed on a model's MLP modules by :func:`install` and switched per pass by
:func:`set_chunk_tokens` (0: off, the MLP's own forward). The MLP's trainable parameters (its
adapters) are inputs of the node, so their gradients flow through autograd as usual.
"""

from __future__ import annotations

from types import MethodType

import torch

from jobs.training.offload import ReplayState

CHUNK_TOKENS = "_tuneplex_mlp_chunk_tokens"  # on each MLP module: tokens per chunk, 0 = whole
_UNCHUNKED = "_tuneplex_unchunked_forward"


def mlp_modules(model) -> list[torch.nn.Module]:
    """The SwiGLU MLPs of a decoder (gate, up and down projections)."""
    return [m for m in model.modules()
            if all(hasattr(m, name) for name in ("gate_proj", "up_proj", "down_proj"))]


def install(model) -> int:
    """Let every MLP of ``model`` run chunked (off until :func:`set_chunk_tokens`); returns
    how many. Install after anything else that replaces the MLP's forward."""
    modules = mlp_modules(model)
    for module in modules:
        if _UNCHUNKED not in vars(module):
            setattr(module, _UNCHUNKED, module.forward)
            setattr(module, CHUNK_TOKENS, 0)
            module.forward = MethodType(_chunked_forward, module)
    return len(modules)


def set_chunk_tokens(model, tokens: int) -> None:
    """Chunks of at most ``tokens`` tokens for every installed MLP (0: the whole pass)."""
    for module in mlp_modules(model):
        if _UNCHUNKED in vars(module):
            setattr(module, CHUNK_TOKENS, tokens)


def _chunked_forward(self, x: torch.Tensor) -> torch.Tensor:
    chunk = getattr(self, CHUNK_TOKENS)
    whole = getattr(self, _UNCHUNKED)
    tokens = x.shape[:-1].numel()
    if not chunk or tokens <= chunk:
        return whole(x)
    rows = x.reshape(tokens, x.shape[-1])
    if not torch.is_grad_enabled():  # a checkpointed layer's first pass: nothing kept anyway
        out = torch.cat([whole(part) for part in rows.split(chunk)])
    else:
        trainable = [p for p in self.parameters() if p.requires_grad]
        out = _ChunkedMLP.apply(whole, chunk, rows, *trainable)
    return out.view(*x.shape[:-1], out.shape[-1])


class _ChunkedMLP(torch.autograd.Function):
    """``mlp(rows)`` keeping only ``rows``; see the module's docstring."""

    @staticmethod
    def forward(ctx, mlp, chunk: int, rows, *trainable):
        ctx.mlp, ctx.chunk, ctx.trainable = mlp, chunk, trainable
        ctx.replay = ReplayState.capture(rows.device)
        ctx.save_for_backward(rows)
        return torch.cat([mlp(part) for part in rows.split(chunk)])

    @staticmethod
    def backward(ctx, grad):
        (rows,) = ctx.saved_tensors
        want_rows = ctx.needs_input_grad[2]
        grad_rows = torch.empty_like(rows) if want_rows else None
        totals: list[torch.Tensor | None] = [None] * len(ctx.trainable)
        with ctx.replay.restored():
            for start in range(0, rows.shape[0], ctx.chunk):
                end = min(start + ctx.chunk, rows.shape[0])
                with torch.enable_grad():
                    part = rows[start:end].detach().requires_grad_(want_rows)
                    out = ctx.mlp(part)
                wanted = ([part] if want_rows else []) + list(ctx.trainable)
                grads = list(torch.autograd.grad(out, wanted, grad[start:end], allow_unused=True))
                if want_rows:
                    grad_rows[start:end] = grads.pop(0)
                totals = [g if t is None else (t if g is None else t.add_(g))
                          for t, g in zip(totals, grads, strict=True)]
        return (None, None, grad_rows, *totals)
