"""This trainer against stock `transformers.Trainer` + peft (plain, and with Liger's kernels),
same model, data and hyperparameters.

    .venv-train/bin/python benchmarks/train_throughput.py                      # CPU, SmolLM2-135M
    .venv-train/bin/python benchmarks/train_throughput.py --shape llama-8b \
        --seq-len 2048 --method qlora --batch-size 1                           # GPU, random weights

Both trainers see the same realistic chat data (log-normal turn lengths, like real chat data),
tokenized the same way (chat template, loss on assistant tokens only), the same LoRA (rank 16 on
all linear projections), learning rate, micro-batch and number of optimizer steps. The stock run is
written as a user would write it: `Trainer` with `DataCollatorForSeq2Seq` padding each batch to
its longest example, bf16 (autocast) and gradient checkpointing if `--gradient-checkpointing` is
given; `stock-liger` is the same with `use_liger_kernel=True` (Liger's RMSNorm, SwiGLU, RoPE and
fused linear cross-entropy: the stronger baseline a user would pick; on CUDA with liger-kernel
installed). This trainer runs its own memory plan (`--ours-checkpointing auto`, the default:
checkpointing only the layers the memory budget needs; `--memory-limit-gib` sets that budget, and
enforces it). The data set holds exactly the examples of `--steps` optimizer steps, so all train
on the same examples. Each run happens in a fresh process so its peak memory is its own;
`--repeats N` alternates the trainers N times and reports the medians (GPU machines of one kind
vary from lease to lease). `--warmup` first runs each trainer once, unrecorded: the first process
on a fresh GPU machine compiles Liger's Triton kernels (again for each new shape) and ran 10-25%
slower (RESULTS.md).

GPU, as in benchmarks/RESULTS.md (random-initialised Llama-3.1-8B shape, SmolLM2's tokenizer):

    python3 benchmarks/train_throughput.py --shape llama-8b --seq-len 2048 --mean-words 400 \
        --batch-size 8 --steps 10 --gradient-checkpointing --json-out FILE

Long context (`--long`): every example is exactly `--seq-len` tokens (a user turn and a long
assistant answer, cut at the length), one per micro-batch; `--limit-stock` holds the stock runs
to `--memory-limit-gib` too (through the caching allocator, as this trainer's own limit), so an
example that does not fit the budget fails there as here. `benchmarks/longest_context.py`
searches the longest length that fits a budget for each trainer.

    python3 benchmarks/train_throughput.py --shape llama-8b --long --seq-len 32768 \
        --batch-size 1 --steps 4 --memory-limit-gib 40 --limit-stock --gradient-checkpointing

`--shape llama-70b --method qlora`: Llama-3.1-70B's shape, random weights built layer by layer
straight into NF4 on the GPU in each trainer's process (benchmarks/random_nf4.py: 141 GB of bf16
weights fit neither one GPU nor the machine's disk).

Printed per trainer: useful (non-padding) tokens per second, tokens computed, peak memory (RSS on
the CPU, torch's max allocated on a GPU), and on a GPU the MFU, counting 4 x parameters FLOPs per
token (LoRA: forward plus the backward pass through activations; no weight gradients for the
frozen base) plus attention: 4 x 2 x layers x hidden x (mean attended context) per token.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

WORDS = ("the model learns from examples and answers questions about data training loss adapter "
         "rank alpha tokens batch sequence length gradient platform team dataset evaluation prompt "
         "completion assistant user system deploy serve queue worker memory").split()
SHAPES = {  # Llama-3.2-1B's, Llama-3.1-8B's and Llama-3.1-70B's dimensions
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                     max_position_embeddings=131072, rope_theta=500000.0, tie_word_embeddings=True),
    "llama-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                     max_position_embeddings=131072, rope_theta=500000.0, tie_word_embeddings=False),
    # Llama-3.1-70B's: 141 GB of bf16 weights, too many to train on one H200 (benchmarks/multi_gpu.py
    # runs it sharded, from random weights made on the GPUs)
    "llama-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                      num_attention_heads=64, num_key_value_heads=8, vocab_size=128256,
                      max_position_embeddings=131072, rope_theta=500000.0,
                      tie_word_embeddings=False),
}
TRAINERS = ("ours", "stock", "stock-liger")
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}


# --- data ----------------------------------------------------------------------------------------


def random_text(rng: random.Random, mean: float) -> str:
    """Words of a log-normal count around ``mean``, as turn lengths in real chat data are."""
    count = max(1, int(rng.lognormvariate(0, 0.9) * mean))
    return " ".join(rng.choice(WORDS) for _ in range(count))


def write_dataset(path: Path, n: int, *, mean_words: float, seed: int = 0) -> None:
    rng = random.Random(seed)

    def text(mean: float) -> str:
        return random_text(rng, mean)

    with path.open("w") as handle:
        for _ in range(n):
            messages = [{"role": "system", "content": "You are a helpful assistant."}]
            for _ in range(rng.choice((1, 1, 2))):
                messages += [{"role": "user", "content": text(mean_words * 0.4)},
                             {"role": "assistant", "content": text(mean_words)}]
            handle.write(json.dumps({"messages": messages}) + "\n")


def write_long_dataset(path: Path, n: int, *, tokens: int, seed: int = 0) -> None:
    """``n`` examples longer than ``tokens`` tokens (the trainers cut them at ``--seq-len``): a
    user turn (a document) and an assistant turn 2.5 times as long, every word at least a token."""
    rng = random.Random(seed)
    with path.open("w") as handle:
        for _ in range(n):
            answer = int(tokens * 1.1)
            messages = [{"role": "system", "content": "You are a helpful assistant."},
                        {"role": "user", "content": " ".join(rng.choice(WORDS)
                                                             for _ in range(answer * 2 // 5))},
                        {"role": "assistant", "content": " ".join(rng.choice(WORDS)
                                                                  for _ in range(answer))}]
            handle.write(json.dumps({"messages": messages}) + "\n")


def build_random_llama(config_kwargs: dict, tokenizer_dir: Path, out: Path) -> Path:
    """A random-initialised Llama from config values, saved in bf16 with the given tokenizer.

    Built in bf16 directly: an 8B model in fp32 would need 32 GB first. Reused if present.
    """
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if (out / "config.json").exists():
        return out
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            model = LlamaForCausalLM(LlamaConfig(**config_kwargs))
    finally:
        torch.set_default_dtype(previous)
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out


# --- the two runs (each in its own process) ------------------------------------------------------


def _peak_memory_mib() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _peak_reserved_mib() -> float | None:
    """What the caching allocator held at most (CUDA graphs' pools included): on a GPU, the
    stricter figure, since memory reserved for a graph is not free for anything else."""
    import torch

    return torch.cuda.max_memory_reserved() / 2**20 if torch.cuda.is_available() else None


def bench_model(args, prefix: str) -> tuple[Path, str]:
    """A work folder (``--work`` or a new one) and the model to train: ``--model``, a random
    ``--shape`` with the embedded SmolLM2's tokenizer (or ``--tokenizer``'s), or SmolLM2 itself."""
    data_dir = Path(os.environ.get("TUNEPLEX_DATA_DIR", REPO / "var"))
    smol = args.tokenizer or data_dir / "models" / "SmolLM2-135M-Instruct"
    if not (smol / "tokenizer.json").exists():
        from jobs.training.gguf_convert import convert, packaged_gguf

        convert(packaged_gguf(), smol)
    work = args.work or Path(tempfile.mkdtemp(prefix=prefix))
    work.mkdir(parents=True, exist_ok=True)
    if args.model or not args.shape:
        return work, args.model or str(smol)
    if args.shape == "llama-70b" and args.method == "qlora":
        from benchmarks.random_nf4 import write_folder

        return work, str(write_folder(SHAPES[args.shape], smol, work / f"{args.shape}-nf4"))
    return work, str(build_random_llama(SHAPES[args.shape], smol, work / args.shape))


def train_recording(config) -> tuple[list[dict], dict, float]:
    """This trainer's ``train(config, report)`` in this process: each step's metrics, the memory
    plan it reported, and the wall time."""
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # as run.py does
    from jobs.training.trainer import train

    log: list[dict] = []
    plan: dict = {}

    class Recorder:
        def event(self, message, *, level="info", data=None):
            if data and ("checkpointed_layers" in data or "capture_seconds" in data):
                plan.update(data)  # the memory plan; the CUDA graphs captured, and how long

        def metrics(self, data):
            log.append(data)

        def checkpoint(self, *a, **k):
            pass

        def should_stop(self):
            return False

        def should_pause(self):
            return False

    started = time.perf_counter()
    train(config, Recorder())
    return log, plan, time.perf_counter() - started


def run_ours(args) -> dict:
    from jobs.training.config import TrainingConfig

    tri_state = {"auto": None, "on": True, "off": False}
    config = TrainingConfig(
        base_model_dir=args.model, train_file=args.data, output_dir=tempfile.mkdtemp(),
        method=args.method, lora_rank=16, lora_alpha=32, lora_dropout=0.0, learning_rate=2e-4,
        epochs=1, batch_size=args.batch_size, max_seq_len=args.seq_len, max_steps=args.steps,
        checkpoint_every_steps=10**6, gradient_checkpointing=tri_state[args.ours_checkpointing],
        memory_limit_gib=args.memory_limit_gib, packing=tri_state[args.packing],
        cuda_graphs=tri_state[args.cuda_graphs], seed=0)
    log, plan, total = train_recording(config)
    # Skip the first step (kernel warm-up, allocator growth) for the rate.
    steady = log[1:] if len(log) > 2 else log
    seconds = steady[-1]["elapsed_seconds"] - (log[0]["elapsed_seconds"] if steady is not log else 0)
    tokens = sum(m["tokens"] for m in steady)
    elapsed = [0.0] + [m["elapsed_seconds"] for m in log]
    # CUDA graphs are captured before the first step, like the model's loading: the rate above
    # leaves them out, this one counts them (what a job of exactly these steps gets)
    with_capture = tokens / (seconds + plan.get("capture_seconds", 0.0))
    return {"trainer": "tuneplex", "steps": len(log), "useful_tokens": tokens,
            "useful_tokens_per_second_with_capture": with_capture,
            # graphed passes pad each row to its bucket (jobs.training.graphs)
            "computed_tokens": tokens + sum(m.get("graph_padding_tokens", 0) for m in steady),
            "seconds": seconds, "wall_seconds": total,
            "useful_tokens_per_second": tokens / seconds, "peak_memory_mib": _peak_memory_mib(),
            "peak_reserved_mib": _peak_reserved_mib(),
            "final_loss": log[-1]["train_loss"], "losses": [m["train_loss"] for m in log],
            "step_seconds": [round(b - a, 3) for a, b in zip(elapsed, elapsed[1:])], "plan": plan}


class TokenCounter:
    """Wraps a Trainer's collator: the tokens each batch computes (padding included) and the
    useful ones (its attention mask)."""

    def __init__(self, collate) -> None:
        self.collate = collate
        self.computed: list[int] = []
        self.useful: list[int] = []

    def __call__(self, features):
        batch = self.collate(features)
        self.computed.append(batch["input_ids"].numel())
        self.useful.append(int(batch["attention_mask"].sum()))
        return batch


def step_timer():
    """A Trainer callback timing each optimizer step (the GPU synchronised at both ends) and
    keeping the trainer's per-step logs (``seconds``, ``logs``)."""
    import torch
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.seconds: list[float] = []
            self.logs: list[dict] = []

        def _sync(self) -> None:
            if torch.cuda.is_available():
                torch.cuda.synchronize()

        def on_step_begin(self, a, state, control, **kw):
            self._sync()
            self.started = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            self._sync()
            self.seconds.append(time.perf_counter() - self.started)

        def on_log(self, a, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                self.logs.append(dict(logs, step=state.global_step))

    return StepTimer()


def run_stock(args, *, liger: bool = False) -> dict:
    import torch

    if args.limit_stock and args.memory_limit_gib and torch.cuda.is_available():
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(
            min(1.0, args.memory_limit_gib * 2**30 / total))
    from peft import LoraConfig, get_peft_model
    from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer,
                              TrainingArguments)

    from jobs.training.jsonl import read_examples
    from jobs.training.tokenize import tokenize_example

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    rows = []
    with open(args.data, "rb") as handle:
        for _, example in read_examples(handle):
            tokens = tokenize_example(tokenizer, example)
            ids, mask = tokens.input_ids[: args.seq_len], tokens.loss_mask[: args.seq_len]
            rows.append({"input_ids": ids, "attention_mask": [1] * len(ids),
                         "labels": [t if m else -100 for t, m in zip(ids, mask)]})
    rows = rows[: args.steps * args.batch_size]
    on_gpu = torch.cuda.is_available()
    kwargs = {"dtype": torch.bfloat16 if on_gpu else torch.float32}
    if args.method == "qlora":
        from jobs.training.quantization import four_bit_config

        kwargs.update(quantization_config=four_bit_config(), device_map={"": 0})
    model = AutoModelForCausalLM.from_pretrained(args.model, **kwargs)
    if args.method == "qlora":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=args.gradient_checkpointing)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    timer = step_timer()
    counting = TokenCounter(DataCollatorForSeq2Seq(tokenizer, padding=True,
                                                   label_pad_token_id=-100))

    training_args = TrainingArguments(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=args.batch_size,
        learning_rate=2e-4, num_train_epochs=1, max_steps=args.steps, lr_scheduler_type="cosine",
        warmup_steps=math.ceil(0.03 * args.steps), logging_steps=1, save_strategy="no", report_to=[], seed=0,
        bf16=on_gpu, use_cpu=not on_gpu, gradient_checkpointing=args.gradient_checkpointing,
        dataloader_num_workers=0, remove_unused_columns=False, disable_tqdm=True,
        use_liger_kernel=liger)
    trainer = Trainer(model=model, args=training_args, train_dataset=rows, data_collator=counting,
                      callbacks=[timer])
    started = time.perf_counter()
    output = trainer.train()
    total = time.perf_counter() - started
    step_times = timer.seconds
    first = 1 if len(step_times) > 2 else 0
    seconds = sum(step_times[first:])
    tokens = sum(counting.useful[first:len(step_times)])
    return {"trainer": "stock-liger" if liger else "stock", "steps": len(step_times),
            "useful_tokens": tokens, "losses": [entry["loss"] for entry in timer.logs],
            "computed_tokens": sum(counting.computed[first:len(step_times)]), "seconds": seconds,
            "wall_seconds": total, "useful_tokens_per_second": tokens / seconds,
            "peak_memory_mib": _peak_memory_mib(),
            "peak_reserved_mib": _peak_reserved_mib(), "final_loss": output.training_loss,
            "step_seconds": [round(t, 3) for t in step_times]}


# --- orchestration --------------------------------------------------------------------------------


def mfu(result: dict, model_dir: str) -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)
    if peak is None:
        return None
    config = json.loads(Path(model_dir, "config.json").read_text())
    params = _parameters(Path(model_dir))
    ctx = result["mean_context"]
    per_token = 4 * params + 4 * 2 * config["num_hidden_layers"] * config["hidden_size"] * ctx
    return result["useful_tokens_per_second"] * per_token / peak


def _parameters(model_dir: Path) -> int:
    """The model's parameters: from its safetensors files, or its config where it has none
    (a random NF4 folder)."""
    from safetensors import safe_open

    files = list(model_dir.glob("*.safetensors"))
    if not files:
        from jobs.training.sharding import parameter_count

        return parameter_count(model_dir)
    params = 0
    for path in files:
        with safe_open(path, "pt") as handle:
            for key in handle.keys():
                params += math.prod(handle.get_slice(key).get_shape())
    return params


def _mean_context(model: str, data: Path, seq_len: int, n: int) -> float:
    """Mean number of positions a token attends to (causal): sum L(L+1)/2 over sum L."""
    from transformers import AutoTokenizer

    from jobs.training.jsonl import read_examples
    from jobs.training.tokenize import tokenize_example

    tokenizer = AutoTokenizer.from_pretrained(model)
    lengths = []
    with data.open("rb") as handle:
        for _, example in read_examples(handle):
            lengths.append(min(seq_len, len(tokenize_example(tokenizer, example).input_ids)))
    lengths = lengths[:n]
    return sum(n_ * (n_ + 1) / 2 for n_ in lengths) / sum(lengths)


def _run_child(which: str, args, data: Path, model: str) -> dict | None:
    """One trainer in a fresh process, so its peak memory is its own."""
    command = [sys.executable, __file__, "--which", which, "--data", str(data), "--model", model,
               "--method", args.method, "--seq-len", str(args.seq_len), "--batch-size",
               str(args.batch_size), "--steps", str(args.steps), "--packing", args.packing,
               "--ours-checkpointing", args.ours_checkpointing, "--cuda-graphs", args.cuda_graphs]
    if args.gradient_checkpointing:
        command.append("--gradient-checkpointing")
    if args.memory_limit_gib:
        command += ["--memory-limit-gib", str(args.memory_limit_gib)]
    if args.limit_stock:
        command.append("--limit-stock")
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, check=False)
    line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        print(f"{which} failed:\n{done.stderr[-3000:]}")
        return None
    return json.loads(line[len("RESULT "):])


def _trainers(args) -> tuple[str, ...]:
    if args.only:
        return (args.only,)
    if args.trainers:
        return tuple(args.trainers)
    from jobs.training.kernels import liger_available

    return TRAINERS if liger_available() else ("ours", "stock")


def child(args) -> None:
    from benchmarks.random_nf4 import loading_random_nf4

    with loading_random_nf4():  # a random NF4 folder (70B) is built, not read
        result = (run_ours(args) if args.which == "ours"
                  else run_stock(args, liger=args.which == "stock-liger"))
    print("RESULT " + json.dumps(result))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="HF model directory (default: the embedded SmolLM2)")
    parser.add_argument("--shape", choices=sorted(SHAPES), help="random-init Llama of this shape")
    parser.add_argument("--tokenizer", type=Path,
                        help="tokenizer directory for --shape (default: the embedded SmolLM2's)")
    parser.add_argument("--method", default="lora", choices=("lora", "qlora"))
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--mean-words", type=float, default=60.0, help="mean assistant turn length")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="the stock runs checkpoint every layer (this trainer: see below)")
    parser.add_argument("--ours-checkpointing", choices=("auto", "on", "off"), default="auto",
                        help="this trainer's gradient_checkpointing (auto: its memory plan)")
    parser.add_argument("--memory-limit-gib", type=float,
                        help="this trainer's memory_limit_gib (default: the whole device)")
    parser.add_argument("--limit-stock", action="store_true",
                        help="hold the stock runs to --memory-limit-gib too")
    parser.add_argument("--long", action="store_true",
                        help="every example exactly --seq-len tokens (long-context runs)")
    parser.add_argument("--trainers", nargs="+", choices=TRAINERS,
                        help="which to run (default: all three on CUDA with liger-kernel, "
                             "else ours and stock)")
    parser.add_argument("--only", choices=TRAINERS, help="just this one")
    parser.add_argument("--repeats", type=int, default=1,
                        help="run each trainer this many times, alternating; report medians")
    parser.add_argument("--warmup", action="store_true",
                        help="first run each trainer once, unrecorded, so that no measured run "
                             "compiles Triton kernels (Liger's, in ours and in stock-liger)")
    parser.add_argument("--packing", choices=("auto", "on", "off"), default="auto",
                        help="this trainer's packing (auto: on for the CPU, off on CUDA)")
    parser.add_argument("--cuda-graphs", choices=("auto", "on", "off"), default="auto",
                        help="this trainer's cuda_graphs (auto: for small passes in jobs long "
                             "enough to pay for the captures, jobs.training.graphs)")
    parser.add_argument("--which", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--json-out", type=Path, help="also write the results here")
    parser.add_argument("--work", type=Path, help="folder for the data and random models (reused)")
    args = parser.parse_args()
    if args.which:
        child(args)
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work, model = bench_model(args, "tuneplex-train-bench-")
    data = work / "chat.jsonl"
    # Exactly the examples of `steps` optimizer steps, so both trainers train on the same ones.
    if args.long:
        write_long_dataset(data, args.steps * args.batch_size, tokens=args.seq_len)
    else:
        write_dataset(data, args.steps * args.batch_size, mean_words=args.mean_words)
    mean_context = _mean_context(model, data, args.seq_len, args.steps * args.batch_size)
    if args.warmup:  # unrecorded: fills Triton's on-disk cache, as on a worker that ran a job
        for which in dict.fromkeys(_trainers(args)):
            if _run_child(which, args, data, model) is None:
                return 1
    results, failed = [], []
    # Alternate the trainers (ours, stock, ours, stock, ...): GPU machines of one kind differ by
    # up to a third in speed from one lease to the next, and drift within one.
    for _ in range(args.repeats):
        for which in _trainers(args):
            result = _run_child(which, args, data, model)
            if result is None:  # out of memory, say: recorded, and the others still run
                failed.append(which)
                continue
            result["mean_context"] = mean_context
            result["mfu"] = mfu(result, model)
            results.append(result)
    import torch
    import transformers
    import peft

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU x{os.cpu_count()}"
    print(f"model {args.shape or Path(model).name}, {args.method}, micro-batch {args.batch_size}, "
          f"max length {args.seq_len}, {args.steps} steps, on {device}")
    versions = {"python": sys.version.split()[0], "torch": torch.__version__,
                "transformers": transformers.__version__, "peft": peft.__version__}
    if args.method == "qlora":
        import bitsandbytes

        versions["bitsandbytes"] = bitsandbytes.__version__
    from jobs.training.kernels import liger_version

    if liger_version():
        versions["liger-kernel"] = liger_version()
    print(", ".join(f"{k} {v}" for k, v in versions.items()))
    print(f"{'trainer':11} {'useful tok/s':>13} {'computed/useful':>16} {'peak MiB':>10} "
          f"{'estimate':>10} {'MFU':>7} {'loss':>8}")
    for r in results:
        ratio = r["computed_tokens"] / r["useful_tokens"]
        shown_mfu = f"{r['mfu'] * 100:.1f}%" if r.get("mfu") else "-"
        planned = r.get("plan", {}).get("estimated_peak_bytes")
        shown_plan = f"{planned / 2**20:.0f}" if planned else "-"
        print(f"{r['trainer']:11} {r['useful_tokens_per_second']:13.1f} {ratio:16.2f} "
              f"{r['peak_memory_mib']:10.0f} {shown_plan:>10} {shown_mfu:>7} "
              f"{r['final_loss']:8.4f}")
        if r.get("plan", {}).get("cuda_graphs"):
            print(f"{'':11} CUDA graphs: {r['plan']['cuda_graphs']} captured in "
                  f"{r['plan']['capture_seconds']:.1f} s; counting them, "
                  f"{r['useful_tokens_per_second_with_capture']:.1f} useful tok/s; peak "
                  f"reserved {r['peak_reserved_mib']:.0f} MiB")
    for which in failed:
        print(f"{which:11} failed (its error is printed above)")
    rates = {name: statistics.median(r["useful_tokens_per_second"] for r in results
                                     if r["trainer"] == name)
             for name in ("tuneplex", "stock", "stock-liger")
             if any(r["trainer"] == name for r in results)}
    summary: dict = {"median_useful_tokens_per_second": rates, "failed": failed}
    for baseline in ("stock", "stock-liger"):
        if "tuneplex" in rates and baseline in rates:
            key = "ratio" if baseline == "stock" else "ratio_vs_stock_liger"
            summary[key] = rates["tuneplex"] / rates[baseline]
            print(f"ratio tuneplex/{baseline} useful tokens/s (medians of {args.repeats}): "
                  f"{summary[key]:.2f}x")
    if args.json_out:
        args.json_out.write_text(json.dumps({"args": vars(args), "device": device,
                                             "versions": versions, "summary": summary,
                                             "results": results}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
