"""What may be loaded into the engine: checks an adapter directory without torch.

An adapter reaches vLLM only through :func:`validate_adapter`: the directory must lie under the
serving root (symlinks resolved), hold exactly ``adapter_config.json`` and
``adapter_model.safetensors`` (never pickle), be a plain LoRA with a rank within the pool's limit,
and every tensor must match the base model's layer it adapts. The engine would refuse most of
these with a 500 mid-load; refusing them here gives the tenant a precise reason first.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

ADAPTER_FILES = frozenset({"adapter_config.json", "adapter_model.safetensors"})
MAX_HEADER_BYTES = 100 * 2**20
FLOAT_DTYPES = frozenset({"F16", "BF16", "F32"})
_DTYPE_BYTES = {"F16": 2, "BF16": 2, "F32": 4}


class AdapterInvalid(ValueError):
    """The adapter must not be loaded; ``code`` is stable, the message says what to fix."""

    def __init__(self, message: str, *, code: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class AdapterInfo:
    rank: int
    target_modules: tuple[str, ...]
    tensors: int


def read_safetensors_header(path: Path) -> tuple[dict, int]:
    """The JSON header of a safetensors file and the size of its data section, checked for sanity."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        raw = handle.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path.name} is truncated")
        (length,) = struct.unpack("<Q", raw)
        if length > min(MAX_HEADER_BYTES, size - 8):
            raise ValueError(f"{path.name} has an implausible header size")
        try:
            header = json.loads(handle.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ValueError(f"{path.name} has a corrupt header") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path.name} has a corrupt header")
    return header, size - 8 - length


def validate_adapter(directory: Path, *, root: Path, max_rank: int,
                     base_shapes: Mapping[str, tuple[int, int]]) -> AdapterInfo:
    """Raise :class:`AdapterInvalid` unless the engine may load ``directory``.

    ``base_shapes`` maps the base model's linear weights (``model.layers.0.self_attn.q_proj``) to
    their (out_features, in_features).
    """
    resolved = directory.resolve()
    if not resolved.is_relative_to(root.resolve()):
        raise AdapterInvalid("The adapter lies outside the serving root.", code="adapter_path_refused")
    if not resolved.is_dir():
        raise AdapterInvalid("The adapter directory does not exist.", code="adapter_missing")
    names = {p.name for p in resolved.iterdir()}
    if missing := ADAPTER_FILES - names:
        raise AdapterInvalid(f"The adapter lacks {', '.join(sorted(missing))}.", code="adapter_incomplete")
    if extra := names - ADAPTER_FILES:
        raise AdapterInvalid(f"The adapter holds unexpected files: {', '.join(sorted(extra))} "
                             f"(only safetensors weights and adapter_config.json are served).",
                             code="adapter_unexpected_files")
    for name in ADAPTER_FILES:
        if (resolved / name).is_symlink() or not (resolved / name).is_file():
            raise AdapterInvalid(f"{name} is not a regular file.", code="adapter_path_refused")
    config = _config(resolved / "adapter_config.json", max_rank)
    tensors = _check_weights(resolved / "adapter_model.safetensors", config, base_shapes)
    return AdapterInfo(rank=config["r"], target_modules=tuple(sorted(config["target_modules"])),
                       tensors=tensors)


def _config(path: Path, max_rank: int) -> dict:
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise AdapterInvalid("adapter_config.json is not valid JSON.", code="adapter_config_invalid") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        raise AdapterInvalid("adapter_config.json does not describe a LoRA adapter (peft_type LORA).",
                             code="adapter_config_invalid")
    rank = config.get("r")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise AdapterInvalid("adapter_config.json has no valid rank r.", code="adapter_config_invalid")
    ranks = [rank, *(config.get("rank_pattern") or {}).values()]
    if max(ranks) > max_rank:
        raise AdapterInvalid(f"The adapter's rank {max(ranks)} exceeds the serving pool's limit of "
                             f"{max_rank} (TUNEPLEX_ENGINE_MAX_LORA_RANK).", code="adapter_rank_too_high")
    if config.get("use_dora") or config.get("modules_to_save"):
        raise AdapterInvalid("DoRA adapters and modules_to_save cannot be served by the pool.",
                             code="adapter_unsupported")
    targets = config.get("target_modules")
    if isinstance(targets, str):
        targets = [targets]
    if not isinstance(targets, list) or not targets:
        raise AdapterInvalid("adapter_config.json has no target_modules.", code="adapter_config_invalid")
    config["target_modules"] = targets
    return config


def _check_weights(path: Path, config: dict, base_shapes: Mapping[str, tuple[int, int]]) -> int:
    try:
        header, data_size = read_safetensors_header(path)
    except ValueError as exc:
        raise AdapterInvalid(f"The adapter weights are unreadable: {exc}.", code="adapter_corrupt") from None
    end = 0
    count = 0
    rank_pattern = config.get("rank_pattern") or {}
    for key, tensor in header.items():
        if key == "__metadata__":
            continue
        count += 1
        try:
            dtype, shape, (start, stop) = tensor["dtype"], tensor["shape"], tensor["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise AdapterInvalid(f"Tensor {key} has a malformed header entry.", code="adapter_corrupt") from None
        if dtype not in FLOAT_DTYPES or len(shape) != 2:
            raise AdapterInvalid(f"Tensor {key} is {dtype} {shape}; LoRA weights are 2-D floats.",
                                 code="adapter_corrupt")
        if stop - start != shape[0] * shape[1] * _DTYPE_BYTES[dtype] or not 0 <= start <= stop:
            raise AdapterInvalid(f"Tensor {key} has inconsistent offsets.", code="adapter_corrupt")
        end = max(end, stop)
        module, kind = _lora_module(key)
        if module not in base_shapes:
            raise AdapterInvalid(f"Tensor {key} adapts {module}, which the base model does not have.",
                                 code="adapter_base_mismatch")
        out_features, in_features = base_shapes[module]
        leaf = module.rsplit(".", 1)[-1]
        rank = next((r for pattern, r in rank_pattern.items() if module.endswith(pattern)), config["r"])
        expected = (rank, in_features) if kind == "lora_A" else (out_features, rank)
        if tuple(shape) != expected:
            raise AdapterInvalid(f"Tensor {key} has shape {list(shape)}; the base model's {leaf} needs "
                                 f"{list(expected)}: the adapter was trained for another base model.",
                                 code="adapter_base_mismatch")
    if count == 0:
        raise AdapterInvalid("The adapter has no weights.", code="adapter_corrupt")
    if end != data_size:
        raise AdapterInvalid(f"The adapter weights are truncated or padded ({data_size} bytes of data, "
                             f"{end} described).", code="adapter_corrupt")
    return count


def _lora_module(key: str) -> tuple[str, str]:
    """``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`` -> (module path, lora_A)."""
    parts = key.split(".")
    if len(parts) < 3 or parts[-1] != "weight" or parts[-2] not in ("lora_A", "lora_B"):
        raise AdapterInvalid(f"Tensor {key} is not a LoRA weight.", code="adapter_unsupported")
    module = ".".join(parts[:-2]).removeprefix("base_model.model.")
    return module, parts[-2]


def base_linear_shapes(model_dir: Path) -> dict[str, tuple[int, int]]:
    """(out, in) of every 2-D ``*.weight`` of a base model directory, keyed by module path."""
    shapes: dict[str, tuple[int, int]] = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        header, _ = read_safetensors_header(path)
        for key, tensor in header.items():
            if key != "__metadata__" and key.endswith(".weight") and len(tensor["shape"]) == 2:
                shapes[key.removesuffix(".weight")] = (int(tensor["shape"][0]), int(tensor["shape"][1]))
    return shapes
