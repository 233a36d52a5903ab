"""Where a training step's time and memory go on a GPU: the trainer's own step under several
settings, in one process with one model load.

    python3 benchmarks/gpu_step_profile.py --model DIR [--variants today fused ...] [--out DIR]

Chat data from train_throughput.py's generator (steps x batch + 8 examples, micro-batches as the
trainer forms them), the trainer's own step (``FinetuneRecipe.optimizer_step``); each variant
starts from the same initial adapter and a fresh optimizer, runs ``--steps`` optimizer steps and
reports useful tokens/s (first step excluded), peak memory, the memory held before the step
(weights, adapter), the largest forward pass and the per-step losses (so variants can be compared
with ``today``).
Also checks the varlen attention against attending each example separately (fp64 reference),
measures a bf16 GEMM of the model's shapes, and profiles one step of ``--profile``.

Each variant is (checkpointed layers, forward-pass token cap, head, LoRA scale-add, Liger
kernels). Liger's kernels are patched into the model once, so variants without them run first.
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

import torch  # noqa: E402

ALL = 10**6  # "every layer"
# name: (checkpointed layers, max forward tokens or None, head, addmm LoRA, liger kernels,
#        SwiGLU adapter without its product)
#   head: "plain" = full logits then cross-entropy (the trainer before), "liger" = Liger's fused
#   linear cross-entropy, "torch" = the chunked torch version (the trainer now)
VARIANTS = {
    "today": (ALL, None, "plain", False, False, False),
    "today-nockpt": (0, None, "plain", False, False, False),
    "head-liger": (ALL, None, "liger", False, False, False),
    "head-torch": (ALL, None, "torch", False, False, False),
    "head+addmm": (ALL, None, "torch", True, False, False),
    "fused": (ALL, None, "torch", True, True, False),
    "fused-nockpt": (0, None, "torch", True, True, False),
    "fused-nockpt-8k": (0, 8192, "torch", True, True, False),
    "fused-nockpt-4k": (0, 4096, "torch", True, True, False),
    "fused-nockpt-2k": (0, 2048, "torch", True, True, False),
    "fused-ckpt8-4k": (8, 4096, "torch", True, True, False),
    "fused-ckpt16-4k": (16, 4096, "torch", True, True, False),
    "swiglu-nockpt": (0, None, "torch", True, True, True),
    "swiglu-ckpt12": (12, None, "torch", True, True, True),
    "swiglu-ckpt16": (16, None, "torch", True, True, True),
}


class Quiet:
    def event(self, *a, **k):
        pass

    def metrics(self, data):
        pass

    def checkpoint(self, *a, **k):
        pass

    def should_stop(self):
        return False


def set_head(kind: str) -> None:
    """Swap the trainer's head + loss for the variant's."""
    import torch.nn.functional as F

    from jobs.training import kernels, trainer

    def plain(head, hidden, labels):
        logits = head(hidden).float()
        return (F.cross_entropy(logits, labels, reduction="sum"),
                (logits.detach().argmax(-1) == labels).sum())

    def liger(head, hidden, labels):
        from liger_kernel.ops.fused_linear_cross_entropy import (
            LigerFusedLinearCrossEntropyFunction,
        )

        hidden = hidden.to(head.weight.dtype)
        loss, _, accuracy, *_ = LigerFusedLinearCrossEntropyFunction.apply(
            hidden, head.weight, labels, None, None, -100, 0.0, 0.0, "sum", None, False, None,
            False, True)
        return loss, (accuracy.detach() * labels.shape[0]).round().long()

    trainer.linear_cross_entropy = {"plain": plain, "torch": kernels.linear_cross_entropy,
                                    "liger": liger}[kind]


def set_swiglu(model, enabled: bool) -> None:
    from jobs.training.kernels import fuse_swiglu_adapters

    unfused = [m for m in model.modules() if "_tuneplex_unfused_forward" in vars(m)]
    for module in unfused:
        module.forward = module._tuneplex_unfused_forward
        del module._tuneplex_unfused_forward
    if enabled:
        fuse_swiglu_adapters(model)


def set_addmm(model, enabled: bool) -> None:
    from jobs.training.kernels import fuse_lora_scale_add

    if enabled:
        fuse_lora_scale_add(model)
        return
    for module in model.modules():
        if "forward" in vars(module) and type(module).__name__ in ("Linear", "Linear4bit") \
                and hasattr(module, "lora_A"):
            del module.forward


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


def run_variant(name, model, data, args, pad_id, device, initial, *, profile: bool = False) -> dict:
    from jobs.training.config import TrainingConfig
    from jobs.training.data import epoch_order, forward_passes, micro_batches
    from jobs.training.kernels import apply_fused_kernels
    from jobs.training.trainer import FinetuneRecipe, apply_checkpoint_plan

    layers, cap, head, addmm, liger, swiglu = VARIANTS[name]
    if liger and not getattr(model, "_profile_liger", False):
        model._profile_liger = apply_fused_kernels(model.get_base_model())
    if not liger and getattr(model, "_profile_liger", False):
        return {"variant": name, "error": "runs before the Liger variants only"}
    set_head(head)
    set_addmm(model, addmm)
    set_swiglu(model, swiglu)
    apply_checkpoint_plan(model, layers)
    with torch.no_grad():
        for param, value in zip((p for p in model.parameters() if p.requires_grad), initial):
            param.copy_(value)
    config = TrainingConfig(base_model_dir=args.model, train_file="-", output_dir="-",
                            packing=True, max_grad_norm=1.0, batch_size=args.batch_size)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=2e-4, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    recipe = FinetuneRecipe.around(model, optimizer, scheduler, data, config=config,
                                   report=Quiet(), pad_id=pad_id, device=device, forward_cap=cap)
    order = epoch_order(len(data), seed=0, epoch=0)
    groups = micro_batches(data, order, batch_size=args.batch_size, packing=True)[:args.steps]
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    held = torch.cuda.memory_allocated()
    largest = max(sum(len(data[i].input_ids) for i in part) for micro in groups
                  for part in (forward_passes(micro, data, max_tokens=cap, packing=True)
                               if cap else [micro]))
    times, tokens, losses = [], [], []
    prof = None
    try:
        for i, micro in enumerate(groups):
            if profile and i == 2:  # after two steps of warm-up
                prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                          torch.profiler.ProfilerActivity.CUDA])
                prof.__enter__()
            torch.cuda.synchronize()
            started = time.perf_counter()
            metrics = recipe.optimizer_step([micro])
            torch.cuda.synchronize()
            times.append(time.perf_counter() - started)
            tokens.append(metrics["tokens"])
            losses.append(metrics["train_loss"])
            if prof is not None:
                prof.__exit__(None, None, None)
                break
    except torch.OutOfMemoryError as exc:
        return {"variant": name, "error": f"out of memory: {str(exc).splitlines()[0][:200]}"}
    finally:
        optimizer.zero_grad(set_to_none=True)
        del optimizer
    steady = slice(1, None)
    peak = torch.cuda.max_memory_allocated()
    n_layers = model.get_base_model().config.num_hidden_layers
    result = {"variant": name, "useful_tokens_per_second": sum(tokens[steady]) / sum(times[steady]),
              "peak_memory_gib": peak / 2**30, "held_before_gib": held / 2**30,
              "largest_forward_tokens": largest,
              "activation_bytes_per_token_layer": (peak - held) / largest / n_layers,
              "step_seconds": [round(t, 3) for t in times], "step_tokens": tokens,
              "losses": losses}
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
    parser.add_argument("--profile", choices=list(VARIANTS), help="variant to profile one step of")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    from benchmarks.train_throughput import write_dataset
    from jobs.training.attention import register_varlen_attention
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
                            lora_dropout=0.0, gradient_checkpointing=False, device="cuda")
    model = load_model(config, device, attention=register_varlen_attention(), fused_kernels=False)
    model.train()
    initial = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    shape = json.loads(Path(args.model, "config.json").read_text())
    step_tokens = sum(len(e.input_ids) for e in data[:args.batch_size])
    report["gemm"] = gemm_ceiling(step_tokens, shape["hidden_size"], shape["intermediate_size"])
    print("gemm", json.dumps(report["gemm"]), flush=True)
    report["variants"] = []
    for name in args.variants:
        result = run_variant(name, model, data, args, pad_id, device, initial)
        report["variants"].append(result)
        print(name, json.dumps(result), flush=True)
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "gpu_step_profile.json").write_text(json.dumps(report, indent=2))
    if args.profile:
        result = run_variant(args.profile, model, data, args, pad_id, device, initial, profile=True)
        report["profile"] = result.get("profile")
        print("profile", json.dumps(result.get("profile"), indent=1), flush=True)
    print(f"{'variant':18} {'useful tok/s':>13} {'peak GiB':>9} {'fwd tokens':>10} "
          f"{'B/tok/layer':>11}  losses")
    for r in report["variants"]:
        if "error" in r:
            print(f"{r['variant']:18} {r['error']}")
        else:
            print(f"{r['variant']:18} {r['useful_tokens_per_second']:13.1f} "
                  f"{r['peak_memory_gib']:9.1f} {r['largest_forward_tokens']:10d} "
                  f"{r['activation_bytes_per_token_layer']:11.0f}  "
                  f"{' '.join(f'{x:.4f}' for x in r['losses'])}")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu_step_profile.json").write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
