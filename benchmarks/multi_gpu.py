"""Data-parallel training on several GPUs: the trainer under torchrun on N GPUs against one GPU.

    python3 benchmarks/multi_gpu.py --shape llama-1b --tokenizer DIR --gpus 2 [--steps 8]
        [--batch-size 8] [--accumulation 2] [--mean-words 400] [--json-out FILE]

Builds a random-initialised Llama of the shape (benchmarks/train_throughput.py's shapes, with the
tokenizer in DIR) and a chat dataset, then runs the real entry point (`python -m jobs.training.run`)
twice at the same global batch (batch size × accumulation examples a step, the same order):
once on one GPU, once under `torchrun --nproc-per-node=N`. Prints each step's loss from both
(data parallelism must not change them beyond float summation order) and useful tokens/s after the
first two steps, with the speed-up over one GPU. Needs N CUDA GPUs and peft.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.train_throughput import SHAPES, build_random_llama, write_dataset  # noqa: E402

WARMUP_STEPS = 2


def run(processes: int, config: dict, work: Path) -> dict:
    """One training run through the JSON-lines protocol: per-step metrics and the wall time."""
    path = work / f"config-{processes}.json"
    path.write_text(json.dumps({**config, "output_dir": str(work / f"out-{processes}")}))
    module = [sys.executable, "-m", "jobs.training.run", str(path)]
    command = module if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc-per-node={processes}", *module[1:]]
    started = time.monotonic()
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(
                                filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))})
    elapsed = time.monotonic() - started
    messages = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    if result.returncode != 0:
        sys.stderr.write(result.stderr[-4000:])
        raise SystemExit(f"the {processes}-process run failed ({result.returncode})")
    steps = [m["data"] for m in messages if m["type"] == "metrics"]
    timed = steps[WARMUP_STEPS:]
    return {"processes": processes, "wall_s": round(elapsed, 1),
            "losses": [s["train_loss"] for s in steps],
            "tokens_per_s": statistics.median(s["tokens_per_second"] for s in timed) if timed else None,
            "events": [m["message"] for m in messages if m["type"] == "event"][:3]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama-1b")
    parser.add_argument("--tokenizer", type=Path, required=True)
    parser.add_argument("--gpus", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--accumulation", type=int, default=2)
    parser.add_argument("--mean-words", type=float, default=400.0)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--work", type=Path)
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()

    work = args.work or Path(tempfile.mkdtemp(prefix="multi-gpu-"))
    work.mkdir(parents=True, exist_ok=True)
    model = build_random_llama(SHAPES[args.shape], args.tokenizer, work / f"model-{args.shape}")
    data = work / "train.jsonl"
    write_dataset(data, args.steps * args.batch_size * args.accumulation, mean_words=args.mean_words)
    config = {"base_model_dir": str(model), "train_file": str(data), "device": "cuda",
              "lora_rank": 16, "lora_dropout": 0.0, "learning_rate": 1e-4, "epochs": 1,
              "batch_size": args.batch_size, "gradient_accumulation_steps": args.accumulation,
              "max_steps": args.steps, "max_seq_len": args.seq_len, "checkpoint_every_steps": 10**6}
    one = run(1, config, work)
    many = run(args.gpus, config, work)
    pairs = list(zip(one["losses"], many["losses"], strict=True))
    worst = max(abs(a - b) / max(abs(a), 1e-9) for a, b in pairs)
    speedup = (many["tokens_per_s"] / one["tokens_per_s"]
               if one["tokens_per_s"] and many["tokens_per_s"] else None)
    print(f"{args.shape}, global batch {args.batch_size} x {args.accumulation}, {args.steps} steps")
    print(f"{'step':>5}{'1 GPU loss':>14}{f'{args.gpus} GPUs loss':>14}")
    for step, (a, b) in enumerate(pairs, 1):
        print(f"{step:>5}{a:>14.6f}{b:>14.6f}")
    print(f"largest relative loss difference {worst:.2e}")
    print(f"useful tokens/s (median after {WARMUP_STEPS} steps): 1 GPU {one['tokens_per_s']}, "
          f"{args.gpus} GPUs {many['tokens_per_s']}"
          + (f": {speedup:.2f}x ({speedup / args.gpus:.0%} scaling)" if speedup else ""))
    result = {"shape": args.shape, "gpus": args.gpus, "steps": args.steps,
              "batch_size": args.batch_size, "accumulation": args.accumulation,
              "one": one, "many": many, "largest_relative_loss_difference": worst,
              "speedup": speedup}
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
