"""The trainer's configuration: one frozen, validated dataclass, saved beside the adapter.

Every field documents its default. ``None`` in ``epochs``, ``batch_size`` and ``learning_rate``
means "auto" (as in OpenAI's API): :func:`resolve_auto` picks a value from the dataset size.
Pure Python, so the platform validates hyperparameters with the same rules the trainer applies.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

METHODS = ("lora", "qlora")
OBJECTIVES = ("supervised", "dpo")  # OpenAI's method types
SCHEDULERS = ("cosine", "linear", "constant")
DEVICES = ("auto", "cpu", "cuda")
SHARDINGS = ("auto", "off", "fsdp")
ALL_LINEAR = "all-linear"
_MODULE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")


class ConfigError(ValueError):
    """A bad value; ``param`` names the field."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param
        self.message = message


def _doc(text: str, default: Any = dataclasses.MISSING, **kwargs) -> Any:
    return field(default=default, metadata={"help": text}, **kwargs)


@dataclass(frozen=True)
class TrainingConfig:
    base_model_dir: str = _doc("Hugging Face directory of the base model.")
    train_file: str = _doc("Validated JSONL training file.")
    output_dir: str = _doc("Where checkpoints and the final adapter are written.")
    validation_file: str | None = _doc("Optional JSONL file for evaluation.", None)
    validation_split: float = _doc(
        "Fraction of the training file held out for evaluation when no validation file is given "
        "(0 = none; at most 0.5).", 0.0)
    method: str = _doc("lora (weights in bf16/fp32) or qlora (4-bit NF4 base, CUDA only).", "lora")
    objective: str = _doc(
        "supervised (next-token loss on the answers) or dpo (preference pairs: the sigmoid DPO "
        "loss against the reference, the model without this adapter).", "supervised")
    dpo_beta: float = _doc(
        "DPO's beta (dpo only): how far the adapter may move from the reference; higher keeps "
        "it closer (0 < beta <= 100).", 0.1)
    init_adapter_dir: str | None = _doc(
        "Continued training: the adapter directory whose weights training starts from (same "
        "rank, alpha and target modules). With dpo it is also the reference.", None)
    lora_rank: int = _doc("LoRA rank r (1-256).", 16)
    lora_alpha: float = _doc("LoRA alpha; the update is scaled by alpha / r.", 32.0)
    lora_dropout: float = _doc(
        "Dropout on the LoRA input (0 to <1). Above 0 the adapters take peft's unfused path, "
        "which keeps about twice the activations (more layers recomputed) and runs slower.", 0.0)
    target_modules: tuple[str, ...] | str = _doc(
        "Module names to adapt, or 'all-linear' (every linear projection except the output head).",
        ALL_LINEAR)
    learning_rate: float | None = _doc("Peak learning rate; None = auto (2e-4).", None)
    lr_scheduler: str = _doc("cosine, linear or constant, after linear warmup.", "cosine")
    warmup_ratio: float = _doc("Fraction of the steps spent warming up (0-0.5).", 0.03)
    epochs: int | None = _doc("Passes over the data (1-50); None = auto from dataset size.", None)
    batch_size: int | None = _doc(
        "Examples per micro-batch (1-512); None = auto. A micro-batch larger than the trainer's "
        "row budget runs as several forward passes, split at example boundaries (same gradient).",
        None)
    gradient_accumulation_steps: int = _doc(
        "Micro-batches per optimizer step; effective batch = batch_size x this.", 1)
    max_seq_len: int = _doc("Longer examples are truncated (and counted in an event).", 2048)
    packing: bool | None = _doc(
        "Padding-free packing: a micro-batch is one row of concatenated examples, each attending "
        "only to itself (position ids restart per example; on CUDA through PyTorch's flash "
        "variable-length kernel). Off: padded, length-grouped rows. None = auto: on for the CPU, "
        "and on CUDA with bf16 compute where PyTorch has the variable-length kernel; off "
        "otherwise (sdpa would attend over the whole packed row, measured slower).", None)
    assistant_only_loss: bool = _doc(
        "Loss on assistant/completion tokens only (off: on every token).", True)
    gradient_checkpointing: bool | None = _doc(
        "Recompute activations in the backward pass: less memory, slower. None = auto: on a GPU, "
        "only the leading layers needed to fit the memory budget (none if everything fits); off "
        "on the CPU. True: every layer; False: none.", None)
    cuda_graphs: bool | None = _doc(
        "Replay each forward and backward pass from a CUDA graph (one per padded length) instead "
        "of launching its kernels one by one from Python; rows are padded to a multiple of 256 "
        "tokens. None = auto: on where possible (one CUDA process, packed rows on the varlen "
        "kernel, the supervised objective, lora_dropout 0) for passes of at most 4,096 tokens, "
        "where the host, not the GPU, bounds the step (QLoRA at small micro-batches), in jobs "
        "with at least 8 passes per graph (the captures take about a pass each). True: "
        "wherever possible; False: never.", None)
    memory_limit_gib: float | None = _doc(
        "GPU memory this job may use, in GiB (enforced, and what the activation plan fits); "
        "None = the whole device.", None)
    bf16: bool | None = _doc("bf16 weights/compute; None = auto (on where CUDA supports it).", None)
    max_grad_norm: float = _doc("Gradient clipping norm (0 = off).", 1.0)
    weight_decay: float = _doc("AdamW weight decay on LoRA weights.", 0.0)
    seed: int = _doc("Seed for data order, initialisation and dropout.", 42)
    eval_every_steps: int = _doc("Evaluate every N steps (0 = at the end of each epoch).", 0)
    early_stopping_patience: int = _doc(
        "Stop after this many evaluations without a lower eval loss (0 = off).", 0)
    checkpoint_every_steps: int = _doc("Save a resumable checkpoint every N steps (0 = per epoch).",
                                       50)
    max_steps: int | None = _doc("Stop after this many optimizer steps (None = all epochs).", None)
    gpus: int = _doc(
        "GPUs the job trains on, one process each (data-parallel: every GPU holds the model and "
        "each step's examples are split between them; same global batch, same losses as one "
        "GPU). 1-64, at most what one GPU worker has (TUNEPLEX_JOB_MAX_GPUS).", 1)
    sharding: str = _doc(
        "With several GPUs: off = every GPU holds the whole model (data-parallel); fsdp = the "
        "base weights and the adapter are split across the GPUs, each gathering one layer at a "
        "time (FSDP2: for models too large for one GPU; LoRA only); auto = fsdp when the base "
        "weights would take more than half of one GPU's memory budget.", "auto")
    device: str = _doc("auto, cpu or cuda.", "auto")
    resume_from: str | None = _doc("Checkpoint directory to resume from.", None)

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, list):
            object.__setattr__(self, "target_modules", tuple(self.target_modules))
        _check(self.method in METHODS, "method", f"must be one of {', '.join(METHODS)}")
        _check(self.lr_scheduler in SCHEDULERS, "lr_scheduler",
               f"must be one of {', '.join(SCHEDULERS)}")
        _check(self.device in DEVICES, "device", f"must be one of {', '.join(DEVICES)}")
        _check(self.objective in OBJECTIVES, "objective",
               f"must be one of {', '.join(OBJECTIVES)}")
        _number_range(self, "dpo_beta", 0, 100, low_open=True)
        _int_range(self, "lora_rank", 1, 256)
        _number_range(self, "lora_alpha", 0, 10_000, low_open=True)
        _number_range(self, "lora_dropout", 0, 1, high_open=True)
        if self.learning_rate is not None:
            _number_range(self, "learning_rate", 0, 1, low_open=True)
        _number_range(self, "warmup_ratio", 0, 0.5)
        _number_range(self, "validation_split", 0, 0.5)
        if self.epochs is not None:
            _int_range(self, "epochs", 1, 50)
        if self.batch_size is not None:
            _int_range(self, "batch_size", 1, 512)
        _int_range(self, "gradient_accumulation_steps", 1, 1024)
        _int_range(self, "max_seq_len", 16, 1_048_576)
        _number_range(self, "max_grad_norm", 0, 1e6)
        _number_range(self, "weight_decay", 0, 1)
        _int_range(self, "seed", 0, 2**31 - 1)
        _int_range(self, "eval_every_steps", 0, 10**9)
        _int_range(self, "early_stopping_patience", 0, 1000)
        _int_range(self, "checkpoint_every_steps", 0, 10**9)
        if self.max_steps is not None:
            _int_range(self, "max_steps", 1, 10**9)
        _int_range(self, "gpus", 1, 64)
        _check(self.sharding in SHARDINGS, "sharding", f"must be one of {', '.join(SHARDINGS)}")
        if self.method == "qlora":
            _check(self.sharding != "fsdp", "sharding",
                   "qlora is not sharded (a 4-bit model of 70B parameters fits one GPU); use lora")
        _check(isinstance(self.assistant_only_loss, bool), "assistant_only_loss",
               "must be true or false")
        _check(self.gradient_checkpointing is None or isinstance(self.gradient_checkpointing, bool),
               "gradient_checkpointing", "must be true, false or null")
        if self.memory_limit_gib is not None:
            _number_range(self, "memory_limit_gib", 0, 100_000, low_open=True)
        _check(self.packing is None or isinstance(self.packing, bool), "packing",
               "must be true, false or null")
        _check(self.bf16 is None or isinstance(self.bf16, bool), "bf16", "must be true, false or null")
        _check(self.cuda_graphs is None or isinstance(self.cuda_graphs, bool), "cuda_graphs",
               "must be true, false or null")
        if isinstance(self.target_modules, str):
            _check(self.target_modules == ALL_LINEAR, "target_modules",
                   f"must be '{ALL_LINEAR}' or a list of module names")
        else:
            _check(len(self.target_modules) > 0, "target_modules", "must not be empty")
            for name in self.target_modules:
                _check(isinstance(name, str) and bool(_MODULE_NAME.match(name)), "target_modules",
                       f"{name!r} is not a module name")
        if self.method == "qlora":
            _check(self.device != "cpu", "method", "qlora needs a CUDA GPU; use lora on the CPU")
        if self.early_stopping_patience:
            _check(self.validation_file is not None or self.validation_split > 0,
                   "early_stopping_patience", "needs a validation file or validation_split")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainingConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(unknown[0], "is not a known setting")
        return cls(**data)

    def replace(self, **changes: Any) -> TrainingConfig:
        return dataclasses.replace(self, **changes)


def field_help() -> dict[str, str]:
    return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(TrainingConfig)}


def resolve_auto(config: TrainingConfig, n_examples: int) -> TrainingConfig:
    """Fill the "auto" hyperparameters from the dataset size, like OpenAI does."""
    n = max(1, n_examples)
    epochs = config.epochs or max(1, min(10, math.ceil(3000 / n)))
    batch_size = config.batch_size or (8 if n >= 80 else max(1, n // 10))
    learning_rate = config.learning_rate or 2e-4
    return config.replace(epochs=epochs, batch_size=batch_size, learning_rate=learning_rate)


def _check(condition: bool, param: str, message: str) -> None:
    if not condition:
        raise ConfigError(param, message)


def _int_range(config: TrainingConfig, name: str, low: int, high: int) -> None:
    value = getattr(config, name)
    _check(isinstance(value, int) and not isinstance(value, bool), name, "must be an integer")
    _check(low <= value <= high, name, f"must be between {low} and {high} (got {value})")


def _number_range(config: TrainingConfig, name: str, low: float, high: float, *,
                  low_open: bool = False, high_open: bool = False) -> None:
    value = getattr(config, name)
    _check(isinstance(value, (int, float)) and not isinstance(value, bool)
           and math.isfinite(value), name, "must be a number")
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    left, right = ("(" if low_open else "["), (")" if high_open else "]")
    _check(not too_low and not too_high, name, f"must be in {left}{low}, {high}{right} (got {value})")
