"""Token statistics of a validated JSONL dataset, with a base model's own tokenizer.

    python -m jobs.training.dataset_stats --file DATA.jsonl --model MODEL_DIR --max-seq-len N

prints one JSON object: examples, total_tokens, token lengths (min, mean, p50, p95, max and a
histogram), examples_over_max_length, exact duplicates and role counts. Examples are tokenized
exactly as the trainer tokenizes them (:mod:`jobs.training.tokenize`), so the counts are what
training sees.

Preference files (DPO pairs) add ``pairs``: the prompt's and each answer's token lengths, the share
of pairs the trainer truncates, and ``problems``: each pair longer than ``--max-seq-len`` after the
chat template (``preference_too_long``, with its line; the first 50), which the streaming
validator cannot see without the tokenizer. A token length there is a whole pair's: the prompt
with its chosen and with its rejected answer, as one packed forward pass computes them.
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

from jobs.training.jsonl import (
    MAX_REPORTED_ERRORS,
    PREFERENCE,
    Problem,
    detect_format,
    iter_lines,
    parse_line,
    to_example,
)
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


def _summary(values: list[int]) -> dict:
    ordered = sorted(values)
    return {"min": ordered[0] if ordered else 0,
            "mean": round(sum(ordered) / len(ordered), 2) if ordered else 0,
            "p50": percentile(ordered, 0.50), "p95": percentile(ordered, 0.95),
            "max": ordered[-1] if ordered else 0}


class PairStatistics:
    """Token lengths of DPO pairs: prompt, chosen and rejected answers, and the over-long ones."""

    def __init__(self, max_seq_len: int) -> None:
        self.max_seq_len = max_seq_len
        self.prompt: list[int] = []
        self.chosen: list[int] = []
        self.rejected: list[int] = []
        self.truncated = 0
        self.problems: list[Problem] = []
        self.too_long = 0

    def add(self, tokenizer, example, line: int) -> tuple[int, int]:
        """Records the pair; returns its (tokens, trained tokens)."""
        sides = [tokenize_example(tokenizer, example.with_answer(answer))
                 for answer in (example.chosen, example.rejected)]
        prompt = sides[0].loss_mask.index(1) if 1 in sides[0].loss_mask else len(sides[0].input_ids)
        self.prompt.append(prompt)
        self.chosen.append(len(sides[0].input_ids) - prompt)
        self.rejected.append(len(sides[1].input_ids) - prompt)
        longest = max(len(side.input_ids) for side in sides)
        if longest > self.max_seq_len:
            self.truncated += 1
            self.too_long += 1
            if len(self.problems) < MAX_REPORTED_ERRORS:
                self.problems.append(Problem(
                    "preference_too_long", f"The pair is {longest} tokens long after the chat "
                    f"template (prompt {prompt}); the limit is {self.max_seq_len}: its answers are "
                    "truncated, or the pair dropped when the prompt alone is too long.", line))
        return (sum(len(side.input_ids) for side in sides),
                sum(sum(side.loss_mask) for side in sides))

    def as_dict(self) -> dict:
        return {"prompt_tokens": _summary(self.prompt), "chosen_tokens": _summary(self.chosen),
                "rejected_tokens": _summary(self.rejected), "truncated": self.truncated,
                "truncated_share": round(self.truncated / len(self.prompt), 4) if self.prompt else 0,
                "problem_count": self.too_long,
                "problems": [problem.as_dict() for problem in self.problems]}


def compute(path: Path, model_dir: Path, max_seq_len: int) -> dict:
    tokenizer = load_tokenizer(model_dir)
    lengths = array("I")
    digests: set[bytes] = set()
    duplicates = 0
    roles: Counter = Counter()
    trained_tokens = 0
    file_format = None
    pairs = PairStatistics(max_seq_len)
    with path.open("rb") as stream:
        for line, raw in iter_lines(stream):
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
            if file_format == PREFERENCE:
                roles["assistant"] += 2
                length, trained = pairs.add(tokenizer, example, line)
            else:
                tokens = tokenize_example(tokenizer, example)
                length, trained = len(tokens.input_ids), sum(tokens.loss_mask)
            lengths.append(length)
            trained_tokens += trained
    ordered = sorted(lengths)
    total = sum(ordered)
    extra = {"pairs": pairs.as_dict()} if file_format == PREFERENCE else {}
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
        "examples_over_max_length": (pairs.too_long if file_format == PREFERENCE
                                     else sum(1 for n in ordered if n > max_seq_len)),
        "duplicates": duplicates,
        "role_counts": dict(sorted(roles.items())),
        **extra,
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
