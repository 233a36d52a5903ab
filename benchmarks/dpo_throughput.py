"""This trainer's DPO against TRL's `DPOTrainer`, same preference pairs and hyperparameters.

TRL is stock transformers + peft + TRL, as a user writes it.

    .venv-train/bin/python benchmarks/dpo_throughput.py --steps 3 --batch-size 2 \
        --seq-len 256                                                      # CPU, SmolLM2-135M
    python3 benchmarks/dpo_throughput.py --shape llama-8b --tokenizer DIR --seq-len 2048 \
        --mean-words 400 --batch-size 4 --steps 8 --json-out FILE          # GPU, random weights

TRL runs need trl and datasets (and datasets' dill and multiprocess), which the trainer's
environment does not hold; on a machine without network they travel as wheels, installed with
`pip install --no-deps`. Install them where the interpreter's own packages are (a `--target`
folder outside the environment breaks datasets' fingerprinting: dill then pickles pyarrow by value).

Both trainers see the same pairs (OpenAI's DPO format for this trainer; the same pairs in TRL's
conversational preference format, `prompt` / `chosen` / `rejected` message lists, for TRL), the
same chat template, the sigmoid DPO loss with the same beta, the same LoRA (rank 16, alpha 32, no
dropout, all linear projections), learning rate and schedule (cosine, 3% warmup), micro-batch of
pairs, truncation length and number of optimizer steps. Neither holds a second copy of the model:
the reference is the model with its adapter disabled (TRL does this when given a `peft_config`).

TRL is written as a user would write it: `DPOTrainer(model, args=DPOConfig(...), train_dataset,
processing_class=tokenizer, peft_config=LoraConfig(...))`, bf16 on CUDA, TRL's own collator (each
micro-batch's chosen and rejected sequences padded to the longest) and gradient checkpointing on
(TRL's default; `--no-gradient-checkpointing` turns it off). This trainer runs its own memory plan
(`gradient_checkpointing` auto within `--memory-limit-gib`). Each run happens in a fresh process,
so its peak memory is its own; `--trainers ours trl ours trl` alternates them and reports medians.

Printed per trainer: useful tokens per second (non-padding tokens of the chosen and rejected
sequences fed, prompt and answer after truncation; the first optimizer step excluded), tokens
computed (with padding) per useful token, peak memory (torch's max allocated on a GPU, RSS on the
CPU), MFU on a GPU, the last step's loss and reward accuracy. MFU counts the supervised benchmark's
FLOPs (benchmarks/train_throughput.py: forward and backward through the activations) plus the
reference's forward pass: 1.5 times as many per token.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from itertools import pairwise
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.train_throughput import (  # after the path insert
    SHAPES,
    _peak_memory_mib,
    TokenCounter,
    bench_model,
    random_text,
    step_timer,
    train_recording,
    mfu,
)

TRAINERS = ("ours", "trl")
LABELS = {"ours": "tuneplex", "trl": "trl"}
LORA = {"r": 16, "alpha": 32.0, "dropout": 0.0}
DPO_FLOPS_OVER_SFT = 1.5  # policy forward + backward (4 units) plus the reference's forward (2)


# --- data ----------------------------------------------------------------------------------------


def write_pairs(path: Path, n: int, *, mean_words: float, seed: int = 0) -> None:
    """``n`` pairs in OpenAI's DPO format, log-normal lengths like real chat data: a system prompt,
    one or two user turns (with an earlier answer between them), and two answers of independent
    lengths."""
    rng = random.Random(seed)

    def text(mean: float) -> str:
        return random_text(rng, mean)

    with path.open("w") as handle:
        for _ in range(n):
            messages = [{"role": "system", "content": "You are a helpful assistant."}]
            if rng.random() < 0.3:
                messages += [{"role": "user", "content": text(mean_words * 0.4)},
                             {"role": "assistant", "content": text(mean_words)}]
            messages.append({"role": "user", "content": text(mean_words * 0.4)})
            chosen, rejected = text(mean_words), text(mean_words)
            while rejected == chosen:
                rejected = text(mean_words)
            handle.write(json.dumps({
                "input": {"messages": messages},
                "preferred_output": [{"role": "assistant", "content": chosen}],
                "non_preferred_output": [{"role": "assistant", "content": rejected}]}) + "\n")


def trl_rows(path: Path) -> list[dict]:
    """The same pairs in TRL's conversational preference format."""
    rows = []
    for line in path.read_text().splitlines():
        record = json.loads(line)
        rows.append({"prompt": record["input"]["messages"], "chosen": record["preferred_output"],
                     "rejected": record["non_preferred_output"]})
    return rows


def mean_context(model: str, data: Path, seq_len: int) -> float:
    """Mean number of positions a token attends to (causal), over both sequences of every pair,
    after truncation: sum L(L+1)/2 over sum L."""
    from jobs.training.data import load_examples
    from jobs.training.tokenize import load_tokenizer

    pairs, _, _ = load_examples(data, load_tokenizer(Path(model)), max_seq_len=seq_len,
                                assistant_only_loss=True)
    lengths = [len(s.input_ids) for pair in pairs for s in pair.sequences()]
    return sum(n * (n + 1) / 2 for n in lengths) / sum(lengths)


# --- the two runs (each in its own process) ------------------------------------------------------


def _rate(step_seconds: list[float], step_tokens: list[int]) -> tuple[int, float]:
    """(useful tokens, seconds) of the steady steps: the first (kernel warm-up, allocator growth)
    is left out when there are more than two."""
    first = 1 if len(step_seconds) > 2 else 0
    return sum(step_tokens[first:]), sum(step_seconds[first:])


def run_ours(args) -> dict:
    from jobs.training.config import TrainingConfig

    with tempfile.TemporaryDirectory() as output:
        config = TrainingConfig(
            base_model_dir=args.model, train_file=args.data, output_dir=output, objective="dpo",
            dpo_beta=args.beta, method=args.method, lora_rank=LORA["r"], lora_alpha=LORA["alpha"],
            lora_dropout=LORA["dropout"], learning_rate=args.lr, epochs=1,
            batch_size=args.batch_size, max_seq_len=args.seq_len, max_steps=args.steps,
            checkpoint_every_steps=10**6, gradient_checkpointing=None,
            memory_limit_gib=args.memory_limit_gib, seed=0)
        log, plan, wall = train_recording(config)
    elapsed = [0.0] + [m["elapsed_seconds"] for m in log]
    step_seconds = [b - a for a, b in pairwise(elapsed)]
    tokens, seconds = _rate(step_seconds, [m["tokens"] for m in log])
    keys = ("step", "train_loss", "reward_accuracy", "reward_margin", "chosen_reward",
            "rejected_reward", "grad_norm", "tokens", "tokens_per_second", "elapsed_seconds")
    return {"steps": len(log), "useful_tokens": tokens, "computed_tokens": tokens,
            "seconds": seconds, "wall_seconds": wall, "useful_tokens_per_second": tokens / seconds,
            "final_loss": log[-1]["train_loss"],
            "final_reward_accuracy": log[-1]["reward_accuracy"],
            "losses": [m["train_loss"] for m in log],
            "all_steps_tokens": sum(m["tokens"] for m in log),
            "step_seconds": [round(s, 3) for s in step_seconds],
            "per_step": [{k: m.get(k) for k in keys} for m in log], "plan": plan}


def run_trl(args) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    on_gpu = torch.cuda.is_available()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    quantized = {}
    if args.method == "qlora":  # as a user writes QLoRA: NF4, double quantization, bf16 compute
        from transformers import BitsAndBytesConfig

        quantized = {"quantization_config": BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16), "device_map": {"": 0}}
    model = AutoModelForCausalLM.from_pretrained(
        args.model, dtype=torch.bfloat16 if on_gpu else torch.float32, **quantized)
    dataset = Dataset.from_list(trl_rows(Path(args.data)))
    peft_config = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                             target_modules="all-linear", task_type="CAUSAL_LM")
    timer = step_timer()
    step_seconds, history = timer.seconds, timer.logs  # history: TRL's metrics, one per step

    with tempfile.TemporaryDirectory() as output:
        config = DPOConfig(
            output_dir=output, beta=args.beta, loss_type=["sigmoid"], learning_rate=args.lr,
            per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=1,
            max_steps=args.steps, num_train_epochs=1, lr_scheduler_type="cosine",
            warmup_steps=math.ceil(0.03 * args.steps), weight_decay=0.0, max_grad_norm=1.0,
            bf16=on_gpu, use_cpu=not on_gpu, gradient_checkpointing=args.gradient_checkpointing,
            max_length=args.seq_len, logging_steps=1, report_to=[], save_strategy="no", seed=0,
            dataloader_num_workers=0, disable_tqdm=True)
        trainer = DPOTrainer(model=model, args=config, train_dataset=dataset,
                             processing_class=tokenizer, peft_config=peft_config,
                             callbacks=[timer])
        counting = TokenCounter(trainer.data_collator)  # TRL's DataCollatorForPreference
        trainer.data_collator = counting
        computed, useful = counting.computed, counting.useful
        started = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - started
    steps = len(step_seconds)
    tokens, seconds = _rate(step_seconds, useful[:steps])
    computed_tokens, _ = _rate(step_seconds, computed[:steps])
    keys = ("step", "loss", "rewards/accuracies", "rewards/margins", "rewards/chosen",
            "rewards/rejected", "grad_norm", "num_tokens")
    per_step = [{k: entry.get(k) for k in keys} | {"tokens": n, "seconds": round(t, 3)}
                for entry, n, t in zip(history, useful, step_seconds)]
    return {"steps": steps, "useful_tokens": tokens, "computed_tokens": computed_tokens,
            "seconds": seconds, "wall_seconds": wall, "useful_tokens_per_second": tokens / seconds,
            "final_loss": history[-1]["loss"] if history else None,
            "final_reward_accuracy": history[-1].get("rewards/accuracies") if history else None,
            "losses": [entry["loss"] for entry in history],
            "step_seconds": [round(s, 3) for s in step_seconds], "per_step": per_step,
            "all_steps_tokens": sum(useful[:steps]),
            "trl_counted_tokens": history[-1].get("num_tokens") if history else None}


def child(args) -> None:
    import torch

    result = run_ours(args) if args.which == "ours" else run_trl(args)
    result["trainer"] = LABELS[args.which]
    result["steady_steps"] = result["steps"] - (1 if result["steps"] > 2 else 0)  # see _rate
    result["peak_memory_mib"] = _peak_memory_mib()
    result["mean_context"] = args.mean_context
    result["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    result["mfu"] = mfu(result, args.model)
    if result["mfu"] is not None:
        result["mfu"] *= DPO_FLOPS_OVER_SFT
    print("RESULT " + json.dumps(result))


def _run_child(which: str, args, data: Path, model: str, context: float) -> dict | None:
    """One trainer in a fresh process, so its peak memory is its own."""
    command = [sys.executable, __file__, "--which", which, "--data", str(data), "--model", model,
               "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size),
               "--steps", str(args.steps), "--beta", str(args.beta), "--lr", str(args.lr),
               "--mean-context", str(context), "--method", args.method,
               "--gradient-checkpointing" if args.gradient_checkpointing
               else "--no-gradient-checkpointing"]
    if args.memory_limit_gib:
        command += ["--memory-limit-gib", str(args.memory_limit_gib)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, check=False)
    line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        print(f"{which} failed:\n{done.stderr[-4000:]}")
        return None
    return json.loads(line[len("RESULT "):])


# --- orchestration --------------------------------------------------------------------------------


def _versions() -> dict[str, str]:
    found = {"python": sys.version.split()[0]}
    for name in ("torch", "transformers", "peft", "trl", "accelerate", "datasets", "liger-kernel",
                 "bitsandbytes"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


def _print_table(results: list[dict]) -> None:
    print(f"{'trainer':9} {'useful tok/s':>13} {'computed/useful':>16} {'peak MiB':>10} "
          f"{'MFU':>7} {'loss':>8} {'reward acc':>11} {'s/step':>7}")
    for r in results:
        shown_mfu = f"{r['mfu'] * 100:.1f}%" if r.get("mfu") else "-"
        accuracy = r.get("final_reward_accuracy")
        per_step = r["seconds"] / r["steady_steps"]
        print(f"{r['trainer']:9} {r['useful_tokens_per_second']:13.1f} "
              f"{r['computed_tokens'] / r['useful_tokens']:16.2f} {r['peak_memory_mib']:10.0f} "
              f"{shown_mfu:>7} {r['final_loss']:8.4f} "
              f"{'-' if accuracy is None else f'{accuracy:.2f}':>11} {per_step:7.2f}")


def _summary(results: list[dict]) -> dict:
    def median(key: str, trainer: str) -> float:
        return statistics.median(r[key] for r in results if r["trainer"] == trainer)

    ran = [name for name in ("tuneplex", "trl") if any(r["trainer"] == name for r in results)]
    summary: dict = {
        "median_useful_tokens_per_second": {t: median("useful_tokens_per_second", t) for t in ran},
        "median_peak_memory_mib": {t: median("peak_memory_mib", t) for t in ran}}
    if ran == ["tuneplex", "trl"]:
        rates = summary["median_useful_tokens_per_second"]
        memory = summary["median_peak_memory_mib"]
        summary["ratio_useful_tokens_per_second"] = rates["tuneplex"] / rates["trl"]
        summary["ratio_peak_memory"] = memory["tuneplex"] / memory["trl"]
        print(f"ratio tuneplex/trl: useful tokens/s "
              f"{summary['ratio_useful_tokens_per_second']:.2f}x, "
              f"peak memory {summary['ratio_peak_memory']:.2f}x (medians)")
    # Both tokenize with the same chat template and truncate the same way: over all steps they
    # must have fed the same tokens (per step they differ, each shuffles the pairs its own way).
    fed = {r["trainer"]: r["all_steps_tokens"] for r in results}
    summary["tokens_fed_over_all_steps"] = fed
    if len(set(fed.values())) > 1:
        print(f"warning: the trainers fed different numbers of tokens over all steps: {fed}")
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="HF model directory (default: the embedded SmolLM2)")
    parser.add_argument("--shape", choices=sorted(SHAPES), help="random-init Llama of this shape")
    parser.add_argument("--tokenizer", type=Path,
                        help="tokenizer directory for --shape (default: the embedded SmolLM2's)")
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps (the data holds "
                        "exactly steps x batch-size pairs)")
    parser.add_argument("--batch-size", type=int, default=4, help="pairs per micro-batch")
    parser.add_argument("--seq-len", type=int, default=1024, help="truncation length per sequence")
    parser.add_argument("--mean-words", type=float, default=60.0, help="mean answer length")
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--method", choices=("lora", "qlora"), default="lora",
                        help="qlora: a 4-bit NF4 base for both (CUDA, bitsandbytes)")
    parser.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction,
                        default=True, help="TRL's gradient_checkpointing (its default: on); this "
                        "trainer runs its own memory plan")
    parser.add_argument("--memory-limit-gib", type=float,
                        help="this trainer's memory_limit_gib (default: the whole device)")
    parser.add_argument("--trainers", nargs="+", choices=TRAINERS, default=list(TRAINERS),
                        help="which to run, in this order; repeats allowed (medians reported)")
    parser.add_argument("--json-out", type=Path, help="also write the results here")
    parser.add_argument("--work", type=Path, help="folder for the data and random models (reused)")
    parser.add_argument("--which", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--mean-context", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    if args.which:
        child(args)
        return 0
    work, model = bench_model(args, "tuneplex-dpo-bench-")
    data = work / "pairs.jsonl"
    # Exactly the pairs of `steps` optimizer steps, so both trainers train on the same ones.
    write_pairs(data, args.steps * args.batch_size, mean_words=args.mean_words)
    context = mean_context(model, data, args.seq_len)
    results = []
    for which in args.trainers:
        result = _run_child(which, args, data, model, context)
        if result is None:
            return 1
        results.append(result)
    device = results[0]["device"] if results[0]["device"] != "cpu" else f"CPU x{os.cpu_count()}"
    versions = _versions()
    print(f"DPO: model {args.shape or Path(model).name}, {args.method} r={LORA['r']}, "
          f"{args.batch_size} pairs per micro-batch, max length {args.seq_len}, "
          f"{args.steps} steps, beta {args.beta}, lr {args.lr:g}, on {device}")
    print(", ".join(f"{k} {v}" for k, v in versions.items()))
    _print_table(results)
    summary = _summary(results)
    if args.json_out:
        args.json_out.write_text(json.dumps({"args": vars(args), "device": device,
                                             "versions": versions, "summary": summary,
                                             "results": results}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
