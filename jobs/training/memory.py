"""Peak training memory, estimated from a model's config.json, and the activation plan that
fits a memory budget: one rule for the platform's pre-flight and the trainer.

Pure Python (the platform runs it at job creation). The estimate adds up, in bytes:

  weights       parameters x bytes per parameter (4 fp32, 2 bf16, ~0.56 for NF4 with double
                quantization and its block constants; QLoRA keeps its head in bf16); on a GPU an
                untied input embedding stays in host memory (jobs.training.offload)
  adapter       LoRA parameters x 16: fp32 weights, gradients and AdamW's two moments; x 18
                computing in bf16, where each step's bf16 copy of the weights is kept
                (:func:`adapter_bytes`, jobs.training.projections)
  activations   per token of the largest forward pass and per layer, what autograd keeps for the
                backward pass (:func:`layer_bytes_per_token`); a checkpointed layer keeps only its
                input (none on the GPU where that waits in host memory), and recomputes one
                layer's worth at a time in the backward pass; plus the backward pass's workspace
                of one layer (:func:`workspace_bytes`) beyond the head's memory, which is freed
                before it is needed
  logits        the output head on target tokens: with the fused head only one chunk of logits
                and the hidden states' gradient; otherwise fp32 logits with their gradient
  overhead      CUDA context and allocator slack: 1 GiB on GPUs, 0.5 GiB on the CPU

A job sharded over N GPUs (:func:`shards`, :mod:`jobs.training.sharding`) holds 1/N of the
decoder layers' weights and of the adapter on each, plus two layers gathered whole.

The plan (:func:`plan_activations`): gradient checkpointing covers the fewest leading layers
that make the estimate fit the budget (none when everything fits), decided again for each
forward pass from its own token count (a short micro-batch recomputes fewer layers); only when
even every layer checkpointed does not fit, a micro-batch runs as several forward passes of fewer
tokens (split at example boundaries, never below the longest example; the same gradient); only
when one example is too long even then, on one GPU, the checkpointed layers' inputs wait in host
memory (as few layers as fit) and then the MLPs run in chunks of the sequence. That
order is what the H200 measured (benchmarks/RESULTS.md, GPU run 3): on an 8B model each
checkpointed layer cost about 1.3% of the step for 1.3 GiB at 10k tokens, while splitting a
10k-token pass in two cost 18% (per-pass launch overhead). Leading layers, because the backward
pass reaches them last, when the other layers' activations are already freed.

It is an estimate for refusing jobs that cannot fit and for the dashboard's pre-flight, not a
measurement: the GPU benchmark reports real peaks next to it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

GIB = 2**30
NF4_BYTES_PER_PARAM = 0.5 + 0.0625  # 4 bits + double-quantized absmax per 64-value block
# Forward-pass token caps the plan tries, largest first, when every layer checkpointed still does
# not fit (a pass never holds less than the longest example).
SPLIT_TOKENS = (8192, 4096, 2048, 1024, 512)
# The plan keeps its estimate under this share of the budget: allocator fragmentation, cuBLAS
# workspaces and kernels' temporaries are not counted above (on the H200 the estimate came out
# 5% above the measured peak).
HEADROOM = 0.95
# Passes replayed from CUDA graphs (jobs.training.graphs): their activations live in the graphs'
# memory pool for the whole job, which came out up to 10% above the estimate of one pass (the
# pool's own fragmentation across the graphs of several lengths), and the eager work beside them
# (optimizer, gradient norm, the graphs' inputs) keeps its own cache: 265 MiB measured in a
# 10-step job, and a 320 MiB allowance ran out of memory in an 80-step one (8B QLoRA on an H200,
# benchmarks/RESULTS.md, GPU run 6).
GRAPH_POOL_GROWTH = 1.10
GRAPH_EAGER_CACHE = 512 * 2**20
# auto sharding splits a model whose weights take more than this share of one GPU's budget.
AUTO_SHARD_SHARE = 0.5
# fp32 logits per chunk of the fused head (jobs.training.kernels.CHUNK_LOGIT_BYTES).
HEAD_CHUNK_BYTES = 256 * 2**20
# Tokens per chunk the plan tries, largest first, for an MLP run in chunks over a long pass
# (jobs.training.chunked_mlp): at 16k tokens an 8B MLP's matmuls are still large.
MLP_CHUNKS = (16384, 8192, 4096, 2048)


@dataclass(frozen=True)
class ModelShape:
    parameters: int
    hidden: int
    intermediate: int
    layers: int
    vocab: int
    heads: int
    kv_heads: int
    tied: bool = False  # input embedding and output head share one matrix

    @classmethod
    def from_config(cls, config: dict, parameters: int) -> ModelShape:
        hidden = int(config["hidden_size"])
        heads = int(config.get("num_attention_heads", 1))
        return cls(parameters=parameters, hidden=hidden,
                   intermediate=int(config.get("intermediate_size", 4 * hidden)),
                   layers=int(config["num_hidden_layers"]), vocab=int(config["vocab_size"]),
                   heads=heads, kv_heads=int(config.get("num_key_value_heads", heads)),
                   tied=bool(config.get("tie_word_embeddings", False)))

    @classmethod
    def from_directory(cls, directory: Path, parameters: int) -> ModelShape:
        return cls.from_config(json.loads((directory / "config.json").read_text()), parameters)


@dataclass(frozen=True)
class MemoryEstimate:
    weights: int
    adapter: int
    activations: int
    logits: int
    overhead: int

    @property
    def total(self) -> int:
        return self.weights + self.adapter + self.activations + self.logits + self.overhead

    def as_dict(self) -> dict[str, int]:
        return {**asdict(self), "total": self.total}


def lora_parameters(shape: ModelShape, rank: int, targets: set[str] | None) -> int:
    """r x (in + out) for each adapted projection of each layer (all linear when targets is None)."""
    head_dim = shape.hidden // shape.heads
    kv = shape.kv_heads * head_dim
    dims = {"q_proj": (shape.hidden, shape.hidden), "k_proj": (shape.hidden, kv),
            "v_proj": (shape.hidden, kv), "o_proj": (shape.hidden, shape.hidden),
            "gate_proj": (shape.hidden, shape.intermediate),
            "up_proj": (shape.hidden, shape.intermediate),
            "down_proj": (shape.intermediate, shape.hidden)}
    chosen = dims if targets is None else {k: v for k, v in dims.items() if k in targets}
    return shape.layers * sum(rank * (i + o) for i, o in chosen.values())


def layer_bytes_per_token(shape: ModelShape, *, method: str, bf16: bool,
                          fused_kernels: bool, dropout: bool = False,
                          mlp_chunked: bool = False) -> int:
    """Bytes autograd keeps per token for one transformer layer that is not checkpointed.

    Counted for a Llama-style layer with LoRA on every projection (the adapters' rank-r tensors are
    negligible): q, k, v after RoPE, the attention output and o_proj's input; per RMSNorm its input,
    plus (unfused, transformers' own) an fp32 copy and the normalised value (its output is not
    kept: the projections that read it normalise again in the backward pass,
    jobs.training.projections.recompute_norm_outputs); the MLP's gate and up outputs, plus
    (unfused) SiLU's output (the product that feeds down_proj is not kept:
    jobs.training.kernels.fuse_swiglu_adapters); RoPE's inputs and rotated halves (unfused).
    Measured on an H200 (8B, bf16): 223 KB unfused, 143 KB with Liger's kernels, before the
    product and the norms' outputs went (estimates: 219 and 147).

    ``dropout`` (``lora_dropout`` > 0): each adapted projection also keeps its input with the
    dropout applied and dropout's mask (a byte), peft's path; on an 8B model 114 KB more.
    ``mlp_chunked`` (:mod:`jobs.training.chunked_mlp`): the MLP keeps only its input; what its
    chunks need is :func:`workspace_bytes`'s.
    """
    compute = residual = 2 if bf16 or method == "qlora" else 4
    h, kv, i = shape.hidden, shape.kv_heads * (shape.hidden // shape.heads), shape.intermediate
    attention = (2 * h + 2 * kv + h) * compute  # q, k, v, output, o_proj's input
    if fused_kernels:
        norms = 2 * h * residual
        mlp = 2 * i * compute
        rope = 0
    else:
        norms = 2 * (h * 4 + h * residual)
        mlp = 3 * i * compute
        rope = (h + kv) * compute
    if mlp_chunked:
        mlp = h * compute
    # q, k, v, o, gate and up read the hidden width, down the intermediate one
    dropped = (6 * h + i) * (compute + 1) if dropout else 0
    return attention + norms + mlp + rope + dropped


def workspace_bytes(shape: ModelShape, *, tokens: int, method: str, bf16: bool,
                    mlp_chunk: int = 0) -> int:
    """What the backward pass of one layer allocates beyond the activations it frees: the
    gradient arriving from the layer above and the one it passes down (hidden width each), and
    the larger of the attention's gradients (q, k, v and its output) and the MLP's (the product
    recomputed by the down projection's adapter, its gradient from the base and from the
    adapter: three of the intermediate width). A chunked MLP (``mlp_chunk`` tokens a chunk)
    makes its own for one chunk at a time, with the chunk's recomputed gate and up outputs.
    The output head's memory (:func:`head_bytes`) is freed by then: the peak holds the larger
    of the two."""
    compute = 2 if bf16 or method == "qlora" else 4
    h, kv, i = shape.hidden, shape.kv_heads * (shape.hidden // shape.heads), shape.intermediate
    attention = tokens * (2 * h + 2 * kv) * compute
    mlp = (min(tokens, mlp_chunk) * 5 * i if mlp_chunk else tokens * 3 * i) * compute
    return tokens * 2 * h * compute + max(attention, mlp)


def checkpointed_layer_bytes_per_token(shape: ModelShape, *, method: str, bf16: bool) -> int:
    """A checkpointed layer keeps only its input (the residual stream)."""
    return shape.hidden * (2 if bf16 or method == "qlora" else 4)


def forward_tokens(*, micro_batch: int, longest_example: int, cap: int | None = None) -> int:
    """The most tokens one forward pass computes: a micro-batch of the longest examples, split
    at example boundaries into passes of at most ``cap`` tokens (never below one example)."""
    if cap is None:
        return micro_batch * longest_example
    per_pass = max(1, cap // longest_example)
    return min(micro_batch, per_pass) * longest_example


def activation_bytes(shape: ModelShape, *, tokens: int, checkpointed_layers: int, method: str,
                     bf16: bool, fused_kernels: bool, dropout: bool = False,
                     offloaded_layers: int = 0, mlp_chunk: int = 0) -> int:
    """What the layers keep for the backward pass at its peak, without the workspace.

    ``offloaded_layers`` of the checkpointed ones keep their input in host memory
    (:class:`jobs.training.offload.HostStash`): none of it on the GPU but the two inputs in
    flight. ``mlp_chunk``: every MLP runs chunked (:mod:`jobs.training.chunked_mlp`)."""
    full = layer_bytes_per_token(shape, method=method, bf16=bf16, fused_kernels=fused_kernels,
                                 dropout=dropout, mlp_chunked=bool(mlp_chunk))
    kept = checkpointed_layer_bytes_per_token(shape, method=method, bf16=bf16)
    layers = min(checkpointed_layers, shape.layers)
    offloaded = min(offloaded_layers, layers)
    # The peak is at the end of the forward pass. A checkpointed (leading) layer recomputes its
    # activations only after the backward pass has freed those of every later layer, so its one
    # layer's worth adds to the peak only when there are no uncheckpointed layers to free.
    recompute = full if layers == shape.layers else 0
    in_flight = 2 * kept if offloaded else 0
    per_token = (layers - offloaded) * kept + in_flight + (shape.layers - layers) * full + recompute
    return tokens * per_token


def head_bytes(shape: ModelShape, *, target_tokens: int, fused_head: bool, bf16: bool) -> int:
    if not fused_head:
        return target_tokens * shape.vocab * 4 * 2
    # the target rows, their gradient, and one chunk of fp32 logits with its low-precision copies
    chunk = HEAD_CHUNK_BYTES * 5 // 2
    return 2 * target_tokens * shape.hidden * (2 if bf16 else 4) + chunk


@dataclass(frozen=True)
class ActivationPlan:
    """What the trainer recomputes and how it splits micro-batches, with the peak it expects."""

    checkpointed_layers: int  # for the largest forward pass
    layers: int
    forward_tokens: int
    split: bool  # micro-batches run as several forward passes of at most forward_tokens
    estimate: MemoryEstimate
    # auto: the most tokens a forward pass may hold with k leading layers checkpointed (index k),
    # so that a smaller pass recomputes fewer layers; empty when the plan is fixed
    token_limits: tuple[int, ...] = ()
    # long passes that do not fit even with every layer checkpointed: the first
    # offloaded_layers keep their input in host memory, then every MLP runs in chunks of
    # mlp_chunk_tokens (0: whole)
    offloaded_layers: int = 0
    mlp_chunk_tokens: int = 0

    def layers_for(self, tokens: int) -> int:
        """Layers to checkpoint for a forward pass of ``tokens`` tokens: the same rule, per pass."""
        if not self.token_limits:
            return self.checkpointed_layers
        return next((k for k, limit in enumerate(self.token_limits) if tokens <= limit),
                    self.layers)

    def long_pass_for(self, tokens: int) -> tuple[int, int]:
        """(layers offloaded, MLP chunk tokens) for a pass of ``tokens`` tokens: none for a pass
        that fits with checkpointing alone."""
        if self.token_limits and tokens <= self.token_limits[-1]:
            return 0, 0
        return self.offloaded_layers, self.mlp_chunk_tokens

    def describe(self) -> str:
        if self.checkpointed_layers == 0:
            what = "no activation checkpointing"
        elif self.checkpointed_layers >= self.layers:
            what = f"activation checkpointing on all {self.layers} layers"
        else:
            what = (f"activation checkpointing on the first {self.checkpointed_layers} of "
                    f"{self.layers} layers")
        if self.offloaded_layers:
            what += f", the inputs of the first {self.offloaded_layers} in host memory"
        if self.mlp_chunk_tokens:
            what += f", the MLP in chunks of {self.mlp_chunk_tokens:,} tokens"
        passes = (f"forward passes of at most {self.forward_tokens:,} tokens" if self.split
                  else f"whole micro-batches (up to {self.forward_tokens:,} tokens)")
        return f"{what}, {passes}, estimated peak {self.estimate.total / GIB:.1f} GiB"


def plan_activations(shape: ModelShape, *, fixed: int, pass_tokens: list[int],
                     target_share: float, method: str, bf16: bool, fused_kernels: bool,
                     fused_head: bool, gradient_checkpointing: bool | None,
                     available: int | None, weights: int = 0, adapter: int = 0,
                     dropout: bool = False, graphed: bool = False,
                     long_passes: bool = False) -> ActivationPlan:
    """The fewest checkpointed layers whose estimate fits ``available`` x :data:`HEADROOM`.

    ``pass_tokens``: the largest forward pass whole, then under each split cap the plan may use
    (largest first; see :func:`forward_tokens`). ``fixed`` is what does not depend on the plan
    (weights, adapter state, overhead; the trainer measures it, the pre-flight estimates it).
    ``gradient_checkpointing`` True or False forces all or no layers (splitting still follows the
    budget); None (auto) without ``available`` means all layers, whole passes: the least memory
    the job needs without splitting, which is what refusing a job needs. ``graphed``: the passes
    replay from CUDA graphs (:data:`GRAPH_POOL_GROWTH`, :data:`GRAPH_EAGER_CACHE`).
    ``long_passes``: where the smallest pass still does not fit with every layer checkpointed
    (one long example), the first layers' inputs may wait in host memory, as few as fit, and
    then the MLP may run in chunks (:data:`MLP_CHUNKS`, largest first), in that order: moving
    an input costs host-link time the recomputation hides, a chunked MLP one more forward pass
    of the MLP. Checkpointing must not be forced off for either.
    """
    def at(layers: int, tokens: int, offloaded: int = 0, chunk: int = 0) -> MemoryEstimate:
        kept = activation_bytes(shape, tokens=tokens, checkpointed_layers=layers,
                                method=method, bf16=bf16, fused_kernels=fused_kernels,
                                dropout=dropout, offloaded_layers=offloaded, mlp_chunk=chunk)
        logits = head_bytes(shape, target_tokens=int(tokens * target_share),
                            fused_head=fused_head, bf16=bf16)
        workspace = workspace_bytes(shape, tokens=tokens, method=method, bf16=bf16,
                                    mlp_chunk=chunk)
        activations = kept + max(0, workspace - logits)  # the peak holds the larger of the two
        overhead = fixed - weights - adapter
        if graphed:
            activations, logits = (int(n * GRAPH_POOL_GROWTH) for n in (activations, logits))
            overhead += GRAPH_EAGER_CACHE
        return MemoryEstimate(weights=weights, adapter=adapter, activations=activations,
                              logits=logits, overhead=overhead)

    def plan(layers: int, index: int, limits: tuple[int, ...] = (), offloaded: int = 0,
             chunk: int = 0) -> ActivationPlan:
        return ActivationPlan(checkpointed_layers=layers, layers=shape.layers,
                              forward_tokens=pass_tokens[index], split=index > 0,
                              estimate=at(layers, pass_tokens[index], offloaded, chunk),
                              token_limits=limits, offloaded_layers=offloaded,
                              mlp_chunk_tokens=chunk)

    def most_tokens(layers: int) -> int:
        # the estimate grows with the tokens (piecewise affine: the head or the workspace)
        low, high = 0, 1
        while at(layers, high).total <= budget and high < 2**40:
            low, high = high, high * 2
        while high - low > 1:
            middle = (low + high) // 2
            low, high = (middle, high) if at(layers, middle).total <= budget else (low, middle)
        return low

    choices = (range(shape.layers + 1) if gradient_checkpointing is None
               else [shape.layers if gradient_checkpointing else 0])
    if available is None:
        return plan(shape.layers if gradient_checkpointing is None else choices[0], 0)
    budget = available * HEADROOM
    limits = (tuple(most_tokens(k) for k in range(shape.layers + 1))
              if gradient_checkpointing is None else ())
    for index, tokens in enumerate(pass_tokens):
        layers = next((k for k in choices if at(k, tokens).total <= budget), None)
        if layers is not None:
            return plan(layers, index, limits)
    last, every = len(pass_tokens) - 1, shape.layers
    if not long_passes or gradient_checkpointing is False:
        return plan(choices[-1], last)
    tokens = pass_tokens[last]
    offloaded = next((n for n in range(1, every + 1) if at(every, tokens, n).total <= budget),
                     None)
    if offloaded is not None:
        return plan(every, last, limits, offloaded)
    chunk = next((c for c in MLP_CHUNKS if c < tokens
                  and at(every, tokens, every, c).total <= budget), MLP_CHUNKS[-1])
    return plan(every, last, limits, every, chunk)


def split_choices(tokens: int, longest_example: int, *, packing: bool = True) -> list[int]:
    """The largest forward pass whole, then under each cap of :data:`SPLIT_TOKENS` below it."""
    choices = [tokens]
    for cap in SPLIT_TOKENS:
        if packing:
            capped = max(longest_example, min(cap, tokens))
        else:
            capped = max(1, cap // longest_example) * longest_example
        if capped < choices[-1]:
            choices.append(capped)
    return choices


def adapter_bytes(parameters: int, *, bf16: bool, sharded: bool = False) -> int:
    """Memory of the LoRA state: fp32 weights, gradients and AdamW's two moments, plus the bf16
    copy of the weights that the grouped projections keep for a step when they compute in bf16
    (not sharded: there FSDP's mixed precision casts)."""
    return parameters * (16 + (2 if bf16 and not sharded else 0))


def weight_bytes(shape: ModelShape, *, method: str, bf16: bool, on_gpu: bool) -> int:
    """The base weights in device memory (one whole copy)."""
    table = shape.vocab * shape.hidden
    if method == "qlora":
        body = max(0, shape.parameters - (1 if shape.tied else 2) * table)
        return int(body * NF4_BYTES_PER_PARAM + table * 2)
    # on a GPU an untied input embedding stays in host memory (jobs.training.offload)
    on_device = shape.parameters - (table if on_gpu and not shape.tied else 0)
    return on_device * (2 if bf16 else 4)


def shards(*, sharding: str, method: str, gpus: int, weights: int, budget: int | None) -> int:
    """Over how many GPUs a job's model is split (jobs.training.sharding): 1, each GPU holding a
    whole copy, unless the job has several GPUs and LoRA, and ``sharding`` is fsdp, or auto with
    weights above half of one GPU's budget."""
    if gpus <= 1 or method == "qlora" or sharding == "off":
        return 1
    if sharding == "fsdp" or (budget is not None and weights > AUTO_SHARD_SHARE * budget):
        return gpus
    return 1


def estimate(shape: ModelShape, *, method: str, rank: int, targets: set[str] | None,
             micro_batch: int, seq_len: int, gradient_checkpointing: bool | None, bf16: bool,
             on_gpu: bool, target_fraction: float = 0.5, available: int | None = None,
             fused_kernels: bool = False, gpus: int = 1, sharding: str = "off",
             dropout: bool = False) -> MemoryEstimate:
    """Peak memory of one GPU (or the CPU) for a micro-batch of ``seq_len``-token examples under
    the trainer's plan.

    ``gradient_checkpointing`` None is the trainer's auto: on a GPU, the plan that fits
    ``available`` (all layers checkpointed when ``available`` is not given: the least memory
    the job can run in); on the CPU, none. ``fused_kernels``: liger-kernel on the worker
    (smaller activations); leave False when unknown, the larger estimate. A job sharded over its
    ``gpus`` (:func:`shards`) holds a share of the weights and adapter, plus two decoder layers
    gathered whole (the one computing and the next, prefetched).
    """
    weights = weight_bytes(shape, method=method, bf16=bf16, on_gpu=on_gpu)
    split = shards(sharding=sharding, method=method, gpus=gpus, weights=weights, budget=available)
    adapter = adapter_bytes(lora_parameters(shape, rank, targets), bf16=bf16, sharded=split > 1)
    if split > 1:
        layer = (shape.parameters - (1 if shape.tied else 2) * shape.vocab * shape.hidden) \
            // shape.layers * (2 if bf16 else 4)
        # the output head (and the input embedding, where it is not in host memory) stay whole
        whole = (1 if shape.tied or on_gpu else 2) * shape.vocab * shape.hidden * (2 if bf16 else 4)
        weights = -(-(weights - whole) // split) + whole + 2 * layer
        adapter = -(-adapter // split)
    overhead = GIB if on_gpu else GIB // 2
    tokens = forward_tokens(micro_batch=micro_batch, longest_example=seq_len)
    mode = gradient_checkpointing
    if mode is None and not on_gpu:
        mode = False
    plan = plan_activations(
        shape, fixed=weights + adapter + overhead,
        pass_tokens=split_choices(tokens, seq_len) if available else [tokens],
        target_share=target_fraction, method=method, bf16=bf16,
        fused_kernels=fused_kernels and on_gpu, fused_head=True, gradient_checkpointing=mode,
        available=available, weights=weights, adapter=adapter, dropout=dropout,
        long_passes=on_gpu and split == 1)
    return plan.estimate


def advice(estimate_: MemoryEstimate, *, available: int, micro_batch: int, seq_len: int,
           gradient_checkpointing: bool | None, method: str, on_gpu: bool = False,
           gpus: int = 1, max_gpus: int = 1) -> str:
    """What to change so the job fits, most effective first."""
    tips = []
    more_gpus = (f"train on more GPUs (gpus up to {max_gpus}), which split the model between "
                 "them" if method == "lora" and max_gpus > gpus else None)
    if more_gpus and estimate_.weights > AUTO_SHARD_SHARE * available:
        tips.append(more_gpus)  # the weights alone crowd one GPU: nothing else helps as much
        more_gpus = None
    recomputing = gradient_checkpointing or (gradient_checkpointing is None and on_gpu)
    if not recomputing and estimate_.activations > estimate_.weights:
        tips.append("enable gradient_checkpointing")
    if micro_batch > 1:
        tips.append(f"lower batch_size (now {micro_batch}) and raise gradient_accumulation_steps")
    if seq_len > 512:
        tips.append(f"lower max_seq_len (now {seq_len})")
    if method == "lora":
        tips.append("use method qlora (4-bit base weights)")
    if more_gpus:
        tips.append(more_gpus)
    return (f"Estimated peak memory {estimate_.total / GIB:.1f} GiB exceeds the "
            f"{available / GIB:.1f} GiB available: " + ("; or ".join(tips) or "use a larger GPU") + ".")
