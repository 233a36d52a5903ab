"""ONNX export: CPU latency per generated token of the exported model in onnxruntime, each type
(fp32, fp16, int8), against transformers on the same merged model, in one run.

    .venv-train/bin/python benchmarks/export_onnx_latency.py [--merged DIR] [--types fp32,fp16,int8]
        [--tokens 64] [--repeats 3] [--threads N] [--json PATH]

The model is ``--merged`` (a Hugging Face folder) or the embedded SmolLM2-135M-Instruct (the
merge of a zero adapter is its base). Each type is built as the export builds it
(jobs.export.onnx.build: onnxruntime-genai's model builder, int8 through onnxruntime's dynamic
quantization), timed and sized. Then one chat prompt, greedy, ``--tokens`` new tokens, batch 1,
each engine on ``--threads`` threads (all cores by default):

- transformers: the merged model in fp32 (as the export's check loads it), its own KV cache;
- onnxruntime: the exported decoder fed its past key values as onnxruntime-genai feeds it
  (jobs.export.onnx.OnnxDecoder), in a plain InferenceSession on the CPU execution provider.

Per token: the decode steps' time over their count (the prompt's prefill is timed apart), the
median of ``--repeats`` runs after one warm-up. The ratio is transformers' time per token over
the ONNX model's: above 1, the ONNX model is faster. ``measure`` is the function
benchmarks/export.py calls for its ONNX rows.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO)]

PROMPT = ("<|im_start|>user\nExplain in a few sentences why the sky is blue.<|im_end|>\n"
          "<|im_start|>assistant\n")
TYPES = ("fp32", "fp16", "int8")


def embedded_model() -> Path:
    data_dir = Path(os.environ.get("TUNEPLEX_DATA_DIR", REPO / "var"))
    smol = data_dir / "models" / "SmolLM2-135M-Instruct"
    if not (smol / "config.json").exists():
        from jobs.training.gguf_convert import convert, packaged_gguf

        convert(packaged_gguf(), smol)
    return smol


def _timed_decode(prefill, step, tokens: int) -> tuple[float, float, list[int]]:
    """``prefill()`` → (last logits row, state); ``step(token, state)`` → the same. Greedy:
    (prefill seconds, decode seconds per token, the tokens)."""
    started = time.perf_counter()
    logits, state = prefill()
    prefilled = time.perf_counter()
    generated = []
    for _ in range(tokens):
        generated.append(int(logits.argmax()))
        logits, state = step(generated[-1], state)
    finished = time.perf_counter()
    return prefilled - started, (finished - prefilled) / tokens, generated


def _median_run(prefill, step, tokens: int, repeats: int) -> dict:
    _timed_decode(prefill, step, min(tokens, 8))  # warm-up: allocations, thread pools
    runs = [_timed_decode(prefill, step, tokens) for _ in range(repeats)]
    return {"prefill_ms": round(statistics.median(r[0] for r in runs) * 1000, 2),
            "ms_per_token": round(statistics.median(r[1] for r in runs) * 1000, 3),
            "tokens": runs[0][2]}


def transformers_latency(merged: Path, ids: list[int], tokens: int, repeats: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()

    def prefill():
        output = model(torch.tensor([ids]), use_cache=True)
        return output.logits[0, -1], output.past_key_values

    def step(token, past):
        output = model(torch.tensor([[token]]), past_key_values=past, use_cache=True)
        return output.logits[0, -1], output.past_key_values

    with torch.inference_mode():
        return _median_run(prefill, step, tokens, repeats)


def onnx_latency(model_dir: Path, ids: list[int], tokens: int, repeats: int, threads: int) -> dict:
    from jobs.export.onnx import OnnxDecoder

    decoder = OnnxDecoder(model_dir, threads=threads)

    def prefill():
        logits, past = decoder.step(ids, decoder.empty_cache(), 0)
        return logits[-1], (past, len(ids))

    def step(token, state):
        past, seen = state
        logits, past = decoder.step([token], past, seen)
        return logits[-1], (past, seen + 1)

    return _median_run(prefill, step, tokens, repeats)


def measure(merged: Path, work: Path, *, types=TYPES, tokens: int = 64, repeats: int = 3,
            threads: int = 0) -> dict:
    """Export each type of ``merged`` into ``work`` and time its tokens against transformers':
    {"transformers": {...}, "onnx": {type: {build_s, size_bytes, ms_per_token, ratio, ...}}}."""
    import torch
    from transformers import AutoTokenizer

    from jobs.export.onnx import build

    threads = threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    ids = AutoTokenizer.from_pretrained(merged)(PROMPT, add_special_tokens=False)["input_ids"]
    reference = transformers_latency(merged, ids, tokens, repeats)
    rows = {}
    for quantization in types:
        started = time.perf_counter()
        model_dir = build(merged, work / quantization, quantization)
        build_s = time.perf_counter() - started
        size = sum(f.stat().st_size for f in model_dir.iterdir() if f.is_file())
        row = onnx_latency(model_dir, ids, tokens, repeats, threads)
        matching = sum(a == b for a, b in zip(row.pop("tokens"), reference["tokens"]))
        rows[quantization] = {"build_s": round(build_s, 1), "size_bytes": size, **row,
                              "ratio": round(reference["ms_per_token"] / row["ms_per_token"], 2),
                              "greedy_tokens_as_transformers": f"{matching}/{tokens}"}
        shutil.rmtree(work / quantization, ignore_errors=True)
    reference.pop("tokens")
    return {"model": str(merged), "prompt_tokens": len(ids), "new_tokens": tokens,
            "repeats": repeats, "threads": threads, "transformers": reference, "onnx": rows}


def _print(result: dict) -> None:
    base = result["transformers"]
    print(f"{result['model']}: {result['prompt_tokens']}-token prompt, {result['new_tokens']} "
          f"new tokens, {result['threads']} threads, median of {result['repeats']}")
    print(f"{'engine':<24}{'ms/token':>10}{'prefill ms':>12}{'ratio':>8}{'size MB':>10}"
          f"{'build s':>10}  greedy as transformers")
    print(f"{'transformers fp32':<24}{base['ms_per_token']:>10}{base['prefill_ms']:>12}"
          f"{'1.00':>8}")
    for name, row in result["onnx"].items():
        print(f"{'onnxruntime ' + name:<24}{row['ms_per_token']:>10}{row['prefill_ms']:>12}"
              f"{row['ratio']:>8.2f}{row['size_bytes'] / 1e6:>10.1f}{row['build_s']:>10}  "
              f"{row['greedy_tokens_as_transformers']}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--merged", type=Path, help="a merged model's folder (default: the "
                                                    "embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--types", default=",".join(TYPES))
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="0: every core")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    if Path("/tmp/bench-quiet").exists():
        print("another benchmark is being measured (/tmp/bench-quiet): not now", file=sys.stderr)
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import onnxruntime
    import torch
    import transformers

    types = tuple(t for t in args.types.split(",") if t)
    load_before = os.getloadavg()[0]  # a shared machine: other work skews every figure
    with tempfile.TemporaryDirectory(prefix="onnx-latency-") as work:
        result = measure(args.merged or embedded_model(), Path(work), types=types,
                         tokens=args.tokens, repeats=args.repeats, threads=args.threads)
    result = {"date": time.strftime("%Y-%m-%d"), "cpu_count": os.cpu_count(),
              "cpu": platform.processor() or platform.machine(),
              "load_average": {"before": load_before, "after": os.getloadavg()[0]},
              "versions": {"onnxruntime": onnxruntime.__version__, "torch": torch.__version__,
                           "transformers": transformers.__version__}, **result}
    _print(result)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
