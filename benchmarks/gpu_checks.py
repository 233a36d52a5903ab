"""Checks of the trainer on a CUDA GPU, through its entry point `train(config, report)`.

    python3 benchmarks/gpu_checks.py --tokenizer DIR [--out DIR]

No weights can be downloaded on the lent GPU machines, so models are random-initialised Llamas
built from a config (the embedded SmolLM2-135M's shape for correctness; Llama-3.2-1B's for the
out-of-memory retry) with SmolLM2's tokenizer. Checked:

  lora       bf16 base weights, loss falls on a fixed-answer chat dataset, adapter saved
  qlora      base linear layers are bitsandbytes Linear4bit, NF4, double-quantized, bf16 compute;
             loss falls
  packing    packed micro-batch loss == per-example losses (bf16 tolerance), through the flash
             varlen attention the trainer uses for packed rows on CUDA
  ckpt       gradient checkpointing lowers peak memory for the same step
  graphs     passes replayed from CUDA graphs (jobs.training.graphs) give the eager passes' losses
             step by step (bf16 tolerance), LoRA and QLoRA, micro-batch 1 and 4 packed, and
             report the graphs they captured
  oom        a micro-batch too large for the GPU triggers the one automatic retry with half the
             micro-batch and twice the accumulation, which then succeeds
  long       checkpointed layers' inputs parked in host memory (side-stream copies, prefetched)
             and the MLP in chunks give the loss and gradients of plain checkpointing on two
             packed 3,000-token examples (bf16 tolerance), LoRA and QLoRA
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from benchmarks.train_throughput import SHAPES, build_random_llama, write_dataset  # noqa: E402
from tests.fixtures.datasets import pirate_lines  # noqa: E402


class Recorder:
    def __init__(self):
        self.metrics_log, self.events = [], []

    def event(self, message, *, level="info", data=None):
        self.events.append({"message": message, "level": level, "data": data or {}})

    def metrics(self, data):
        self.metrics_log.append(data)

    def checkpoint(self, *args, **kwargs):
        pass

    def should_stop(self):
        return False

    def should_pause(self):
        return False


def smol_shape(tokenizer_dir: Path) -> dict:
    config = json.loads((tokenizer_dir / "config.json").read_text())
    keep = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "vocab_size", "max_position_embeddings", "rope_theta",
            "tie_word_embeddings", "rms_norm_eps")
    return {k: config[k] for k in keep if k in config}


def config_for(model: Path, data: Path, work: Path, **overrides):
    from jobs.training.config import TrainingConfig

    values = dict(base_model_dir=str(model), train_file=str(data), output_dir=str(work),
                  lora_rank=16, learning_rate=1e-3, epochs=3, batch_size=8, device="cuda",
                  checkpoint_every_steps=0, seed=0)
    values.update(overrides)
    return TrainingConfig(**values)


def check_lora(model, data, work) -> dict:
    from jobs.training.trainer import load_model, train

    config = config_for(model, data, work / "lora")
    peft_model = load_model(config, torch.device("cuda"))
    base_dtypes = {str(p.dtype) for n, p in peft_model.named_parameters() if "lora_" not in n}
    lora_dtypes = {str(p.dtype) for n, p in peft_model.named_parameters() if "lora_" in n}
    del peft_model
    torch.cuda.empty_cache()
    report = Recorder()
    result = train(config, report)
    losses = [m["train_loss"] for m in report.metrics_log]
    return {"ok": base_dtypes == {"torch.bfloat16"} and losses[-1] < losses[0] / 2
            and result.status == "succeeded",
            "base_dtypes": sorted(base_dtypes), "lora_dtypes": sorted(lora_dtypes),
            "first_loss": losses[0], "last_loss": losses[-1], "steps": result.steps}


def check_qlora(model, data, work) -> dict:
    import bitsandbytes as bnb

    from jobs.training.trainer import load_model, train

    config = config_for(model, data, work / "qlora", method="qlora")
    peft_model = load_model(config, torch.device("cuda"))
    four_bit = [m for m in peft_model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    sample = four_bit[0]
    state = sample.weight.quant_state
    facts = {"linear4bit_layers": len(four_bit), "quant_type": state.quant_type,
             "double_quant": bool(getattr(state, "nested", False)),
             "compute_dtype": str(sample.compute_dtype),
             "weight_storage": str(sample.weight.dtype)}
    del peft_model
    torch.cuda.empty_cache()
    report = Recorder()
    result = train(config, report)
    losses = [m["train_loss"] for m in report.metrics_log]
    facts.update(first_loss=losses[0], last_loss=losses[-1], steps=result.steps)
    facts["ok"] = (facts["quant_type"] == "nf4" and facts["double_quant"]
                   and facts["compute_dtype"] == "torch.bfloat16" and losses[-1] < losses[0] / 2)
    return facts


def check_packing(model, data, work) -> dict:
    from jobs.training.attention import register_varlen_attention
    from jobs.training.data import collate
    from jobs.training.tokenize import TokenizedExample
    from jobs.training.trainer import forward_loss, load_model

    config = config_for(model, data, work / "packing", lora_dropout=0.0)
    peft_model = load_model(config, torch.device("cuda"), attention=register_varlen_attention())
    peft_model.eval()
    examples = [TokenizedExample(list(range(5, 5 + n)), [0] * (n // 2) + [1] * (n - n // 2))
                for n in (37, 120, 9, 64)]
    with torch.no_grad():
        packed, _ = forward_loss(peft_model, collate(examples, packing=True, pad_id=0).to("cuda"))
        separate = sum(forward_loss(peft_model, collate([e], packing=True, pad_id=0).to("cuda"))[0]
                       for e in examples)
    relative = abs(packed.item() - separate.item()) / abs(separate.item())
    return {"ok": relative < 2e-2, "relative_difference": relative}


def check_graphs(model, data, work) -> dict:
    from jobs.training.trainer import train

    runs: dict = {}
    ok = True
    for method in ("lora", "qlora"):
        for batch_size in (1, 4):
            logs = {}
            for graphed in (False, True):
                report = Recorder()
                name = f"{method}-mb{batch_size}-{'graphs' if graphed else 'eager'}"
                # micro-batch 4 with every layer checkpointed: graphs that recompute too
                train(config_for(model, data, work / name, method=method, epochs=1,
                                 batch_size=batch_size, lora_dropout=0.0, cuda_graphs=graphed,
                                 gradient_checkpointing=batch_size == 4 or None), report)
                captured = [e["data"] for e in report.events if "capture_seconds" in e["data"]]
                logs[graphed] = {"losses": [m["train_loss"] for m in report.metrics_log],
                                 "seconds": [m["elapsed_seconds"] for m in report.metrics_log],
                                 "graphs": captured}
            eager, replayed = logs[False]["losses"], logs[True]["losses"]
            # the same first step; then bf16 rounding (padded GEMMs tile differently) compounds
            worst = max(abs(a - b) / abs(a) for a, b in zip(eager, replayed))
            good = (len(eager) == len(replayed) and abs(eager[0] - replayed[0]) < 1e-3
                    and worst < 0.05
                    and bool(logs[True]["graphs"]) and not logs[False]["graphs"])
            ok = ok and good
            runs[f"{method}-mb{batch_size}"] = {
                "ok": good, "max_relative_loss_difference": round(worst, 5), "eager_losses": eager,
                "graphed_losses": replayed, "graphs": logs[True]["graphs"],
                "eager_seconds": logs[False]["seconds"][-1],
                "graphed_seconds": logs[True]["seconds"][-1]}
    return {"ok": ok, **runs}


def check_checkpointing(model, work) -> dict:
    from jobs.training.trainer import train

    data = work / "long.jsonl"
    write_dataset(data, 16, mean_words=400)
    peaks = {}
    for enabled in (False, True):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        train(config_for(model, data, work / f"ckpt-{enabled}", gradient_checkpointing=enabled,
                         max_steps=2, batch_size=8, max_seq_len=2048), Recorder())
        peaks[enabled] = torch.cuda.max_memory_allocated() / 2**20
    return {"ok": peaks[True] < peaks[False], "peak_mib_without": round(peaks[False]),
            "peak_mib_with": round(peaks[True])}


def check_long_passes(model, data, work) -> dict:
    from jobs.training.data import collate
    from jobs.training.tokenize import TokenizedExample
    from jobs.training.trainer import (
        HOST_STASH,
        _attention,
        apply_checkpoint_plan,
        load_model,
        objective_for,
    )

    generator = torch.Generator().manual_seed(0)
    examples = [TokenizedExample(torch.randint(3, 40000, (n,), generator=generator).tolist(),
                                 [0] * 100 + [1] * (n - 100)) for n in (3000, 2500)]
    batch = collate(examples, packing=True, pad_id=0).to("cuda")
    results, ok = {}, True
    for method in ("lora", "qlora"):
        config = config_for(model, data, work / f"long-{method}", method=method, bf16=True,
                            packing=True, lora_dropout=0.0)
        peft_model = load_model(config, torch.device("cuda"),
                                attention=_attention(True, torch.device("cuda"), True))
        peft_model.train()
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:  # peft starts B at zero; make every adapter matter
                torch.nn.init.normal_(param, std=0.02)
        trainable = [p for p in peft_model.parameters() if p.requires_grad]
        layers = peft_model.get_base_model().config.num_hidden_layers
        runs, parked = {}, {}
        for name, plan in (("checkpointed", {}), ("offloaded", {"offloaded_layers": layers}),
                           ("chunked", {"offloaded_layers": layers, "mlp_chunk_tokens": 1024})):
            apply_checkpoint_plan(peft_model, layers, **plan)
            loss, _ = objective_for(config).forward(peft_model, batch)
            loss.backward()
            runs[name] = (loss.item(), [p.grad.float().clone() for p in trainable])
            stash = getattr(peft_model.get_base_model(), HOST_STASH, None)
            parked[name] = stash.next_handle if stash is not None else 0
            for p in trainable:
                p.grad = None
        reference = runs["checkpointed"]
        for name in ("offloaded", "chunked"):
            loss, grads = runs[name]
            worst = max(((a - b).norm() / b.norm().clamp_min(1e-12)).item()
                        for a, b in zip(grads, reference[1]))
            good = (abs(loss - reference[0]) <= 1e-3 * abs(reference[0]) and worst < 2e-2
                    and parked[name] > parked["checkpointed"])  # inputs did go to host memory
            ok = ok and good
            results[f"{method}-{name}"] = {"ok": good, "loss": loss, "reference": reference[0],
                                           "worst_relative_gradient_difference": worst,
                                           "inputs_parked_so_far": parked[name]}
        del peft_model
        torch.cuda.empty_cache()
    return {"ok": ok, **results}


def check_oom_retry(tokenizer_dir, work) -> dict:
    from jobs.training.trainer import train

    model = build_random_llama({**SHAPES["llama-1b"], "max_position_embeddings": 4096},
                         tokenizer_dir, work / "llama-1b")
    data = work / "oom.jsonl"
    write_dataset(data, 400, mean_words=300)
    report = Recorder()
    torch.cuda.empty_cache()
    try:
        # About 3 MB a token without checkpointing (activations and fp32 logits of a 128k
        # vocabulary): 32 packed examples of up to 1024 tokens do not fit in 80 GB, 16 do.
        result = train(config_for(model, data, work / "oom", batch_size=32, max_steps=2,
                                  max_seq_len=1024, epochs=1, checkpoint_every_steps=1), report)
        status = result.status
    except torch.OutOfMemoryError as exc:
        status = f"out of memory after retry: {str(exc).splitlines()[0]}"
    retries = [e for e in report.events if e["data"].get("oom_retry")]
    return {"ok": status == "succeeded" and len(retries) == 1, "status": status,
            "retry_event": retries[0]["message"] if retries else None,
            "steps_after_retry": len(report.metrics_log)}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokenizer", type=Path, required=True,
                        help="SmolLM2's config.json and tokenizer files")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--only", nargs="*")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="gpu-checks-"))
    model = build_random_llama(smol_shape(args.tokenizer), args.tokenizer, work / "smol-random")
    data = work / "pirate.jsonl"
    data.write_text("\n".join(pirate_lines(64)) + "\n")
    checks = {"lora": lambda: check_lora(model, data, work),
              "qlora": lambda: check_qlora(model, data, work),
              "packing": lambda: check_packing(model, data, work),
              "ckpt": lambda: check_checkpointing(model, work),
              "graphs": lambda: check_graphs(model, data, work),
              "long": lambda: check_long_passes(model, data, work),
              "oom": lambda: check_oom_retry(args.tokenizer, work)}
    results = {}
    for name, check in checks.items():
        if args.only and name not in args.only:
            continue
        started = time.perf_counter()
        try:
            results[name] = check()
        except Exception as exc:  # noqa: BLE001 - report every check
            traceback.print_exc()
            results[name] = {"ok": False, "error": f"{exc.__class__.__name__}: {exc}"[:500]}
        results[name]["seconds"] = round(time.perf_counter() - started, 1)
        print(name, json.dumps(results[name]), flush=True)
    print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    for name, result in results.items():
        print(f"{name:8} {'ok' if result['ok'] else 'FAILED'}")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu_checks.json").write_text(json.dumps(results, indent=2))
    return 0 if all(r["ok"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
