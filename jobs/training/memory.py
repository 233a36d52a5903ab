"""Peak training memory, estimated from a model's config.json before a job is queued.

Pure Python (the platform runs it at job creation). The estimate adds up, in bytes:

  weights       parameters x bytes per parameter (4 fp32, 2 bf16, ~0.56 for NF4 with double
                quantization and its block constants; QLoRA keeps embeddings and head in bf16)
  adapter       LoRA parameters x 16: fp32 weights, gradients and AdamW's two moments
  activations   per token and layer, what autograd keeps for the backward pass: about 18 values
                of width hidden and 3 of width intermediate (the MLP), in the compute dtype. With
                gradient checkpointing only each layer's input is kept, plus one layer's worth.
  logits        the output head on target tokens, fp32, with its gradient
  overhead      CUDA context and allocator slack: 1 GiB on GPUs, 0.5 GiB on the CPU

It is an estimate for refusing jobs that cannot fit and for the dashboard's pre-flight, not a
measurement: the GPU benchmark reports real peaks next to it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

GIB = 2**30
NF4_BYTES_PER_PARAM = 0.5 + 0.0625  # 4 bits + double-quantized absmax per 64-value block


@dataclass(frozen=True)
class ModelShape:
    parameters: int
    hidden: int
    intermediate: int
    layers: int
    vocab: int
    heads: int
    kv_heads: int

    @classmethod
    def from_config(cls, config: dict, parameters: int) -> ModelShape:
        hidden = int(config["hidden_size"])
        heads = int(config.get("num_attention_heads", 1))
        return cls(parameters=parameters, hidden=hidden,
                   intermediate=int(config.get("intermediate_size", 4 * hidden)),
                   layers=int(config["num_hidden_layers"]), vocab=int(config["vocab_size"]),
                   heads=heads, kv_heads=int(config.get("num_key_value_heads", heads)))

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


def estimate(shape: ModelShape, *, method: str, rank: int, targets: set[str] | None,
             micro_batch: int, seq_len: int, gradient_checkpointing: bool, bf16: bool,
             on_gpu: bool, target_fraction: float = 0.5) -> MemoryEstimate:
    embed_and_head = 2 * shape.vocab * shape.hidden
    if method == "qlora":
        body = max(0, shape.parameters - embed_and_head)
        weights = int(body * NF4_BYTES_PER_PARAM + embed_and_head * 2)
        act_bytes = 2
    else:
        per_param = 2 if bf16 else 4
        weights = shape.parameters * per_param
        act_bytes = 2 if bf16 else 4
    adapter = lora_parameters(shape, rank, targets) * 16
    tokens = micro_batch * seq_len
    per_layer_token = (18 * shape.hidden + 3 * shape.intermediate) * act_bytes
    if gradient_checkpointing:
        activations = tokens * shape.layers * shape.hidden * act_bytes + tokens * per_layer_token
    else:
        activations = tokens * shape.layers * per_layer_token
    logits = int(tokens * target_fraction * shape.vocab * 4 * 2)
    overhead = GIB if on_gpu else GIB // 2
    return MemoryEstimate(weights=int(weights), adapter=adapter, activations=int(activations),
                          logits=logits, overhead=overhead)


def advice(estimate_: MemoryEstimate, *, available: int, micro_batch: int, seq_len: int,
           gradient_checkpointing: bool, method: str) -> str:
    """What to change so the job fits, most effective first."""
    tips = []
    if not gradient_checkpointing and estimate_.activations > estimate_.weights:
        tips.append("enable gradient_checkpointing")
    if micro_batch > 1:
        tips.append(f"lower batch_size (now {micro_batch}) and raise gradient_accumulation_steps")
    if seq_len > 512:
        tips.append(f"lower max_seq_len (now {seq_len})")
    if method == "lora":
        tips.append("use method qlora (4-bit base weights)")
    return (f"Estimated peak memory {estimate_.total / GIB:.1f} GiB exceeds the "
            f"{available / GIB:.1f} GiB available: " + ("; or ".join(tips) or "use a larger GPU") + ".")
