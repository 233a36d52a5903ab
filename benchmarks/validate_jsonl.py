"""Dataset validation throughput and memory, against a plain json.loads-per-line loop.

    .venv/bin/python benchmarks/validate_jsonl.py [--mb 200] [--keep FILE]

Generates a chat JSONL file of realistic, variable-length examples (at least --mb megabytes),
then runs, each in a fresh process so peak RSS belongs to it alone:
  baseline   for line in file: json.loads(line)          (the parse ceiling)
  validator  jobs.training.jsonl.validate_jsonl(file)   (what POST /v1/files runs)
and prints MB/s, peak RSS and the validator/baseline ratio. Targets on 2 cores:
>= 50 MB/s and < 300 MB peak RSS whatever the file size.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

WORDS = ("the model learns from examples and answers questions about data training loss "
         "adapter rank alpha tokens batch sequence length gradient platform team dataset "
         "evaluation prompt completion assistant user system").split()


def _sentence(rng: random.Random, mean_words: float) -> str:
    n = max(1, int(rng.lognormvariate(0, 0.8) * mean_words))
    return " ".join(rng.choice(WORDS) for _ in range(n))


def generate(path: Path, megabytes: int, seed: int = 0) -> int:
    rng = random.Random(seed)
    target = megabytes * 10**6
    written = 0
    # Pre-build a pool of lines so generation is fast; shuffle picks from it.
    pool = []
    for _ in range(5000):
        turns = [{"role": "system", "content": "You are a helpful assistant."}] if rng.random() < 0.5 else []
        for _ in range(rng.choice((1, 1, 2, 3))):
            turns.append({"role": "user", "content": _sentence(rng, 25)})
            turns.append({"role": "assistant", "content": _sentence(rng, 80)})
        pool.append((json.dumps({"messages": turns}, ensure_ascii=False) + "\n").encode())
    with path.open("wb") as handle:
        while written < target:
            line = rng.choice(pool)
            handle.write(line)
            written += len(line)
    return written


BASELINE = """
import json, resource, sys, time
started = time.perf_counter()
with open(sys.argv[1], "rb") as handle:
    for line in handle:
        json.loads(line)
elapsed = time.perf_counter() - started
print(elapsed, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""

VALIDATOR = """
import resource, sys, time
from jobs.training.jsonl import validate_jsonl
started = time.perf_counter()
with open(sys.argv[1], "rb") as handle:
    report = validate_jsonl(handle)
elapsed = time.perf_counter() - started
assert report.ok, report.as_dict()
print(elapsed, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def measure(code: str, path: Path) -> tuple[float, float]:
    result = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True,
                            text=True, check=True, cwd=Path(__file__).resolve().parents[1])
    elapsed, rss_kb = result.stdout.split()
    return float(elapsed), int(rss_kb) / 1024


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=int, default=200, help="size of the generated file")
    parser.add_argument("--keep", type=Path, help="write the file here and keep it")
    args = parser.parse_args()
    folder = tempfile.mkdtemp(prefix="tuneplex-bench-")
    path = args.keep or Path(folder) / "chat.jsonl"
    size = generate(path, args.mb)
    mb = size / 10**6
    print(f"file: {mb:.0f} MB of chat JSONL ({path})")
    try:
        base_s, base_rss = measure(BASELINE, path)
        val_s, val_rss = measure(VALIDATOR, path)
    finally:
        if args.keep is None:
            os.remove(path)
            os.rmdir(folder)
    print(f"{'':10} {'MB/s':>8} {'peak RSS MiB':>13}")
    print(f"{'baseline':10} {mb / base_s:8.1f} {base_rss:13.1f}   (json.loads per line)")
    print(f"{'validator':10} {mb / val_s:8.1f} {val_rss:13.1f}")
    print(f"ratio validator/baseline: {base_s / val_s:.2f}x throughput")
    ok = mb / val_s >= 50 and val_rss < 300
    print("targets (>= 50 MB/s, < 300 MiB):", "met" if ok else "NOT met")
    return 0


if __name__ == "__main__":
    sys.exit(main())
