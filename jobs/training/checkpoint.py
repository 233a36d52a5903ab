"""Resumable checkpoints and the final adapter, written without pickle.

A checkpoint directory holds:
  adapter_model.safetensors, adapter_config.json   the LoRA weights (peft's safe format)
  optimizer.safetensors                           AdamW moments and step counts, per parameter
  rng.safetensors                                 torch (and CUDA) random state
  trainer_state.json                              step, epoch, scheduler, optimizer groups, metrics

Everything is written to a temporary sibling and renamed into place, so a directory that exists
is complete.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from jobs.training.layout import (  # noqa: F401 - re-exported for the trainer
    ADAPTER_FILES,
    latest_checkpoint,
    sha256_of,
    staged_directory,
)
from jobs.training.preference import TRAINED_ADAPTER
from jobs.training.sharding import copy_full, gathered, is_sharded, sharded_like


@dataclass
class TrainerState:
    step: int = 0  # optimizer steps done
    epoch: int = 0  # current epoch (0-based)
    step_in_epoch: int = 0  # optimizer steps done within the current epoch
    best_eval_loss: float | None = None
    evals_without_improvement: int = 0
    trained_tokens: int = 0
    elapsed_seconds: float = 0.0
    last_metrics: dict[str, Any] = field(default_factory=dict)


_MARKER = f".{TRAINED_ADAPTER}."


def _trained_parameters(model) -> dict[str, torch.nn.Parameter]:
    """The trained adapter's parameters by their name in the model (a DPO job's frozen reference
    adapter is not among them)."""
    return {name: param for name, param in model.named_parameters()
            if "lora_" in name and _MARKER in name}


def _trained_adapter(model) -> dict[str, torch.nn.Parameter]:
    """The same, by their name in peft's adapter file."""
    return {name.replace(_MARKER, "."): param for name, param in _trained_parameters(model).items()}


def gather_adapter(model) -> dict[str, torch.Tensor] | None:
    """A sharded model's adapter as whole tensors, keyed as in its state dict (a collective: every
    rank calls it); None when the model is not sharded (peft reads the weights itself)."""
    if not is_sharded(model):
        return None
    return {name: gathered(param.detach()) for name, param in _trained_parameters(model).items()}


def load_adapter_weights(model, weights: dict[str, torch.Tensor]) -> None:
    """Copy an adapter file's tensors into the trained adapter (into this rank's shards when the
    model is sharded); ValueError when the file does not fit it exactly."""
    params = _trained_adapter(model)
    missing, unexpected = sorted(set(params) - set(weights)), sorted(set(weights) - set(params))
    if missing or unexpected:
        raise ValueError(f"missing {missing[:2]}, unexpected {unexpected[:2]}")
    for name, tensor in weights.items():
        if tuple(tensor.shape) != tuple(params[name].shape):
            raise ValueError(f"{name} has shape {tuple(tensor.shape)}, the job's adapter "
                             f"{tuple(params[name].shape)}")
    for name, tensor in weights.items():
        copy_full(params[name], tensor)


def _save_adapter_files(model, directory: Path, state: dict[str, torch.Tensor] | None) -> None:
    """peft's safetensors adapter (the trained one: not a DPO job's frozen reference), without
    the model card peft adds; ``state``: the gathered weights of a sharded model."""
    model.save_pretrained(directory, safe_serialization=True, selected_adapters=[TRAINED_ADAPTER],
                          **({"state_dict": state} if state is not None else {}))
    for extra in directory.iterdir():
        if extra.name not in ADAPTER_FILES:
            extra.unlink() if extra.is_file() else shutil.rmtree(extra)


def save_adapter(model, directory: Path, *, config_json: str | None = None,
                 write: bool = True) -> None:
    """adapter_config.json + adapter_model.safetensors (+ training_config.json), atomically.
    Sharded, every rank calls it (the weights are gathered) and the one with ``write`` writes."""
    state = gather_adapter(model)
    if not write:
        return
    with staged_directory(directory) as staging:
        _save_adapter_files(model, staging, state)
        if config_json is not None:
            (staging / "training_config.json").write_text(config_json)


def save_checkpoint(directory: Path, *, model, optimizer, scheduler, state: TrainerState,
                    write: bool = True) -> None:
    """Sharded, every rank calls it (adapter and moments are gathered into whole tensors, the
    one-process format) and the one with ``write`` writes."""
    adapter = gather_adapter(model)
    tensors: dict[str, torch.Tensor] = {}
    optimizer_state = optimizer.state_dict()
    for index, values in optimizer_state["state"].items():
        for key, value in values.items():
            tensor = gathered(value) if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"{index}.{key}"] = tensor.detach().to("cpu").contiguous()
    if not write:
        return
    with staged_directory(directory) as staging:
        _save_adapter_files(model, staging, adapter)
        save_file(tensors, staging / "optimizer.safetensors")
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            for i, cuda_state in enumerate(torch.cuda.get_rng_state_all()):
                rng[f"cuda.{i}"] = cuda_state
        save_file(rng, staging / "rng.safetensors")
        (staging / "trainer_state.json").write_text(json.dumps({
            "state": asdict(state),
            "scheduler": _jsonable(scheduler.state_dict()),
            "param_groups": optimizer_state["param_groups"],
            "python_random": _python_random_state(),
        }, indent=1))


def load_checkpoint(directory: Path, *, model, optimizer, scheduler) -> TrainerState:
    """Resume from a checkpoint written at any world size, sharded or not."""
    try:
        load_adapter_weights(model, load_file(directory / "adapter_model.safetensors"))
    except ValueError as exc:
        raise ValueError(f"checkpoint does not match the model: {exc}") from None
    saved = json.loads((directory / "trainer_state.json").read_text())
    tensors = load_file(directory / "optimizer.safetensors")
    params = [param for group in optimizer.param_groups for param in group["params"]]
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        index, name = key.split(".", 1)
        param = params[int(index)]
        value = tensor if name == "step" else sharded_like(tensor, param)
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": saved["param_groups"]})
    scheduler.load_state_dict(saved["scheduler"])
    rng = load_file(directory / "rng.safetensors")
    torch.set_rng_state(rng["torch"])
    if torch.cuda.is_available():
        cuda_states = [rng[k] for k in sorted(k for k in rng if k.startswith("cuda."))]
        if cuda_states:
            torch.cuda.set_rng_state_all(cuda_states)
    version, internal, gauss = saved["python_random"]
    random.setstate((version, tuple(internal), gauss))
    return TrainerState(**saved["state"])


def _python_random_state() -> list:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items() if not callable(v)}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if torch.is_tensor(value):
        return value.item() if value.numel() == 1 else value.tolist()
    return value
