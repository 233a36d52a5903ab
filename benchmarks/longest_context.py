"""The longest example each trainer trains within a GPU memory budget, found by search.

    python3 benchmarks/longest_context.py --shape llama-8b --tokenizer DIR --method qlora \
        --memory-limit-gib 80 --start 65536 --most 262144 --resolution 16384 \
        --trainers ours stock-liger --json-out FILE

For each trainer: examples of exactly L tokens, one per micro-batch (`train_throughput.py
--long`), `--steps` optimizer steps in a fresh process held to the budget (this trainer through
its `memory_limit_gib`, the stock ones through the same allocator limit, `--limit-stock`). L
starts at `--start` and doubles while the run succeeds, up to `--most`; then the largest success
and the smallest failure are bisected down to `--resolution` tokens. A run fits when it finishes
its steps (a run out of memory fails; this trainer plans its memory for the budget and does not
retry at micro-batch 1). Reported per length tried: fitted or not, useful tokens/s, peak
allocated and reserved memory, and this trainer's planned peak (the pre-flight rule) and plan.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.train_throughput import (
    SHAPES,
    TRAINERS,
    _run_child,
    bench_model,
    write_long_dataset,
)


def probe(which: str, args, model: str, work: Path, length: int) -> dict:
    """One run of ``which`` at ``length``-token examples: what it measured, or that it failed."""
    data = work / f"long-{length}.jsonl"
    if not data.exists():
        write_long_dataset(data, args.steps, tokens=length)
    run_args = SimpleNamespace(
        method=args.method, seq_len=length, batch_size=1, steps=args.steps, packing="auto",
        ours_checkpointing="auto", cuda_graphs="auto", gradient_checkpointing=True,
        memory_limit_gib=args.memory_limit_gib, limit_stock=True)
    result = _run_child(which, run_args, data, model)
    if result is None:
        return {"trainer": which, "tokens": length, "fits": False}
    plan = result.get("plan", {})
    return {"trainer": which, "tokens": length, "fits": True,
            "useful_tokens_per_second": result["useful_tokens_per_second"],
            "peak_memory_mib": result["peak_memory_mib"],
            "peak_reserved_mib": result["peak_reserved_mib"],
            "estimated_peak_mib": (plan["estimated_peak_bytes"] / 2**20
                                   if "estimated_peak_bytes" in plan else None),
            "plan": plan, "losses": result["losses"], "step_seconds": result["step_seconds"]}


def search(which: str, args, model: str, work: Path) -> list[dict]:
    tried: list[dict] = []

    def fits(length: int) -> bool:
        outcome = probe(which, args, model, work, length)
        tried.append(outcome)
        print(json.dumps({k: v for k, v in outcome.items() if k not in ("plan", "losses")}),
              flush=True)
        return outcome["fits"]

    length, good, bad = args.start, None, None
    while length <= args.most:
        if not fits(length):
            bad = length
            break
        good, length = length, length * 2
    if good is None:
        return tried
    while bad is not None and bad - good > args.resolution:
        middle = (good + bad) // 2 // args.resolution * args.resolution
        if middle <= good:
            break
        good, bad = (middle, bad) if fits(middle) else (good, middle)
    return tried


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama-8b")
    parser.add_argument("--tokenizer", type=Path)
    parser.add_argument("--model", help="HF model directory instead of a random --shape")
    parser.add_argument("--method", default="qlora", choices=("lora", "qlora"))
    parser.add_argument("--memory-limit-gib", type=float, required=True)
    parser.add_argument("--start", type=int, default=32768)
    parser.add_argument("--most", type=int, default=262144)
    parser.add_argument("--resolution", type=int, default=16384)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--trainers", nargs="+", choices=TRAINERS, default=["ours", "stock-liger"])
    parser.add_argument("--work", type=Path)
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    work, model = bench_model(args, "tuneplex-longest-")
    results = {which: search(which, args, model, work) for which in args.trainers}
    print(f"{args.shape} {args.method}, budget {args.memory_limit_gib} GiB, {args.steps} steps")
    print(f"{'trainer':11} {'tokens':>8} {'fits':>5} {'tok/s':>9} {'peak MiB':>9} "
          f"{'reserved':>9} {'estimate':>9}")
    for which, tried in results.items():
        for r in tried:
            cells = [f"{r.get(k):9.0f}" if r.get(k) is not None else f"{'-':>9}"
                     for k in ("useful_tokens_per_second", "peak_memory_mib",
                               "peak_reserved_mib", "estimated_peak_mib")]
            print(f"{which:11} {r['tokens']:8d} {r['fits']!s:>5} {' '.join(cells)}")
        longest = max((r["tokens"] for r in tried if r["fits"]), default=None)
        print(f"{which:11} longest that fits: {longest}")
    if args.json_out:
        args.json_out.write_text(json.dumps({"args": vars(args), "results": results},
                                            indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
