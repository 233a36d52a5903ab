"""Merge a LoRA adapter into its base model, one safetensors shard at a time, and prove it.

    python -m jobs.training.merge --base BASE_DIR --adapter ADAPTER_DIR --out OUT_DIR
                                  [--max-shard-size 2GB] [--skip-check]

The base model's shards are read one at a time; each targeted weight gets its LoRA delta
(``B @ A`` times ``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with rsLoRA) added in float32
and is cast back to the weight's own dtype; each output shard is written as soon as it is
complete. Peak memory is therefore about one output shard plus the adapter, whatever the model's
size. Config, generation config, tokenizer and chat template files are copied. Everything is
written to a temporary sibling renamed into place only once the check has passed.

The check (jobs.training.merge_check) compares the merged model with the base model + adapter
run through peft: its logits on fixed prompts, and every weight against the base's plus peft's
own delta; its figures go into ``merge-check.json`` beside the weights and into the summary.
Prints one JSON object on stdout::

    {"directory", "files", "shards", "tensors", "merged_tensors", "model_bytes",
     "peak_rss_bytes", "seconds", "check": {"passed", "kind": "logits", "max_abs_diff",
     "tolerance", "prompts", "weights": {"max_ulps", ...}, ...} | null, "check_peak_rss_bytes"}

``peak_rss_bytes`` is the process's peak resident memory when the shards are written (before the
check loads any model), ``rss_before_bytes`` its memory with its libraries loaded, before reading
anything; ``check_peak_rss_bytes`` the peak after the check.

Exit status 0 when merged and proven; 1 when the check failed (nothing is kept, and the last
line on stderr holds the figures); 2 when the adapter cannot be merged so (the reason on stderr's
last line: DoRA, a bias, ...). ``--skip-check`` is for benchmarks of shapes that cannot be loaded
twice on the machine; the platform always runs the check.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import resource
import shutil
import struct
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from jobs.training.layout import sha256_of, staged_directory

CHECK_FILE = "merge-check.json"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3
# Base files that are weights (rewritten or refused), never copied as they are.
_WEIGHT_FILE = re.compile(r".*\.(safetensors|bin|pt|pth|ckpt|gguf|h5|msgpack|onnx|onnx_data)"
                          r"(\.index\.json)?$")
_LORA_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<part>[AB])\.weight$")
_FLOATS = {"F64", "F32", "F16", "BF16"}


class CannotMerge(ValueError):
    """The adapter (or base) cannot be merged by this merge: the message says why."""


class MergeCheckFailed(RuntimeError):
    def __init__(self, check: dict[str, Any]):
        from jobs.training.merge_check import failure_line

        super().__init__(failure_line(check))
        self.check = check


@dataclass(frozen=True)
class Delta:
    """One targeted weight's LoRA: ``weight += scale * (B @ A)`` (transposed for fan-in-fan-out)."""

    a: Any  # torch.Tensor (r, in_features)
    b: Any  # torch.Tensor (out_features, r)
    scale: float
    fan_in_fan_out: bool

    def shape(self) -> tuple[int, int]:
        out_features, in_features = self.b.shape[0], self.a.shape[1]
        return (in_features, out_features) if self.fan_in_fan_out else (out_features, in_features)

    def apply(self, weight):
        import torch

        a, b = self.a.to(torch.float32), self.b.to(torch.float32)
        left, right = (a.T, b.T) if self.fan_in_fan_out else (b, a)
        # weight + scale * (left @ right) in one pass over the weight, in float32
        return torch.addmm(weight.to(torch.float32), left, right, alpha=self.scale).to(weight.dtype)


@dataclass(frozen=True)
class OutputShard:
    source: Path  # the base shard its tensors come from
    names: tuple[str, ...]  # in the order they lie in the source
    nbytes: int


# --- reading safetensors headers (no tensor data is read) -------------------------------------

def safetensors_header(handle: IO[bytes]) -> dict[str, dict[str, Any]]:
    """The tensors of a safetensors file, ``{name: {"dtype", "shape", "data_offsets"}}``, read from
    its header (``__metadata__`` left out); ValueError when it is not a safetensors header."""
    head = handle.read(8)
    if len(head) != 8:
        raise ValueError("shorter than a safetensors header")
    (length,) = struct.unpack("<Q", head)
    if length > 100 * 1024 * 1024:
        raise ValueError(f"a safetensors header of {length} bytes")
    header = json.loads(handle.read(length))
    header.pop("__metadata__", None)
    return header


def _header_of(path: Path) -> dict[str, dict[str, Any]]:
    with path.open("rb") as handle:
        return safetensors_header(handle)


def base_shards(base_dir: Path) -> list[Path]:
    """The base model's safetensors files, in order (its index's, or the single file)."""
    index = base_dir / INDEX_FILE
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [base_dir / name for name in sorted(set(weight_map.values()))]
    single = base_dir / "model.safetensors"
    if single.exists():
        return [single]
    raise CannotMerge(f"{base_dir} holds no model.safetensors or {INDEX_FILE} (only safetensors "
                      "base models are merged: pickled weights are never loaded)")


def plan_shards(sources: list[Path], max_shard_bytes: int) -> list[OutputShard]:
    """The output shards: the base's own, each split where it would pass ``max_shard_bytes``."""
    shards = []
    for source in sources:
        header = _header_of(source)
        names, nbytes = [], 0
        for name, info in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
            size = info["data_offsets"][1] - info["data_offsets"][0]
            if names and nbytes + size > max_shard_bytes:
                shards.append(OutputShard(source, tuple(names), nbytes))
                names, nbytes = [], 0
            names.append(name)
            nbytes += size
        if names:
            shards.append(OutputShard(source, tuple(names), nbytes))
    return shards


# --- the adapter ------------------------------------------------------------------------------

def lora_config(adapter_dir: Path):
    """peft's LoraConfig of the adapter, refused (CannotMerge) where this merge would not give
    what peft runs: a LoRA variant (DoRA, ...), trained biases, extra trained modules."""
    from peft import LoraConfig

    raw = json.loads((adapter_dir / "adapter_config.json").read_text())
    if raw.get("peft_type", "LORA") != "LORA":
        raise CannotMerge(f"the adapter is a {raw['peft_type']} adapter: only LoRA is merged")
    config = LoraConfig.from_pretrained(str(adapter_dir))
    if config.use_dora:
        raise CannotMerge("the adapter uses DoRA (use_dora): its magnitude vectors are not merged "
                          "by this merge; merge it with peft's merge_and_unload instead")
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        variant = (field.metadata.get("is_lora_variant") and bool(value)) or (
            field.name == "init_lora_weights" and isinstance(value, str)
            and any(value.startswith(v) for v in field.metadata.get("lora_variants", ())))
        if variant:
            raise CannotMerge(f"the adapter is a LoRA variant ({field.name}={value!r}), which "
                              "this merge does not support")
    unsupported = {
        "bias": config.bias != "none", "lora_bias": config.lora_bias,
        "modules_to_save": bool(config.modules_to_save),
        "trainable_token_indices": bool(config.trainable_token_indices),
        "layer_replication": bool(config.layer_replication),
        "target_parameters": bool(config.target_parameters),
        "megatron_config": bool(config.megatron_config),
    }
    for name, present in unsupported.items():
        if present:
            raise CannotMerge(f"the adapter sets {name}={getattr(config, name)!r}, which this "
                              "merge does not support (only plain LoRA on linear weights)")
    return config


def scale_of(config, module: str, rank: int) -> float:
    """peft's scaling for ``module`` (rank_pattern and alpha_pattern honoured, as peft does)."""
    from peft.utils.other import get_pattern_key

    r = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), module), config.r)
    alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), module),
                                     config.lora_alpha)
    if r != rank:
        raise CannotMerge(f"{module}'s LoRA has rank {rank} but its adapter_config.json says {r}")
    return alpha / math.sqrt(r) if config.use_rslora else alpha / r


def load_deltas(adapter_dir: Path, base_header: dict[str, dict[str, Any]],
                tied_embeddings: bool) -> dict[str, Delta]:
    """Each targeted base weight's name → its Delta, after checking that the adapter's weights,
    its config's target modules and the base's weights agree."""
    from peft.tuners.tuners_utils import check_target_module_exists
    from safetensors.torch import load_file

    config = lora_config(adapter_dir)
    weights = load_file(adapter_dir / "adapter_model.safetensors")
    parts: dict[str, dict[str, Any]] = {}
    for key, tensor in weights.items():
        found = _LORA_KEY.match(key)
        if found is None:
            raise CannotMerge(f"adapter_model.safetensors holds {key}, which is not a LoRA A or B "
                              "weight of a linear layer (embeddings, biases, magnitudes and "
                              "saved modules are not merged)")
        parts.setdefault(found["module"], {})[found["part"]] = tensor
    deltas = {}
    for module, pair in sorted(parts.items()):
        if set(pair) != {"A", "B"}:
            raise CannotMerge(f"the adapter holds only lora_{next(iter(pair))} for {module}")
        if not _targeted(check_target_module_exists(config, module)):
            raise CannotMerge(f"the adapter holds weights for {module}, which its "
                              "adapter_config.json does not target")
        if tied_embeddings and module.split(".")[-1] == "lm_head":
            raise CannotMerge("the adapter targets lm_head of a model with tied embeddings: "
                              "merging it would change the input embeddings too")
        a, b = pair["A"], pair["B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise CannotMerge(f"{module}'s LoRA has shapes A {tuple(a.shape)}, B {tuple(b.shape)}: "
                              "only linear layers are merged")
        delta = Delta(a, b, scale_of(config, module, a.shape[0]), config.fan_in_fan_out)
        target = f"{module}.weight"
        info = base_header.get(target)
        if info is None:
            raise CannotMerge(f"the adapter targets {module}, which has no weight in the base model")
        if info["dtype"] not in _FLOATS or tuple(info["shape"]) != delta.shape():
            raise CannotMerge(f"{target} is {info['dtype']} {tuple(info['shape'])} in the base "
                              f"model; the adapter's delta is {delta.shape()} (float weights only)")
        deltas[target] = delta
    untrained = [name for name in base_header if name.endswith(".weight")
                 and name not in deltas and len(base_header[name]["shape"]) == 2
                 and _targeted(check_target_module_exists(config, name[: -len(".weight")]))]
    if untrained:
        raise CannotMerge(f"the adapter targets {untrained[0][: -len('.weight')]} "
                          f"(and {len(untrained) - 1} more) but holds no weights for it")
    return deltas


def _targeted(match) -> bool:
    # peft returns a truthy _ExcludedModule for excluded modules
    return bool(match) and type(match).__name__ != "_ExcludedModule"


# --- the merge --------------------------------------------------------------------------------

def write_merged_shards(shards: list[OutputShard], deltas: dict[str, Delta], out_dir: Path) -> dict:
    """Each output shard read, merged and written before the next is read."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)])
    weight_map, merged = {}, 0
    for shard, file_name in zip(shards, names):
        tensors = {}
        for name in shard.names:
            # opened for each tensor: safe_open maps the whole file, and the pages it reads would
            # otherwise stay resident (and counted) until the file is closed
            with safe_open(shard.source, framework="pt") as source:
                metadata = source.metadata() or {}
                tensor = source.get_tensor(name)
            if name in deltas:
                tensor = deltas[name].apply(tensor)
                merged += 1
            tensors[name] = tensor
        save_file(tensors, out_dir / file_name, metadata={**metadata, "format": "pt"})
        del tensors
        weight_map.update(dict.fromkeys(shard.names, file_name))
    total = sum(shard.nbytes for shard in shards)
    if len(shards) > 1:
        (out_dir / INDEX_FILE).write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))},
            indent=2) + "\n")
    return {"shards": len(shards), "tensors": len(weight_map), "merged_tensors": merged,
            "model_bytes": total}


def copy_model_files(base_dir: Path, out_dir: Path) -> None:
    """Config, generation config, tokenizer, chat template, ...: the base's files that are not
    weights (top level only)."""
    for path in sorted(base_dir.iterdir()):
        if path.is_file() and not path.name.startswith(".") and not _WEIGHT_FILE.match(path.name):
            shutil.copyfile(path, out_dir / path.name)


def peak_rss_bytes() -> int:
    """This process's peak resident memory. Linux's VmHWM, not getrusage's ru_maxrss: that one
    survives exec, so a merge started by a large process (a test run, a worker that loaded a
    model) would report its parent's size at the fork."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def current_rss_bytes() -> int:
    try:
        resident_pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


def merge(base_dir: Path, adapter_dir: Path, out_dir: Path, *, check: bool = True,
          max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> dict:
    """Merge into ``out_dir`` (complete or absent); the summary printed by the CLI.

    CannotMerge when the adapter cannot be merged so; MergeCheckFailed (with the figures) when the
    merged model does not answer like base + adapter: nothing is left at ``out_dir`` then."""
    import peft  # noqa: F401 - loaded before the baseline is taken, as the merge needs them
    import safetensors.torch  # noqa: F401

    started, rss_before = time.monotonic(), current_rss_bytes()
    sources = base_shards(base_dir)
    header = {name: info for source in sources for name, info in _header_of(source).items()}
    config = json.loads((base_dir / "config.json").read_text())
    deltas = load_deltas(adapter_dir, header, bool(config.get("tie_word_embeddings")))
    with staged_directory(out_dir) as staging:
        summary = write_merged_shards(plan_shards(sources, max_shard_bytes), deltas, staging)
        del deltas
        copy_model_files(base_dir, staging)
        summary["peak_rss_bytes"] = peak_rss_bytes()  # the merge's own, before the check loads
        summary["rss_before_bytes"] = rss_before  # the process with its libraries, nothing read
        summary["seconds"] = round(time.monotonic() - started, 3)
        summary["check"] = None
        if check:
            from jobs.training.merge_check import check_merge

            figures = check_merge(base_dir, adapter_dir, staging)
            figures["adapter_sha256"] = sha256_of(adapter_dir)
            summary["check"] = figures
            summary["check_peak_rss_bytes"] = peak_rss_bytes()
            if not figures["passed"]:
                raise MergeCheckFailed(figures)
            (staging / CHECK_FILE).write_text(json.dumps(figures, indent=2) + "\n")
    summary["directory"] = str(out_dir)
    summary["files"] = sorted(p.name for p in out_dir.iterdir())
    return summary


def parse_size(text: str) -> int:
    """'2GB', '500MB', '1GiB', '123' (bytes) → bytes."""
    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", text, re.IGNORECASE)
    if found is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 2GB or 500MB")
    number, unit, binary = found.groups()
    base = 1024 if binary else 1000
    return int(float(number) * base ** "_KMGT".index(unit.upper() or "_"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Merge a LoRA adapter into its base model.")
    parser.add_argument("--base", type=Path, required=True)
    parser.add_argument("--adapter", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--max-shard-size", type=parse_size, default=DEFAULT_MAX_SHARD_BYTES,
                        help="split the base's shards into output shards of at most this size "
                             "(it bounds the merge's memory; default 2GiB)")
    parser.add_argument("--skip-check", action="store_true",
                        help="do not load base + adapter and the merged model to compare their "
                             "logits (benchmarks only: the platform always checks)")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        summary = merge(args.base, args.adapter, args.out, check=not args.skip_check,
                        max_shard_bytes=args.max_shard_size)
    except CannotMerge as exc:
        print(f"cannot merge: {exc}", file=sys.stderr, flush=True)
        return 2
    except MergeCheckFailed as exc:
        print(json.dumps({"directory": None, "files": [], "check": exc.check}), flush=True)
        print(str(exc), file=sys.stderr, flush=True)
        return 1
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
