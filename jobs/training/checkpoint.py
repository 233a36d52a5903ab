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


def _save_adapter_files(model, directory: Path) -> None:
    """peft's safetensors adapter (the trained one: not a DPO job's frozen reference), without
    the model card peft adds."""
    model.save_pretrained(directory, safe_serialization=True, selected_adapters=["default"])
    for extra in directory.iterdir():
        if extra.name not in ADAPTER_FILES:
            extra.unlink() if extra.is_file() else shutil.rmtree(extra)


def save_adapter(model, directory: Path, *, config_json: str | None = None) -> None:
    """adapter_config.json + adapter_model.safetensors (+ training_config.json), atomically."""
    with staged_directory(directory) as staging:
        _save_adapter_files(model, staging)
        if config_json is not None:
            (staging / "training_config.json").write_text(config_json)


def save_checkpoint(directory: Path, *, model, optimizer, scheduler, state: TrainerState) -> None:
    with staged_directory(directory) as staging:
        _save_adapter_files(model, staging)
        tensors: dict[str, torch.Tensor] = {}
        optimizer_state = optimizer.state_dict()
        for index, values in optimizer_state["state"].items():
            for key, value in values.items():
                tensor = value if torch.is_tensor(value) else torch.tensor(value)
                tensors[f"{index}.{key}"] = tensor.detach().to("cpu").contiguous()
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
    from peft import set_peft_model_state_dict

    adapter = load_file(directory / "adapter_model.safetensors")
    result = set_peft_model_state_dict(model, adapter)
    if getattr(result, "unexpected_keys", None):
        raise ValueError(f"checkpoint does not match the model: {result.unexpected_keys[:3]}")
    saved = json.loads((directory / "trainer_state.json").read_text())
    tensors = load_file(directory / "optimizer.safetensors")
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = tensor
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
