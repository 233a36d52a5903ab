"""Reads a Hugging Face model directory without loading it (no torch on the platform side)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from serving.adapters import read_safetensors_header


class ModelDirectoryError(ValueError):
    pass


@dataclass(frozen=True)
class ModelDirectoryInfo:
    parameter_count: int
    max_sequence_length: int
    has_chat_template: bool
    architecture: str


def inspect_model_directory(directory: Path) -> ModelDirectoryInfo:
    if not directory.is_dir():
        raise ModelDirectoryError(f"{directory} is not a directory")
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise ModelDirectoryError(f"{directory} has no config.json")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelDirectoryError(f"{config_path} is not valid JSON: {exc}") from None
    architectures = config.get("architectures") or []
    if not any(str(a).endswith("ForCausalLM") for a in architectures):
        raise ModelDirectoryError(
            f"{directory} is not a causal language model (architectures: {architectures})"
        )
    weights = sorted(directory.glob("*.safetensors"))
    if not weights:
        raise ModelDirectoryError(f"{directory} has no .safetensors weights (pickle is refused)")
    return ModelDirectoryInfo(
        parameter_count=sum(_count_parameters(path) for path in weights),
        max_sequence_length=int(config.get("max_position_embeddings") or 2048),
        has_chat_template=_has_chat_template(directory),
        architecture=str(architectures[0]),
    )


def _header(path: Path) -> dict:
    try:
        return read_safetensors_header(path)[0]
    except ValueError as exc:
        raise ModelDirectoryError(str(exc)) from None


def _count_parameters(path: Path) -> int:
    header = _header(path)
    total = 0
    for name, tensor in header.items():
        if name == "__metadata__":
            continue
        count = 1
        for dim in tensor["shape"]:
            count *= int(dim)
        total += count
    return total


def _has_chat_template(directory: Path) -> bool:
    if (directory / "chat_template.jinja").is_file() or (directory / "chat_template.json").is_file():
        return True
    tokenizer_config = directory / "tokenizer_config.json"
    if tokenizer_config.is_file():
        try:
            return bool(json.loads(tokenizer_config.read_text()).get("chat_template"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            return False
    return False


# Linear layers that are never LoRA targets: the output head and embeddings.
_NOT_TARGETS = {"lm_head", "embed_tokens", "wte", "wpe", "embed_out"}


def linear_module_names(directory: Path) -> set[str]:
    """Leaf names of the model's 2-D weight matrices (q_proj, down_proj, ...): valid LoRA targets."""
    names: set[str] = set()
    for path in sorted(directory.glob("*.safetensors")):
        for key, tensor in _header(path).items():
            if key == "__metadata__" or not key.endswith(".weight") or len(tensor["shape"]) != 2:
                continue
            leaf = key[: -len(".weight")].rsplit(".", 1)[-1]
            if leaf not in _NOT_TARGETS and "norm" not in leaf:
                names.add(leaf)
    return names
