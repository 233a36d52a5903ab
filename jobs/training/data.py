"""Tokenized datasets and micro-batches for the trainer.

Two ways to form a micro-batch of ``batch_size`` examples:

* packed: one row, the examples concatenated; ``position_ids`` restart at 0 for each example,
  which makes transformers' attention (sdpa/eager/flash) block-diagonal, so each example attends
  only to itself. The row also carries the example boundaries (``cu_seqlens``) for the varlen
  kernel (:mod:`jobs.training.attention`). No padding is computed at all.
* padded: one row per example, padded to the longest in the micro-batch. Examples are grouped by
  length within a shuffled window so padding stays small.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch

from jobs.training.attention import cu_seqlens
from jobs.training.jsonl import PREFERENCE, Example, read_examples
from jobs.training.tokenize import TokenizedExample, tokenize_example

IGNORE_INDEX = -100


@dataclass(frozen=True)
class PreferencePair:
    """One DPO pair as the trainer schedules it: a unit of two sequences, the templated prompt
    followed by the chosen answer and by the rejected one (loss only on the answers)."""

    chosen: TokenizedExample
    rejected: TokenizedExample

    @property
    def input_ids(self) -> list[int]:
        """Both sequences' tokens: what the pair costs in a packed row (the scheduler, the memory
        plan and the forward-pass splitter measure its length)."""
        return self.chosen.input_ids + self.rejected.input_ids

    @property
    def loss_mask(self) -> list[int]:
        return self.chosen.loss_mask + self.rejected.loss_mask

    def sequences(self) -> tuple[TokenizedExample, TokenizedExample]:
        return self.chosen, self.rejected


@dataclass(frozen=True)
class LoadedData:
    train: list[TokenizedExample | PreferencePair]
    validation: list[TokenizedExample | PreferencePair]
    truncated: int
    dropped_without_targets: int


def _fit(tokens: TokenizedExample, *, max_seq_len: int, assistant_only_loss: bool
         ) -> tuple[TokenizedExample | None, bool]:
    """The example cut to ``max_seq_len`` (and whether it was), or None when nothing is left to
    learn after the cut."""
    ids, mask = tokens.input_ids, tokens.loss_mask
    if not assistant_only_loss:
        mask = [1] * len(ids)
    cut = len(ids) > max_seq_len
    if cut:
        ids, mask = ids[:max_seq_len], mask[:max_seq_len]
    if sum(mask[1:]) == 0:
        return None, cut
    return TokenizedExample(input_ids=ids, loss_mask=mask), cut


def _tokenized(tokenizer, example: Example, *, max_seq_len: int, assistant_only_loss: bool
               ) -> tuple[TokenizedExample | PreferencePair | None, bool]:
    """One training unit: a supervised example, or a preference pair (scored only on its two
    answers, each cut after the prompt like a supervised example)."""
    if example.kind != PREFERENCE:
        return _fit(tokenize_example(tokenizer, example), max_seq_len=max_seq_len,
                    assistant_only_loss=assistant_only_loss)
    sides = [_fit(tokenize_example(tokenizer, example.with_answer(answer)),
                  max_seq_len=max_seq_len, assistant_only_loss=True)
             for answer in (example.chosen, example.rejected)]
    cut = any(c for _, c in sides)
    if sides[0][0] is None or sides[1][0] is None:
        return None, cut
    return PreferencePair(chosen=sides[0][0], rejected=sides[1][0]), cut


def load_examples(path: Path, tokenizer, *, max_seq_len: int, assistant_only_loss: bool
                  ) -> tuple[list[TokenizedExample | PreferencePair], int, int]:
    examples, truncated, dropped = [], 0, 0
    with path.open("rb") as stream:
        for _, example in read_examples(stream):
            item, cut = _tokenized(tokenizer, example, max_seq_len=max_seq_len,
                                   assistant_only_loss=assistant_only_loss)
            truncated += cut
            if item is None:  # nothing left to learn after truncation
                dropped += 1
                continue
            examples.append(item)
    return examples, truncated, dropped


def sequences_of(items) -> list[TokenizedExample]:
    """The sequences a forward pass computes for these units: a pair is its chosen then its
    rejected sequence (the DPO objective reads them back in that order)."""
    return [sequence for item in items
            for sequence in (item.sequences() if isinstance(item, PreferencePair) else (item,))]


def load_data(*, train_file: str, validation_file: str | None, validation_split: float,
              tokenizer, max_seq_len: int, assistant_only_loss: bool, seed: int) -> LoadedData:
    train, truncated, dropped = load_examples(Path(train_file), tokenizer, max_seq_len=max_seq_len,
                                              assistant_only_loss=assistant_only_loss)
    validation: list[TokenizedExample] = []
    if validation_file:
        validation, t2, d2 = load_examples(Path(validation_file), tokenizer,
                                           max_seq_len=max_seq_len,
                                           assistant_only_loss=assistant_only_loss)
        truncated, dropped = truncated + t2, dropped + d2
    elif validation_split > 0 and len(train) > 1:
        order = list(range(len(train)))
        random.Random(seed).shuffle(order)
        held = max(1, int(len(train) * validation_split))
        held_out = set(order[:held])
        validation = [train[i] for i in sorted(held_out)]
        train = [example for i, example in enumerate(train) if i not in held_out]
    return LoadedData(train=train, validation=validation, truncated=truncated,
                      dropped_without_targets=dropped)


def epoch_order(n: int, *, seed: int, epoch: int) -> list[int]:
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


def micro_batches(examples: list[TokenizedExample], order: list[int], *, batch_size: int,
                  packing: bool) -> list[list[int]]:
    """Example indices per micro-batch, in training order."""
    groups = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    if packing:
        return groups
    # Padded: sort by length inside windows of 32 micro-batches, keeping the shuffle's randomness.
    window = batch_size * 32
    regrouped: list[list[int]] = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start:start + window], key=lambda i: len(examples[i].input_ids))
        regrouped += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    return regrouped


def forward_passes(micro: list[int], examples: list[TokenizedExample], *, max_tokens: int,
                   packing: bool) -> list[list[int]]:
    """One micro-batch as consecutive forward passes of at most ``max_tokens`` computed tokens
    (packed: their sum; padded: rows x the longest), at example boundaries; an example longer
    than ``max_tokens`` gets a pass of its own. The loss is normalised over the whole optimizer
    step, so the gradient is the same as in one pass; only the activations kept are smaller."""
    passes: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for index in micro:
        length = len(examples[index].input_ids)
        grown = max(longest, length)
        cost = (sum(len(examples[i].input_ids) for i in current) + length if packing
                else grown * (len(current) + 1))
        if current and cost > max_tokens:
            passes.append(current)
            current, grown = [], length
        current.append(index)
        longest = grown
    if current:
        passes.append(current)
    return passes


@dataclass
class Batch:
    input_ids: torch.Tensor
    labels: torch.Tensor  # already shifted: labels[t] is the target predicted at position t
    position_ids: torch.Tensor | None
    attention_mask: torch.Tensor | None
    target_tokens: int  # positions that carry loss
    tokens: int  # real (non-padding) tokens computed
    cu_seqlens: torch.Tensor | None = None  # packed: example boundaries 0, l1, l1+l2, ...
    max_length: int = 0  # packed: the longest example in the row
    # the ids in host memory, once moved to a GPU: an embedding kept in host memory looks its
    # rows up without waiting for the GPU (jobs.training.offload.HostEmbedding)
    host_input_ids: torch.Tensor | None = None

    def to(self, device: torch.device) -> Batch:
        move = (lambda t: t.to(device, non_blocking=True) if t is not None else None)
        host = self.host_input_ids if self.host_input_ids is not None else (
            self.input_ids if self.input_ids.device.type == "cpu" else None)
        return Batch(move(self.input_ids), move(self.labels), move(self.position_ids),
                     move(self.attention_mask), self.target_tokens, self.tokens,
                     move(self.cu_seqlens), self.max_length, host_input_ids=host)


def pad_packed(batch: Batch, length: int, pad_id: int) -> Batch:
    """A packed row padded to exactly ``length`` tokens (fixed shapes, for CUDA graphs): the
    padding is one more example of its own in ``cu_seqlens`` (of zero tokens when the row is
    already that long), with no loss; ``max_length`` becomes ``length``, a bound the varlen
    kernel accepts for any row of that length. ``tokens`` and ``target_tokens`` stay the real
    ones. Host tensors in, host tensors out."""
    if batch.cu_seqlens is None:
        raise ValueError("only a packed row can be padded to a fixed length")
    real = batch.input_ids.shape[1]
    if length < real:
        raise ValueError(f"a row of {real} tokens does not fit {length}")
    extra = length - real
    pad = (lambda t, value: torch.cat([t, torch.full((1, extra), value, dtype=t.dtype)], dim=1))
    bounds = torch.cat([batch.cu_seqlens, torch.tensor([length], dtype=batch.cu_seqlens.dtype)])
    positions = torch.cat([batch.position_ids, torch.arange(extra, dtype=batch.position_ids.dtype)
                           [None]], dim=1)
    return Batch(pad(batch.input_ids, pad_id), pad(batch.labels, IGNORE_INDEX), positions, None,
                 batch.target_tokens, batch.tokens, cu_seqlens=bounds, max_length=length)


def _shifted_labels(example: TokenizedExample) -> list[int]:
    ids, mask = example.input_ids, example.loss_mask
    return [ids[t + 1] if mask[t + 1] else IGNORE_INDEX for t in range(len(ids) - 1)] + [IGNORE_INDEX]


def collate(examples: list[TokenizedExample], *, packing: bool, pad_id: int) -> Batch:
    if packing:
        ids, labels, positions = [], [], []
        for example in examples:
            ids += example.input_ids
            labels += _shifted_labels(example)
            positions += range(len(example.input_ids))
        lengths = [len(example.input_ids) for example in examples]
        label_tensor = torch.tensor([labels])
        return Batch(torch.tensor([ids]), label_tensor, torch.tensor([positions]), None,
                     int((label_tensor != IGNORE_INDEX).sum()), len(ids),
                     cu_seqlens=cu_seqlens(lengths), max_length=max(lengths))
    longest = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), longest), pad_id)
    labels = torch.full((len(examples), longest), IGNORE_INDEX)
    attention = torch.zeros((len(examples), longest), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(_shifted_labels(example))
        attention[row, :n] = 1
    return Batch(ids, labels, None, attention, int((labels != IGNORE_INDEX).sum()),
                 int(attention.sum()))
