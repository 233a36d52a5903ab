"""Where a training step's time goes on a GPU: the trainer's own step under several settings.

    python3 benchmarks/gpu_step_profile.py --model DIR [--variants padded packed ...] [--out DIR]

One process, one model load (a Llama directory, e.g. the random 8B that train_throughput.py
builds), chat data from train_throughput.py's generator (steps x batch + 8 examples, micro-batches
as the trainer forms them), and the trainer's own ``_optimizer_step``: each variant runs
``--steps`` optimizer steps and reports useful tokens/s (first step excluded), peak memory and the
per-step times. Also checks the varlen attention against attending each example separately (fp64
reference), measures a bf16 GEMM of the model's shapes (the ceiling the linear layers can reach),
and profiles one step of ``--profile``.

Variants:
  padded         padded, length-grouped rows, sdpa, fp32 adapter path (the CUDA default before)
  packed-fp32    one packed row per micro-batch, flash varlen attention, fp32 adapter path
  packed-autocast  packed varlen under bf16 autocast, peft still casting inputs to fp32
  packed         packed varlen, bf16 autocast, peft's input cast off (the trainer's default now)
  packed-sdpa    packed row through sdpa's block-diagonal mask, bf16 autocast
  packed-nockpt  the default without gradient checkpointing
All with gradient checkpointing unless named otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch

VARIANTS = {  # name: (packing, attention, gradient checkpointing, autocast, peft input cast)
    "padded": (False, "sdpa", True, False, True),
    "packed-fp32": (True, "varlen", True, False, True),
    "packed-autocast": (True, "varlen", True, True, True),
    "packed": (True, "varlen", True, True, False),
    "packed-sdpa": (True, "sdpa", True, True, False),
    "packed-nockpt": (True, "varlen", False, True, False),
}


def set_precision(model, *, autocast: bool, peft_cast: bool) -> None:
    from peft.tuners.tuners_utils import BaseTunerLayer

    from jobs.training.trainer import AUTOCAST_DTYPE

    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.cast_input_dtype_enabled = peft_cast
    if autocast:
        setattr(model, AUTOCAST_DTYPE, torch.bfloat16)
    elif hasattr(model, AUTOCAST_DTYPE):
        delattr(model, AUTOCAST_DTYPE)


class Quiet:
    def event(self, *a, **k):
        pass

    def metrics(self, data):
        pass

    def checkpoint(self, *a, **k):
        pass

    def should_stop(self):
        return False


def check_varlen(device: torch.device) -> dict:
    """varlen vs one example at a time in fp64: outputs and gradients, GQA 32/8 heads."""
    from jobs.training.attention import (
        _one_example_at_a_time,
        cu_seqlens,
        varlen_attention_forward,
        varlen_kernel_available,
    )

    lengths = [37, 300, 1000, 5, 700]
    total, heads, kv_heads, dim = sum(lengths), 32, 8, 128
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, h, total, dim, device=device, dtype=torch.bfloat16)
               for h in (heads, kv_heads, kv_heads))
    bounds = cu_seqlens(lengths).to(device)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, _ = varlen_attention_forward(None, *leaves, None, scaling=dim ** -0.5,
                                      cu_seq_lens_q=bounds, max_length_q=max(lengths))
    grad = torch.randn_like(out)
    out.backward(grad)
    ref_leaves = [t.double().clone().requires_grad_() for t in (q, k, v)]
    ref = _one_example_at_a_time(*(t[0].transpose(0, 1) for t in ref_leaves), bounds.cpu(),
                                 dim ** -0.5).unsqueeze(0)
    ref.backward(grad.double())

    def rel(a, b):
        return float((a.double() - b).norm() / b.norm())

    result = {"kernel": varlen_kernel_available(), "out": rel(out, ref)}
    for name, leaf, ref_leaf in zip("qkv", leaves, ref_leaves):
        result[f"grad_{name}"] = rel(leaf.grad, ref_leaf.grad)
    result["ok"] = all(v < 2e-2 for k_, v in result.items() if k_ != "kernel")
    return result


def gemm_ceiling(tokens: int, hidden: int, inner: int) -> dict:
    """bf16 TFLOP/s of the model's largest projection at this many tokens (median of 20)."""
    a = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(inner, hidden, device="cuda", dtype=torch.bfloat16)
    times = []
    for _ in range(25):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.nn.functional.linear(a, b)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    median = sorted(times[5:])[len(times[5:]) // 2]
    return {"shape": [tokens, hidden, inner], "tflops": 2 * tokens * hidden * inner / median / 1e12}


def run_variant(name, model, data, args, pad_id, device, *, profile: bool = False) -> dict:
    from jobs.training.attention import register_varlen_attention
    from jobs.training.config import TrainingConfig
    from jobs.training.data import epoch_order, micro_batches
    from jobs.training.trainer import _optimizer_step

    packing, attention, checkpointing, autocast, peft_cast = VARIANTS[name]
    set_precision(model, autocast=autocast, peft_cast=peft_cast)
    base = model.get_base_model()
    base.config._attn_implementation = register_varlen_attention() if attention == "varlen" else "sdpa"
    if checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        base.gradient_checkpointing_disable()
    config = TrainingConfig(base_model_dir=args.model, train_file="-", output_dir="-",
                            packing=packing, max_grad_norm=1.0, batch_size=args.batch_size)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=2e-4, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    order = epoch_order(len(data), seed=0, epoch=0)
    groups = micro_batches(data, order, batch_size=args.batch_size, packing=packing)[:args.steps]
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    times, tokens, computed = [], [], []
    prof = None
    try:
        for i, micro in enumerate(groups):
            if profile and i == 2:  # after two steps of warm-up
                prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                          torch.profiler.ProfilerActivity.CUDA])
                prof.__enter__()
            torch.cuda.synchronize()
            started = time.perf_counter()
            metrics = _optimizer_step(model, optimizer, scheduler, trainable, [micro], data,
                                      config=config, pad_id=pad_id, device=device, report=Quiet())
            torch.cuda.synchronize()
            times.append(time.perf_counter() - started)
            tokens.append(metrics["tokens"])
            width = metrics["tokens"] if packing else len(micro) * max(
                len(data[j].input_ids) for j in micro)
            computed.append(width)
            if prof is not None:
                prof.__exit__(None, None, None)
                break
    except torch.OutOfMemoryError as exc:
        return {"variant": name, "error": f"out of memory: {str(exc).splitlines()[0][:200]}"}
    finally:
        optimizer.zero_grad(set_to_none=True)
        del optimizer
    steady = slice(1, None)
    result = {"variant": name, "useful_tokens_per_second": sum(tokens[steady]) / sum(times[steady]),
              "computed_per_useful": sum(computed[steady]) / sum(tokens[steady]),
              "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
              "step_seconds": [round(t, 3) for t in times], "step_tokens": tokens}
    if prof is not None:
        result["profile"] = _profile_summary(prof, times[-1])
    return result


def _profile_summary(prof, wall: float) -> dict:
    events = prof.key_averages()
    attr = ("self_device_time_total" if hasattr(events[0], "self_device_time_total")
            else "self_cuda_time_total")
    rows = sorted(events, key=lambda e: getattr(e, attr), reverse=True)
    gpu_total = sum(getattr(e, attr) for e in events) / 1e6
    top = [{"name": e.key[:90], "gpu_ms": round(getattr(e, attr) / 1e3, 2), "calls": e.count}
           for e in rows[:30]]
    return {"step_wall_seconds": wall, "gpu_busy_seconds": gpu_total, "top": top}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", type=Path, help="chat JSONL (default: train_throughput's data)")
    parser.add_argument("--mean-words", type=float, default=400.0)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--profile", help="variant to profile one step of")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    from benchmarks.train_throughput import write_dataset
    from jobs.training.config import TrainingConfig
    from jobs.training.data import load_data
    from jobs.training.tokenize import load_tokenizer
    from jobs.training.trainer import load_model

    device = torch.device("cuda")
    report: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    try:
        report["varlen_check"] = check_varlen(device)
    except Exception as exc:  # noqa: BLE001 - report it and measure the rest
        report["varlen_check"] = {"ok": False, "error": f"{exc.__class__.__name__}: {exc}"[:500]}
    print("varlen check", json.dumps(report["varlen_check"]), flush=True)
    data_file = args.data
    if data_file is None:
        data_file = Path(tempfile.mkdtemp()) / "chat.jsonl"
        write_dataset(data_file, args.steps * args.batch_size + 8, mean_words=args.mean_words)
    tokenizer = load_tokenizer(Path(args.model))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    data = load_data(train_file=str(data_file), validation_file=None, validation_split=0.0,
                     tokenizer=tokenizer, max_seq_len=args.seq_len, assistant_only_loss=True,
                     seed=0).train
    config = TrainingConfig(base_model_dir=args.model, train_file="-", output_dir="-",
                            lora_dropout=0.0, gradient_checkpointing=True, device="cuda")
    model = load_model(config, device)
    model.train()
    shape = json.loads(Path(args.model, "config.json").read_text())
    step_tokens = sum(len(e.input_ids) for e in data[:args.batch_size])
    report["gemm"] = gemm_ceiling(step_tokens, shape["hidden_size"], shape["intermediate_size"])
    print("gemm", json.dumps(report["gemm"]), flush=True)
    report["variants"] = []
    for name in args.variants:
        result = run_variant(name, model, data, args, pad_id, device)
        report["variants"].append(result)
        print(name, json.dumps(result), flush=True)
    if args.profile:
        result = run_variant(args.profile, model, data, args, pad_id, device, profile=True)
        report["profile"] = result.get("profile")
        print("profile", json.dumps(result.get("profile"), indent=1), flush=True)
    print(f"{'variant':16} {'useful tok/s':>13} {'computed/useful':>16} {'peak GiB':>9}")
    for r in report["variants"]:
        if "error" in r:
            print(f"{r['variant']:16} {r['error']}")
        else:
            print(f"{r['variant']:16} {r['useful_tokens_per_second']:13.1f} "
                  f"{r['computed_per_useful']:16.2f} {r['peak_memory_gib']:9.1f}")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu_step_profile.json").write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
