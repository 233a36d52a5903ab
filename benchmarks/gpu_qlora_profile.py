"""Where a QLoRA micro-batch-1 step's time goes on a GPU: the trainer's own entry point, profiled.

    python3 benchmarks/gpu_qlora_profile.py --tokenizer DIR [--shape llama-8b] [--steps 10]
        [--memory-limit-gib 8] [--out DIR]

Runs ``train(config, report)`` (QLoRA, micro-batch 1, the chat data of train_throughput.py) twice
in this process: under ``--memory-limit-gib`` (the trainer's memory plan, as the benchmark runs it)
and on the whole GPU with no checkpointing, so recomputation's share shows. In the first run, two
steps are profiled with torch.profiler (started and stopped from the reporter, between steps):
the wall time against the GPU's busy time (the sum of kernel times), kernel launches per step, and
the operators that cost the most host and device time. Writes ``qlora-profile.json`` and the
operator tables to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.train_throughput import SHAPES, build_random_llama, write_dataset  # noqa: E402

PROFILED = (4, 6)  # profile from after this step's metrics to after that one's: steps 5 and 6


def _device_time(event) -> float:
    return getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0)


class ProfilingReporter:
    """Records each step's metrics; profiles the steps between PROFILED[0] and PROFILED[1]."""

    def __init__(self, profile: bool) -> None:
        self.log: list[dict] = []
        self.plan: dict = {}
        self.profile = profile
        self.profiler = None
        self.window: tuple[float, float] | None = None

    def event(self, message, *, level="info", data=None):
        if data and "checkpointed_layers" in data:
            self.plan = {**data, "message": message}

    def metrics(self, data):
        import torch

        self.log.append(data)
        if not self.profile:
            return
        if data["step"] == PROFILED[0]:
            torch.cuda.synchronize()
            self.profiler = torch.profiler.profile(activities=[
                torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA])
            self.profiler.__enter__()
            self.window = (time.perf_counter(), 0.0)
        elif data["step"] == PROFILED[1] and self.profiler is not None:
            torch.cuda.synchronize()
            self.window = (self.window[0], time.perf_counter())
            self.profiler.__exit__(None, None, None)

    def checkpoint(self, *a, **k):
        pass

    def should_stop(self):
        return False

    def should_pause(self):
        return False


def run(config, *, profile: bool) -> tuple[dict, ProfilingReporter]:
    import torch

    from jobs.training.trainer import train

    if config.memory_limit_gib is None:  # an earlier run's cap stays on the process
        torch.cuda.set_per_process_memory_fraction(1.0)
    torch.cuda.reset_peak_memory_stats()
    reporter = ProfilingReporter(profile)
    train(config, reporter)
    steady = reporter.log[1:]
    seconds = steady[-1]["elapsed_seconds"] - reporter.log[0]["elapsed_seconds"]
    return {"useful_tokens_per_second": sum(m["tokens"] for m in steady) / seconds,
            "step_seconds": [round(b["elapsed_seconds"] - a["elapsed_seconds"], 4)
                             for a, b in zip(reporter.log, reporter.log[1:], strict=False)],
            "tokens": [m["tokens"] for m in reporter.log],
            "losses": [m["train_loss"] for m in reporter.log],
            "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
            "plan": reporter.plan}, reporter


def summarise(reporter: ProfilingReporter, out: Path | None) -> dict:
    averages = reporter.profiler.key_averages()
    wall_us = (reporter.window[1] - reporter.window[0]) * 1e6
    busy_us = sum(_device_time(e) for e in averages)
    launches = sum(e.count for e in averages if e.key in ("cudaLaunchKernel", "cuLaunchKernel",
                                                          "cudaLaunchKernelExC"))
    steps = PROFILED[1] - PROFILED[0]
    top_host = sorted(averages, key=lambda e: e.self_cpu_time_total, reverse=True)[:20]
    top_device = sorted(averages, key=_device_time, reverse=True)[:20]
    summary = {
        "profiled_steps": steps, "wall_ms_per_step": round(wall_us / 1000 / steps, 1),
        "gpu_busy_ms_per_step": round(busy_us / 1000 / steps, 1),
        "gpu_busy_share": round(busy_us / wall_us, 3),
        "kernel_launches_per_step": launches // steps,
        "top_host_ops_ms_per_step": {e.key: round(e.self_cpu_time_total / 1000 / steps, 2)
                                     for e in top_host},
        "top_device_ops_ms_per_step": {e.key: round(_device_time(e) / 1000 / steps, 2)
                                       for e in top_device},
    }
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        for sort in ("self_cpu_time_total", "self_cuda_time_total"):
            try:
                table = averages.table(sort_by=sort, row_limit=40)
            except (KeyError, AttributeError, RuntimeError):
                continue
            (out / f"qlora-ops-by-{sort}.txt").write_text(table)
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama-8b")
    parser.add_argument("--tokenizer", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--mean-words", type=float, default=400.0)
    parser.add_argument("--memory-limit-gib", type=float, default=8.0)
    parser.add_argument("--work", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    from jobs.training.config import TrainingConfig

    work = args.work or Path(tempfile.mkdtemp(prefix="qlora-profile-"))
    work.mkdir(parents=True, exist_ok=True)
    model = build_random_llama(SHAPES[args.shape], args.tokenizer, work / f"model-{args.shape}")
    data = work / "chat.jsonl"
    write_dataset(data, args.steps, mean_words=args.mean_words)
    base = TrainingConfig(
        base_model_dir=str(model), train_file=str(data), output_dir=str(work / "out"),
        method="qlora", lora_rank=16, lora_alpha=32, lora_dropout=0.0, learning_rate=2e-4,
        epochs=1, batch_size=1, max_seq_len=args.seq_len, max_steps=args.steps,
        checkpoint_every_steps=10**6, seed=0, device="cuda")
    planned, reporter = run(base.replace(memory_limit_gib=args.memory_limit_gib), profile=True)
    whole, _ = run(base.replace(gradient_checkpointing=False), profile=False)
    result = {"shape": args.shape, "steps": args.steps,
              f"planned_{args.memory_limit_gib:g}gib": planned,
              "whole_gpu_no_checkpointing": whole,
              "profile": summarise(reporter, args.out)}
    print(f"QLoRA micro-batch 1, {args.shape}: {planned['useful_tokens_per_second']:.1f} useful "
          f"tokens/s at {planned['peak_gib']} GiB ({planned['plan'].get('message', '')}); "
          f"no checkpointing, whole GPU: {whole['useful_tokens_per_second']:.1f} at "
          f"{whole['peak_gib']} GiB; median step {statistics.median(planned['step_seconds'])} s")
    print(json.dumps(result["profile"], indent=1))
    if args.out:
        (args.out / "qlora-profile.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
