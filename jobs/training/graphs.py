"""CUDA graphs for the forward and backward passes of small packed rows.

At micro-batch 1 an 8B QLoRA step is bound by the host, not the GPU: a few thousand small kernels
(4-bit dequantisation, adapter matmuls, norms) launched one by one from Python, with the GPU busy
a third to a half of the step (benchmarks/RESULTS.md, GPU run 5). A CUDA graph records a pass's
kernels once and replays them with one launch.

A graph replays fixed shapes at fixed addresses, so:

* each packed row is padded to a **bucket** of :data:`BUCKET_TOKENS` tokens
  (:func:`jobs.training.data.pad_packed`: the padding is an example of its own, with no loss),
  and a graph is captured per (bucket, examples in the row);
* the loss runs over every row of the padded pass with the rows without loss ignored
  (``linear_cross_entropy(..., ignored=True)``) instead of selecting the target rows, whose
  number varies;
* the inputs are copied into the graph's own tensors before each replay, the loss's scale (one
  over the step's target tokens) included, and the loss and the count of correct predictions are
  read back after it, before any other graph replays;
* the adapter gradients stay allocated for the whole job (the trainer zeroes them in place
  rather than dropping them), and each replay adds into them, as an eager backward pass does.

All graphs share one memory pool; they are captured largest first, before the first step (the
trainer knows every pass of its planned epochs), so the smaller ones fit in what the largest
freed: the pool holds about one pass's activations, as the eager passes would. The kept bf16
adapter copies (:mod:`jobs.training.projections`) are made inside each graph, from the weights
the optimizer updates in place. Used where it pays and is safe (:func:`wanted`): one CUDA
process, packed rows on the varlen kernel, the supervised objective, no dropout, and passes of at
most :data:`MAX_TOKENS` tokens (longer passes keep the GPU busy on their own).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from jobs.training.data import IGNORE_INDEX, Batch, pad_packed
from jobs.training.offload import HostEmbedding
from jobs.training.projections import forget_copies

BUCKET_TOKENS = 256
MAX_TOKENS = 4096
# auto: at least this many passes per graph. A capture costs about one eager pass of host time
# and a replay saves roughly half of one (8B QLoRA, micro-batch 1: 0.7 s a capture, passes
# 0.30 s eager and 0.13 s replayed; benchmarks/RESULTS.md, GPU run 6), so a graph pays for
# itself after a few replays; a short job keeps its eager passes.
MIN_PASSES_PER_GRAPH = 8

Key = tuple[int, int]  # (padded tokens, boundaries in cu_seqlens)


def bucket(tokens: int) -> int:
    """The padded length of a pass of ``tokens`` tokens."""
    return max(1, math.ceil(tokens / BUCKET_TOKENS)) * BUCKET_TOKENS


def key_of(tokens: int, examples: int) -> Key:
    """A pass's graph: its padded length, and its examples plus the padding one, plus one."""
    return bucket(tokens), examples + 2


def unavailable_reason(*, device: torch.device, distributed: bool, packing: bool, varlen: bool,
                       objective: str, dropout: float) -> str | None:
    """Why this job cannot replay its passes from CUDA graphs, or None."""
    if device.type != "cuda":
        return "CUDA graphs need a CUDA device"
    if distributed:
        return "CUDA graphs run in one process only (not across GPUs)"
    if not (packing and varlen):
        return "CUDA graphs need packed rows on the flash variable-length kernel"
    if objective != "supervised":
        return "CUDA graphs run the supervised objective only"
    if dropout:
        return "CUDA graphs need lora_dropout 0 (dropout draws new masks each pass)"
    return None


def wanted(setting: bool | None, reason: str | None, keys: list[Key]) -> bool:
    """Whether to graph the passes ``keys`` (one per pass of the job, :func:`key_of`).
    ``cuda_graphs``: None (auto) = where possible, when no pass is long enough to keep the GPU
    busy on its own, and the job is long enough to pay for the captures; True = where possible."""
    if setting is False or reason is not None or not keys:
        return False
    if setting is True:
        return True
    return (max(length for length, _ in keys) <= MAX_TOKENS
            and len(keys) >= MIN_PASSES_PER_GRAPH * len(set(keys)))


@dataclass
class _Inputs:
    """A graph's own input tensors (filled before each replay) and its outputs."""

    batch: Batch  # on the GPU, max_length = the padded length
    embeds: torch.Tensor | None  # the input embeddings, when the table lives in host memory
    scale: torch.Tensor  # the loss's weight in the step
    loss: torch.Tensor | None = None
    correct: torch.Tensor | None = None
    graph: torch.cuda.CUDAGraph | None = None


class GraphedPasses:
    """Forward and backward passes replayed from one CUDA graph per :func:`key_of`.

    ``losses(model, batch, inputs_embeds)`` is the trainer's loss over every row (sum, correct);
    ``checkpointed_layers(tokens)`` the memory plan's layers to recompute for a pass that long.
    """

    def __init__(self, model, trainable: list[torch.nn.Parameter], device: torch.device, *,
                 losses: Callable, checkpointed_layers: Callable[[int], None], pad_id: int
                 ) -> None:
        self.model, self.trainable, self.device = model, trainable, device
        self.losses, self.checkpointed_layers, self.pad_id = losses, checkpointed_layers, pad_id
        self.embedding = model.get_base_model().get_input_embeddings()
        self.stream = torch.cuda.Stream(device)
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[Key, _Inputs] = {}
        self.buffers: dict[str, torch.Tensor] = {}  # the longest pass's inputs; graphs use prefixes
        self.grads: list[torch.Tensor] = []
        self.capture_seconds = 0.0
        self.pool_bytes = 0  # what the captures reserved: about one pass's activations

    # setup ---------------------------------------------------------------------------------

    def prepare(self, keys: Iterable[Key]) -> None:
        """Warm up once, then capture every key, largest first (the pool is then sized once)."""
        ordered = sorted(set(keys), reverse=True)
        if not ordered:
            return
        self._allocate_buffers(ordered[0][0])
        started = time.monotonic()
        self._warm_up(ordered[-1])  # ends with the GPU idle and the caching allocator emptied
        before = torch.cuda.memory_reserved(self.device)
        for key in ordered:
            self._capture(key)
        self.pool_bytes = torch.cuda.memory_reserved(self.device) - before
        self.capture_seconds += time.monotonic() - started

    def _allocate_buffers(self, length: int) -> None:
        """Input tensors for the longest pass, outside the graphs' pool; every graph reads a
        prefix of them (graphs never run at once), so they cost one pass's inputs, not one each."""
        if self.buffers and self.buffers["input_ids"].shape[1] >= length:
            return
        self.buffers = {name: torch.zeros((1, length), dtype=torch.long, device=self.device)
                        for name in ("input_ids", "labels", "position_ids")}
        if isinstance(self.embedding, HostEmbedding):
            self.buffers["embeds"] = torch.zeros((1, length, self.embedding.embedding_dim),
                                                 dtype=self.embedding.weight.dtype,
                                                 device=self.device)

    def _inputs(self, key: Key) -> _Inputs:
        """Tensors for one graph, holding a valid row: examples of even length, then none."""
        length, boundaries = key
        examples = boundaries - 2
        ends = [length * (i + 1) // max(1, examples) for i in range(examples)] or [length]
        bounds = torch.tensor([0, *ends, length], dtype=torch.int32)
        positions = torch.cat([torch.arange(int(b - a)) for a, b in zip(bounds, bounds[1:])])
        view = {name: buffer[:, :length] for name, buffer in self.buffers.items()}
        view["input_ids"].fill_(self.pad_id)
        view["labels"].fill_(IGNORE_INDEX)
        view["position_ids"].copy_(positions[None])
        batch = Batch(view["input_ids"], view["labels"], view["position_ids"], None, 0, length,
                      cu_seqlens=bounds.to(self.device), max_length=length)
        scale = torch.zeros((), dtype=torch.float32, device=self.device)
        return _Inputs(batch, view.get("embeds"), scale)

    def _pass(self, inputs: _Inputs) -> tuple[torch.Tensor, torch.Tensor]:
        loss, correct = self.losses(self.model, inputs.batch, inputs.embeds)
        (loss * inputs.scale).backward()
        return loss.detach(), correct

    def _warm_up(self, key: Key) -> None:
        """One eager pass on the capture stream, of weight zero: libraries initialise there, the
        kernels compile, and the adapter gradients are allocated outside the graphs' pool."""
        inputs = self._inputs(key)
        self.checkpointed_layers(key[0])
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            self._pass(inputs)
        torch.cuda.current_stream(self.device).wait_stream(self.stream)
        for param in self.trainable:
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            else:
                param.grad.zero_()
        self.grads = [param.grad for param in self.trainable]
        forget_copies(self.model)
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()  # the warm-up's activations, back for the pool

    def _capture(self, key: Key) -> _Inputs:
        inputs = self._inputs(key)
        self.checkpointed_layers(key[0])
        forget_copies(self.model)  # the graph makes its own copies, from the live weights
        graph = torch.cuda.CUDAGraph()
        # torch.cuda.graph() without its garbage collection and cache emptying before each
        # capture (a second or so, for every graph, in a process holding a whole model): the
        # GPU is idle after the warm-up, and the graphs share one pool on purpose.
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            graph.capture_begin(pool=self.pool)
            try:
                inputs.loss, inputs.correct = self._pass(inputs)
            finally:
                graph.capture_end()
        torch.cuda.current_stream(self.device).wait_stream(self.stream)
        forget_copies(self.model)  # those live in the pool: eager passes make their own
        inputs.graph = graph
        self.graphs[key] = inputs
        return inputs

    # loop ----------------------------------------------------------------------------------

    def run(self, batch: Batch, scale: float) -> tuple[float, int]:
        """One forward and backward pass of ``batch`` (a packed row in host memory), its loss
        weighted by ``scale`` into the gradients: (loss sum, correct predictions)."""
        key = key_of(batch.input_ids.shape[1], len(batch.cu_seqlens) - 1)
        inputs = self.graphs.get(key)
        if inputs is None:  # a pass the plan did not foresee: captured now
            if not self.grads:
                self.prepare([key])
                inputs = self.graphs[key]
            elif key[0] > self.buffers["input_ids"].shape[1]:
                raise RuntimeError(f"a pass of {key[0]:,} tokens is longer than the graphs "
                                   "were planned for")
            else:
                started = time.monotonic()
                inputs = self._capture(key)
                self.capture_seconds += time.monotonic() - started
        if any(param.grad is not grad for param, grad in zip(self.trainable, self.grads)):
            raise RuntimeError("the adapter gradients were replaced; graphed passes add into "
                               "the ones they captured (zero them in place)")
        padded = pad_packed(batch, key[0], self.pad_id)
        static = inputs.batch
        static.input_ids.copy_(padded.input_ids, non_blocking=True)
        static.labels.copy_(padded.labels, non_blocking=True)
        static.position_ids.copy_(padded.position_ids, non_blocking=True)
        static.cu_seqlens.copy_(padded.cu_seqlens, non_blocking=True)
        if inputs.embeds is not None:
            self.embedding.lookup_into(padded.input_ids, inputs.embeds)
        inputs.scale.fill_(scale)
        inputs.graph.replay()
        return inputs.loss.item(), int(inputs.correct.item())  # read before another replay

    def describe(self) -> str:
        lengths = sorted({length for length, _ in self.graphs})
        return (f"CUDA graphs: {len(self.graphs)} forward and backward passes captured "
                f"(rows padded to {', '.join(f'{n:,}' for n in lengths)} tokens) in "
                f"{self.capture_seconds:.1f} s, holding {self.pool_bytes / 2**30:.2f} GiB.")
