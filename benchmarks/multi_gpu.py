"""Training on several GPUs: the trainer under torchrun on N GPUs against one GPU, a model too
large for one GPU sharded, and a multi-GPU run killed and resumed.

    python3 benchmarks/multi_gpu.py --shape llama-8b --tokenizer DIR --gpus 2 [--steps 8]
        [--batch-size 8] [--accumulation 2] [--mean-words 400] [--sharding auto|off|fsdp]
        [--kill-resume] [--json-out FILE]
    python3 benchmarks/multi_gpu.py --sharded-only --shape llama-70b --tokenizer DIR --gpus 2 ...

Scaling (the default): builds a random-initialised Llama of the shape
(benchmarks/train_throughput.py's shapes, with the tokenizer in DIR) and a chat dataset, then runs
the real entry point (`python -m jobs.training.run`) twice at the same global batch (batch size ×
accumulation examples a step, the same order): once on one GPU, once under
`torchrun --nproc-per-node=N` with the job's `sharding`. Prints each step's loss from both (data
parallelism must not change them beyond float summation order) and useful tokens/s after the first
two steps, with the speed-up over one GPU. `--kill-resume` then runs the N-GPU job again, kills
the whole torchrun group (SIGKILL) once its first checkpoint is recorded, and resumes it on N GPUs
from that checkpoint: the resumed steps must have the uninterrupted run's losses.

`--sharded-only`: no one-GPU run (the shape need not fit one GPU); the N-GPU job runs with
`sharding: fsdp` on random weights that each rank draws for its own shards on its GPU
(jobs.training.sharding's benchmark switch: a 70B shape's 141 GB of weights would not fit the
disk), and its loss must fall. Needs N CUDA GPUs and peft.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.train_throughput import SHAPES, build_random_llama, write_dataset  # noqa: E402
from jobs.training.sharding import RANDOM_WEIGHTS_ENV  # noqa: E402

WARMUP_STEPS = 2


def start(processes: int, config: dict, work: Path, name: str,
          environ: dict | None = None) -> subprocess.Popen:
    """The entry point on ``processes`` GPUs (torchrun beyond one), in its own process group."""
    path = work / f"config-{name}.json"
    path.write_text(json.dumps({**config, "output_dir": str(work / f"out-{name}")}))
    module = [sys.executable, "-m", "jobs.training.run", str(path)]
    command = module if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc-per-node={processes}", *module[1:]]
    env = {**os.environ, **(environ or {}), "PYTHONPATH": os.pathsep.join(
        filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    return subprocess.Popen(command, cwd=REPO, text=True, stdout=subprocess.PIPE,
                            stderr=(work / f"{name}.log").open("w"), env=env,
                            start_new_session=True)


def run(processes: int, config: dict, work: Path, name: str | None = None,
        environ: dict | None = None) -> dict:
    """One training run through the JSON-lines protocol: per-step metrics and the wall time."""
    name = name or str(processes)
    started = time.monotonic()
    process = start(processes, config, work, name, environ)
    messages = [json.loads(line) for line in process.stdout if line.startswith("{")]
    code = process.wait()
    if code != 0:
        sys.stderr.write((work / f"{name}.log").read_text()[-4000:])
        raise SystemExit(f"the {processes}-process run {name} failed ({code})")
    return summary(processes, messages, time.monotonic() - started)


def summary(processes: int, messages: list[dict], elapsed: float) -> dict:
    steps = [m["data"] for m in messages if m["type"] == "metrics"]
    timed = steps[WARMUP_STEPS:]
    return {"processes": processes, "wall_s": round(elapsed, 1),
            "steps": [s["step"] for s in steps],
            "losses": [s["train_loss"] for s in steps],
            "tokens_per_s": statistics.median(s["tokens_per_second"] for s in timed) if timed else None,
            "step_tokens_per_s": [s["tokens_per_second"] for s in steps],
            "peak_gib_rank0": max((s.get("gpu_memory_peak_gib", 0) for s in steps), default=None),
            "events": [m["message"] for m in messages if m["type"] == "event"][:4]}


def kill_and_resume(processes: int, config: dict, work: Path) -> dict:
    """The N-GPU job killed (SIGKILL to the torchrun group) once its first checkpoint is recorded,
    then resumed on N GPUs from it."""
    every = max(1, config["max_steps"] // 2)
    started = time.monotonic()
    killed = start(processes, {**config, "checkpoint_every_steps": every}, work, "killed")
    checkpoint = None
    try:
        for line in killed.stdout:
            message = json.loads(line) if line.startswith("{") else {}
            if message.get("type") == "checkpoint":
                checkpoint = message
                break
    finally:
        if killed.poll() is None:
            os.killpg(killed.pid, signal.SIGKILL)
        killed.wait()
    if checkpoint is None:
        raise SystemExit("the job ended before its first checkpoint")
    killed_after = round(time.monotonic() - started, 1)
    resumed = run(processes, {**config, "checkpoint_every_steps": every,
                              "resume_from": checkpoint["path"]}, work, "resumed")
    return {"killed_at_step": checkpoint["step"], "killed_after_s": killed_after,
            "killed_returncode": killed.returncode, "resumed": resumed}


def write_skeleton(shape: dict, tokenizer_dir: Path, out: Path) -> Path:
    """config.json and the tokenizer of a shape, without weights (drawn on the GPUs)."""
    from transformers import AutoTokenizer, LlamaConfig

    out.mkdir(parents=True, exist_ok=True)
    LlamaConfig(**shape).save_pretrained(out)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
    return out


def sharded_only(args, config: dict, work: Path) -> dict:
    model = write_skeleton(SHAPES[args.shape], args.tokenizer, work / f"skeleton-{args.shape}")
    result = run(args.gpus, {**config, "base_model_dir": str(model), "sharding": "fsdp"}, work,
                 f"sharded-{args.shape}", environ={RANDOM_WEIGHTS_ENV: "1"})
    losses = result["losses"]
    print(f"{args.shape} sharded over {args.gpus} GPUs (FSDP2), random weights: "
          f"loss {losses[0]:.4f} -> {losses[-1]:.4f} over {len(losses)} steps; "
          f"useful tokens/s {result['tokens_per_s']}; rank 0 peak {result['peak_gib_rank0']} GiB")
    for event in result["events"]:
        print("  ", event)
    return {"shape": args.shape, "gpus": args.gpus, "steps": args.steps,
            "batch_size": args.batch_size, "accumulation": args.accumulation,
            "sharded": result, "loss_fell": losses[-1] < losses[0]}


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
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--sharding", choices=("auto", "off", "fsdp"), default="auto",
                        help="the N-GPU job's sharding (the one-GPU job has none)")
    parser.add_argument("--kill-resume", action="store_true",
                        help="also kill the N-GPU job after its first checkpoint and resume it")
    parser.add_argument("--sharded-only", action="store_true",
                        help="only the N-GPU job, sharded, on random weights drawn on the GPUs")
    parser.add_argument("--work", type=Path)
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()

    work = args.work or Path(tempfile.mkdtemp(prefix="multi-gpu-"))
    work.mkdir(parents=True, exist_ok=True)
    data = work / "train.jsonl"
    write_dataset(data, args.steps * args.batch_size * args.accumulation, mean_words=args.mean_words)
    config = {"train_file": str(data), "device": "cuda",
              "lora_rank": 16, "lora_dropout": 0.0, "learning_rate": args.learning_rate,
              "epochs": 1, "batch_size": args.batch_size,
              "gradient_accumulation_steps": args.accumulation,
              "max_steps": args.steps, "max_seq_len": args.seq_len, "checkpoint_every_steps": 10**6}
    if args.sharded_only:
        result = sharded_only(args, config, work)
        if args.json_out:
            args.json_out.write_text(json.dumps(result, indent=1))
        return 0 if result["loss_fell"] else 1
    model = build_random_llama(SHAPES[args.shape], args.tokenizer, work / f"model-{args.shape}")
    config["base_model_dir"] = str(model)
    one = run(1, config, work)
    many = run(args.gpus, {**config, "sharding": args.sharding}, work)
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
              "sharding": args.sharding, "one": one, "many": many,
              "largest_relative_loss_difference": worst, "speedup": speedup}
    if args.kill_resume:
        resume = kill_and_resume(args.gpus, {**config, "sharding": args.sharding}, work)
        resumed = dict(zip(resume["resumed"]["steps"], resume["resumed"]["losses"], strict=True))
        expected = dict(enumerate(many["losses"], 1))
        resume["largest_relative_loss_difference"] = max(
            abs(loss - expected[step]) / max(abs(expected[step]), 1e-9)
            for step, loss in resumed.items())
        print(f"killed after the step-{resume['killed_at_step']} checkpoint "
              f"({resume['killed_after_s']} s in, return code {resume['killed_returncode']}); "
              f"resumed steps {sorted(resumed)}: largest relative loss difference against the "
              f"uninterrupted run {resume['largest_relative_loss_difference']:.2e}")
        result["kill_resume"] = resume
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
