"""Exports: each format's time and size, and the streaming merge's peak memory against peft's
merge of the same adapter (the baseline), in one run.

    .venv-train/bin/python benchmarks/export.py [--base DIR] [--formats gguf:q8_0,onnx:int8,...]
        [--max-shard-size 40MB] [--json PATH]

The base model is ``--base`` (a Hugging Face folder; the embedded SmolLM2-135M-Instruct by
default) with an adapter of random non-zero weights on every linear layer (rank 16), made here.

1. The merge, twice, each in a child process whose peak resident memory (Linux's VmHWM) is read
   at its end: peft's ``merge_and_unload`` + ``save_pretrained`` (the whole model in memory, the
   way merges were made before), then ``python -m jobs.training.merge`` (shard by shard, with its
   checks), on base shards of ``--max-shard-size``. Reported: each one's peak above its loaded
   libraries, against the model's size, and the ratio of the two.
2. Each format and quantization (all of jobs/export/formats.py by default) through
   ``python -m jobs.export`` as an exports worker runs it, check included: wall time, artifact
   size, whether its check passed, and the check's figures.

The 8B shape on a GPU (issue 27) is not measured by this run: it needs a lent GPU, with random
weights of that shape written as the base.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO)]

from jobs.export import formats, protocol  # noqa: E402

# The baseline: peft's merge as merges were made before, its peak read at the end.
PEFT_MERGE = """
import sys, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
base, adapter, out = sys.argv[1:4]
before = rss("VmRSS:")
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
merged = PeftModel.from_pretrained(model, adapter).merge_and_unload().to(torch.bfloat16)
merged.save_pretrained(out, safe_serialization=True)
print(before, rss("VmHWM:"))
"""
# Imported libraries' memory, so that both merges are measured above the same floor.
WARM = "import torch, peft, transformers, safetensors"


def make_adapter(base: Path, directory: Path) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(
        r=16, lora_alpha=32, init_lora_weights=False, lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                        "down_proj"]))
    with torch.no_grad():  # peft's non-zero init is large: keep the model answering sensibly
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.mul_(0.05)
    peft_model.save_pretrained(directory)


def resharded(base: Path, directory: Path, max_shard_size: str) -> Path:
    """The base written again in shards of at most ``max_shard_size`` (the tokenizer beside)."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    model.save_pretrained(directory, max_shard_size=max_shard_size, safe_serialization=True)
    for path in base.iterdir():  # the tokenizer and the chat template
        if path.is_file() and not (directory / path.name).exists() and \
                not path.name.startswith("model.safetensors"):
            shutil.copyfile(path, directory / path.name)
    return directory


def merges(base: Path, adapter: Path, work: Path) -> dict:
    python = sys.executable
    floor = subprocess.run([python, "-c", WARM + "\nprint(open('/proc/self/status').read())"],
                           capture_output=True, text=True, check=True).stdout
    libraries = next(int(line.split()[1]) * 1024 for line in floor.splitlines()
                     if line.startswith("VmHWM:"))
    started = time.perf_counter()
    out = subprocess.run([python, "-c", PEFT_MERGE, str(base), str(adapter), str(work / "peft")],
                         capture_output=True, text=True, check=True, cwd=REPO)
    peft_seconds = time.perf_counter() - started
    _, peft_peak = map(int, out.stdout.split()[-2:])
    started = time.perf_counter()
    out = subprocess.run([python, "-m", "jobs.training.merge", "--base", str(base), "--adapter",
                          str(adapter), "--out", str(work / "merged")],
                         capture_output=True, text=True, cwd=REPO)
    if out.returncode != 0:
        raise SystemExit(f"the merge failed: {out.stderr[-2000:]}")
    streaming = json.loads(out.stdout.strip().splitlines()[-1])
    streaming_seconds = time.perf_counter() - started
    model_bytes = streaming["model_bytes"]
    peft_growth = peft_peak - libraries
    stream_growth = streaming["peak_rss_bytes"] - streaming["rss_before_bytes"]
    shards = streaming["shards"]
    return {"model_bytes": model_bytes, "shards": len(shards) if isinstance(shards, list) else shards,
            "libraries_bytes": libraries,
            "peft": {"seconds": peft_seconds, "peak_rss_bytes": peft_peak,
                     "peak_above_libraries_bytes": peft_growth,
                     "vs_model": peft_growth / model_bytes},
            "streaming": {"seconds": streaming_seconds, "merge_seconds": streaming["seconds"],
                          "peak_rss_bytes": streaming["peak_rss_bytes"],
                          "peak_above_start_bytes": stream_growth,
                          "vs_model": stream_growth / model_bytes,
                          "check": streaming["check"]},
            "streaming_vs_peft_peak": stream_growth / peft_growth}


def export(kind: tuple[str, str], base: Path, adapter: Path, merged: Path, work: Path) -> dict:
    name, quantization = kind
    out = work / f"{name}-{quantization or 'none'}"
    command = [sys.executable, "-m", "jobs.export", "--format", name, "--base", str(base),
               "--adapter", str(adapter), "--out", str(out), "--name", "model"]
    if quantization:
        command += ["--quantization", quantization]
    if formats.FORMATS[name].merged:
        command += ["--merged", str(merged)]
    started = time.perf_counter()
    run = subprocess.run(command, capture_output=True, text=True, cwd=REPO,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    seconds = time.perf_counter() - started
    last = None
    for line in run.stdout.splitlines():
        last = protocol.parse(line) or last
    if isinstance(last, protocol.Exported):
        return {"format": name, "quantization": quantization, "seconds": seconds,
                "bytes": Path(last.file).stat().st_size, "passed": bool(last.check.get("passed")),
                "check": last.check}
    error = last.message if isinstance(last, protocol.ExportError) else run.stderr[-500:]
    return {"format": name, "quantization": quantization, "seconds": seconds, "bytes": None,
            "passed": False, "error": error,
            "check": last.check if isinstance(last, protocol.ExportError) else {}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=Path, default=REPO / "var" / "models" / "SmolLM2-135M-Instruct")
    parser.add_argument("--formats", default="", help="format:quantization,... (all by default)")
    parser.add_argument("--max-shard-size", default="40MB",
                        help="the base's shards for the merges (the streaming merge's unit)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    kinds = ([tuple((item.split(":") + [""])[:2]) for item in args.formats.split(",") if item]
             or [(f.name, q) for f in formats.FORMATS.values() for q in (f.quantizations or ("",))])
    with tempfile.TemporaryDirectory(prefix="bench-export-") as scratch:
        work = Path(scratch)
        print("making the adapter and the sharded base ...", flush=True)
        base = resharded(args.base, work / "base", args.max_shard_size)
        make_adapter(base, work / "adapter")
        print("1. the merges ...", flush=True)
        results: dict = {"date": time.strftime("%Y-%m-%d"), "cpu_count": os.cpu_count(),
                         "base": args.base.name, "max_shard_size": args.max_shard_size,
                         "merge": merges(base, work / "adapter", work)}
        print("2. the exports ...", flush=True)
        results["exports"] = []
        for kind in kinds:
            row = export(kind, base, work / "adapter", work / "merged", work)
            results["exports"].append(row)
            size = f"{row['bytes'] / 2**20:8.1f} MiB" if row["bytes"] else "       -    "
            print(f"   {kind[0]:12} {kind[1] or '-':7} {row['seconds']:7.1f} s {size} "
                  f"check {'passed' if row['passed'] else 'FAILED: ' + row.get('error', '')}",
                  flush=True)
    merge = results["merge"]
    print(f"\nmodel {merge['model_bytes'] / 2**20:.0f} MiB in {merge['shards']} shard(s)")
    print(f"peft merge:      peak {merge['peft']['peak_above_libraries_bytes'] / 2**20:7.0f} MiB "
          f"above its libraries ({merge['peft']['vs_model']:.2f}x the model), "
          f"{merge['peft']['seconds']:.1f} s")
    print(f"streaming merge: peak {merge['streaming']['peak_above_start_bytes'] / 2**20:7.0f} MiB "
          f"above its start ({merge['streaming']['vs_model']:.2f}x the model), "
          f"{merge['streaming']['seconds']:.1f} s with its checks: "
          f"{merge['streaming_vs_peft_peak']:.2f}x peft's peak")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
