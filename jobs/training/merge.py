"""Merge a LoRA adapter into its base model and export a plain safetensors model directory.

    python -m jobs.training.merge --base BASE_DIR --adapter ADAPTER_DIR --out OUT_DIR

The merged weights are written in the base model's dtype (bf16 for the embedded model) with the
tokenizer, to a temporary sibling renamed into place. Prints {"directory", "files"} as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from jobs.training.layout import staged_directory


def merge(base_dir: Path, adapter_dir: Path, out_dir: Path) -> dict:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # On the GPU the merge's worker holds (its slot is counted by the scheduler), in the base
    # model's own dtype; on a CPU in float32 (bf16 matmuls are slow there), cast back after.
    on_gpu = torch.cuda.is_available()
    base = AutoModelForCausalLM.from_pretrained(
        base_dir, dtype="auto" if on_gpu else torch.float32, device_map="cuda" if on_gpu else None)
    dtype = getattr(base.config, "dtype", None) or torch.bfloat16
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    merged = merged.to(dtype if isinstance(dtype, torch.dtype) else torch.bfloat16)
    with staged_directory(out_dir) as staging:
        merged.save_pretrained(staging, safe_serialization=True)
        AutoTokenizer.from_pretrained(base_dir).save_pretrained(staging)
    return {"directory": str(out_dir), "files": sorted(p.name for p in out_dir.iterdir())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Merge a LoRA adapter into its base model.")
    parser.add_argument("--base", type=Path, required=True)
    parser.add_argument("--adapter", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    summary = merge(args.base, args.adapter, args.out)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
