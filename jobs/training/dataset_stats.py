"""Token statistics of a validated JSONL dataset, with a base model's own tokenizer.

    python -m jobs.training.dataset_stats --file DATA.jsonl --model MODEL_DIR --max-seq-len N

prints one JSON object: examples, total_tokens, token lengths (min, mean, p50, p95, max and a
histogram), examples_over_max_length, exact duplicates and role counts. Examples are tokenized
exactly as the trainer tokenizes them (:mod:`jobs.training.tokenize`), so the counts are what
training sees.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
from array import array
from collections import Counter
from pathlib import Path

from jobs.training.jsonl import iter_lines, parse_line, detect_format, to_example
from jobs.training.tokenize import load_tokenizer, tokenize_example


def histogram(lengths: list[int] | array) -> list[dict]:
    """Power-of-two bins [lo, hi): readable for lengths from 1 to 100k tokens."""
    if not lengths:
        return []
    top = max(lengths)
    bins, lo = [], 0
    hi = 16
    while lo <= top:
        count = sum(1 for n in lengths if lo <= n < hi)
        bins.append({"min": lo, "max": hi - 1, "count": count})
        lo, hi = hi, hi * 2
    return bins


def percentile(sorted_values, fraction: float) -> int:
    """Nearest-rank percentile."""
    if not sorted_values:
        return 0
    rank = max(1, math.ceil(fraction * len(sorted_values)))
    return int(sorted_values[rank - 1])


def compute(path: Path, model_dir: Path, max_seq_len: int) -> dict:
    tokenizer = load_tokenizer(model_dir)
    lengths = array("I")
    digests: set[bytes] = set()
    duplicates = 0
    roles: Counter = Counter()
    trained_tokens = 0
    file_format = None
    with path.open("rb") as stream:
        for _, raw in iter_lines(stream):
            if raw is None or not raw.strip():
                continue
            record = parse_line(raw)
            if file_format is None:
                file_format = detect_format(record)
            # Exact duplicates: the same JSON value, whatever the key order or spacing.
            digest = hashlib.blake2b(json.dumps(record, sort_keys=True, ensure_ascii=False)
                                     .encode(), digest_size=12).digest()
            if digest in digests:
                duplicates += 1
            else:
                digests.add(digest)
            example = to_example(record, file_format)
            for message in example.messages:
                roles[message["role"]] += 1
            tokens = tokenize_example(tokenizer, example)
            lengths.append(len(tokens.input_ids))
            trained_tokens += sum(tokens.loss_mask)
    ordered = sorted(lengths)
    total = sum(ordered)
    return {
        "format": file_format,
        "tokenizer": model_dir.name,
        "examples": len(ordered),
        "total_tokens": total,
        "trained_tokens": trained_tokens,
        "token_length": {
            "min": int(ordered[0]) if ordered else 0,
            "mean": round(total / len(ordered), 2) if ordered else 0,
            "p50": percentile(ordered, 0.50),
            "p95": percentile(ordered, 0.95),
            "max": int(ordered[-1]) if ordered else 0,
            "histogram": histogram(ordered),
        },
        "max_sequence_length": max_seq_len,
        "examples_over_max_length": sum(1 for n in ordered if n > max_seq_len),
        "duplicates": duplicates,
        "role_counts": dict(sorted(roles.items())),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Token statistics of a JSONL dataset.")
    parser.add_argument("--file", type=Path, required=True)
    parser.add_argument("--model", type=Path, required=True, help="base model directory")
    parser.add_argument("--max-seq-len", type=int, required=True)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    print(json.dumps(compute(args.file, args.model, args.max_seq_len)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
