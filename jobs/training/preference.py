"""Preference tuning: DPO pairs and the sigmoid DPO loss, on the trainer's own batches.

A pair is two sequences, the templated prompt followed by the chosen answer and by the rejected
one, trained only on the answer's tokens. A micro-batch of pairs is collated like supervised
examples ([chosen 1, rejected 1, chosen 2, ...]): packed into one row (each sequence attending
only to itself) or padded rows, so chosen and rejected go through one forward pass, and the output
head runs only on answer tokens (:func:`jobs.training.kernels.linear_cross_entropy`, per token).

The reference model is the same model without the trained adapter, under ``no_grad``: peft's
``disable_adapter()``, or, when training continues from an adapter, that adapter loaded a second
time, frozen, under the name ``reference`` (what TRL does with its ``ref`` adapter). No second copy
of the base model is ever held.

The loss is TRL's ``loss_type="sigmoid"`` (trl/trainer/dpo_trainer.py, ``_compute_loss``), with
sequence log-probabilities summed over answer tokens::

    delta = (logp(chosen) - ref_logp(chosen)) - (logp(rejected) - ref_logp(rejected))
    loss  = mean over pairs of -logsigmoid(beta * delta)
    rewards = beta * (logp - ref_logp)   (detached);  accuracy = mean(chosen > rejected)
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F

from jobs.training.data import IGNORE_INDEX, Batch, PreferencePair  # noqa: F401 - the unit

REFERENCE_ADAPTER = "reference"
TRAINED_ADAPTER = "default"


def dpo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, *, beta: float
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair sigmoid DPO losses and the chosen and rejected rewards (detached)."""
    chosen_logratios = chosen_logps - ref_chosen_logps
    rejected_logratios = rejected_logps - ref_rejected_logps
    losses = -F.logsigmoid(beta * (chosen_logratios - rejected_logratios))
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def sequence_ids(batch: Batch) -> torch.Tensor:
    """For each position of ``batch.labels``, the index of the sequence it belongs to."""
    if batch.cu_seqlens is not None:  # packed: one row, sequences back to back
        lengths = (batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]).to(batch.labels.device)
        return torch.repeat_interleave(torch.arange(len(lengths), device=lengths.device),
                                       lengths)[None, :]
    rows = batch.labels.shape[0]
    return torch.arange(rows, device=batch.labels.device)[:, None].expand_as(batch.labels)


def sequence_logps(token_logps: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Sum of the target tokens' log-probabilities of each sequence of the batch."""
    owners = sequence_ids(batch)[batch.labels != IGNORE_INDEX]
    count = int(sequence_ids(batch).max()) + 1
    sums = torch.zeros(count, dtype=token_logps.dtype, device=token_logps.device)
    return sums.index_add(0, owners, token_logps)


@contextmanager
def reference_model(model):
    """The reference policy: the adapter being trained switched off (or the frozen copy of the
    adapter training continues from). Use under ``torch.no_grad()``."""
    if REFERENCE_ADAPTER in model.peft_config:
        model.set_adapter(REFERENCE_ADAPTER, inference_mode=True)
        try:
            yield model
        finally:
            model.set_adapter(TRAINED_ADAPTER)  # trainable again; the reference stays frozen
    else:
        with model.disable_adapter():
            yield model


class DpoObjective:
    """The DPO objective for the trainer's step and evaluation: a unit is a pair."""

    TALLIES = ("loss", "correct", "margin", "chosen", "rejected")

    def __init__(self, beta: float, token_losses) -> None:
        self.beta = beta
        # (model, batch) -> (each target token's loss, correct predictions): the trainer's
        # forward with the target-only fused head
        self.token_losses = token_losses

    def units(self, batch: Batch) -> int:
        return _sequences(batch) // 2

    def forward(self, model, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        """(sum of the batch's pair losses, tallies to add up over the step)."""
        losses, _ = self.token_losses(model, batch)
        policy = sequence_logps(-losses, batch)
        with torch.no_grad(), reference_model(model):
            ref_losses, _ = self.token_losses(model, batch)
            reference = sequence_logps(-ref_losses, batch)
        pair_losses, chosen, rejected = dpo_loss(policy[0::2], policy[1::2], reference[0::2],
                                                 reference[1::2], beta=self.beta)
        loss_sum = pair_losses.sum()
        return loss_sum, {"loss": loss_sum.item(), "correct": int((chosen > rejected).sum()),
                          "margin": float((chosen - rejected).sum()),
                          "chosen": float(chosen.sum()), "rejected": float(rejected.sum())}

    def summary(self, totals: dict[str, float], units: int) -> dict[str, Any]:
        n = max(1, units)
        return {"loss": round(totals["loss"] / n, 6),
                "reward_accuracy": round(totals["correct"] / n, 4),
                "reward_margin": round(totals["margin"] / n, 6),
                "chosen_reward": round(totals["chosen"] / n, 6),
                "rejected_reward": round(totals["rejected"] / n, 6)}


def _sequences(batch: Batch) -> int:
    if batch.cu_seqlens is not None:
        return len(batch.cu_seqlens) - 1
    return batch.labels.shape[0]
