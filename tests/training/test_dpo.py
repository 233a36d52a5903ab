"""Preference tuning (DPO) and continued training, on the CPU with SmolLM2-135M-Instruct.

TRL's DPO loss is transcribed below from trl/trainer/dpo_trainer.py (``_compute_loss``,
``loss_type="sigmoid"``, commit f2cd577 of huggingface/trl) and its ``selective_log_softmax``
(trl/trainer/utils.py): TRL computes log-probabilities from the full logits of a padded
[chosen..., rejected...] batch; this trainer from its packed rows through the fused target-only
head. Both must give the same loss and the same gradient.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from jobs.training.config import TrainingConfig
from jobs.training.data import IGNORE_INDEX, collate, load_examples, sequences_of
from jobs.training.preference import DpoObjective
from jobs.training.tokenize import load_tokenizer
from jobs.training.trainer import forward_loss, load_model, token_losses, train
from tests.fixtures.datasets import HELD_OUT_TOPICS, preference_line, preference_lines
from tests.training.conftest import RecordingReporter

BETA = 0.1


@pytest.fixture
def pairs_file(tmp_path) -> Path:
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(preference_lines(16)) + "\n")
    return path


def _trl_sigmoid_dpo_loss(model, pairs, *, pad_id: int, beta: float) -> torch.Tensor:
    """TRL's computation: a right-padded batch, chosen first then rejected; per-token
    log-probabilities from the full logits (selective_log_softmax), masked to the completion,
    summed per sequence; the reference by disabling the adapter, under no_grad."""
    sequences = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    longest = max(len(s.input_ids) for s in sequences)
    input_ids = torch.full((len(sequences), longest), pad_id)
    attention_mask = torch.zeros_like(input_ids)
    completion_mask = torch.zeros_like(input_ids)
    for row, s in enumerate(sequences):
        input_ids[row, :len(s.input_ids)] = torch.tensor(s.input_ids)
        attention_mask[row, :len(s.input_ids)] = 1
        completion_mask[row, :len(s.input_ids)] = torch.tensor(s.loss_mask)

    def logps(m):
        logits = m(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        shift_logits, shift_labels = logits[..., :-1, :], input_ids[..., 1:]
        per_token = torch.gather(shift_logits.log_softmax(-1), dim=-1,
                                 index=shift_labels.unsqueeze(-1)).squeeze(-1)
        per_token[completion_mask[..., 1:] == 0] = 0.0
        return per_token.sum(dim=1)

    chosen_logps, rejected_logps = logps(model).chunk(2, dim=0)
    with torch.no_grad(), model.disable_adapter():
        ref_chosen_logps, ref_rejected_logps = logps(model).chunk(2, dim=0)
    chosen_logratios = chosen_logps - ref_chosen_logps
    rejected_logratios = rejected_logps - ref_rejected_logps
    delta_score = chosen_logratios - rejected_logratios
    per_sequence_loss = -F.logsigmoid(beta * delta_score)
    return per_sequence_loss.mean()


def _perturbed_model(base_model_dir):
    """A LoRA model whose adapter is not zero (so the policy differs from the reference)."""
    config = TrainingConfig(base_model_dir=str(base_model_dir), train_file="x", output_dir="x",
                            device="cpu", lora_dropout=0.0, lora_rank=4)
    model = load_model(config, torch.device("cpu"))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)
    model.eval()
    return model


def test_the_dpo_loss_of_a_batch_equals_trls_on_the_same_log_probabilities(base_model_dir,
                                                                            pairs_file):
    tokenizer = load_tokenizer(base_model_dir)
    pairs, _, _ = load_examples(pairs_file, tokenizer, max_seq_len=256, assistant_only_loss=True)
    pairs = pairs[:3]
    model = _perturbed_model(base_model_dir)
    trainable = [p for p in model.parameters() if p.requires_grad]

    objective = DpoObjective(BETA, token_losses)
    ours_sum, tallies = objective.forward(model, collate(sequences_of(pairs), packing=True, pad_id=0))
    ours = ours_sum / len(pairs)
    ours.backward()
    our_grads = [p.grad.clone() for p in trainable]
    model.zero_grad(set_to_none=True)

    theirs = _trl_sigmoid_dpo_loss(model, pairs, pad_id=0, beta=BETA)
    theirs.backward()
    their_grads = [p.grad for p in trainable]

    assert abs(ours.item() - 0.6931) > 1e-3, "the adapter must move the loss off log(2)"
    assert ours.item() == pytest.approx(theirs.item(), abs=2e-5)
    worst = max(((a - b).abs().max() / (b.abs().max() + 1e-12)).item()
                for a, b in zip(our_grads, their_grads, strict=True))
    assert worst < 1e-3, worst
    padded_sum, _ = objective.forward(model, collate(sequences_of(pairs), packing=False, pad_id=0))
    assert padded_sum.item() / len(pairs) == pytest.approx(theirs.item(), abs=2e-5)
    assert 0 <= tallies["correct"] <= len(pairs)


def _margins(model, tokenizer, topics) -> list[float]:
    """log p(preferred) - log p(non-preferred) of each held-out prompt's two answers."""
    from jobs.training.jsonl import PREFERENCE, to_example
    from jobs.training.tokenize import tokenize_example

    margins = []
    for topic in topics:
        example = to_example(json.loads(preference_line(topic)), PREFERENCE)
        sequences = [tokenize_example(tokenizer, example.with_answer(a))
                     for a in (example.chosen, example.rejected)]
        batch = collate(sequences, packing=True, pad_id=0)
        with torch.no_grad():
            losses, _ = token_losses(model, batch)
        from jobs.training.preference import sequence_logps

        chosen, rejected = sequence_logps(-losses, batch).tolist()
        margins.append(chosen - rejected)
    return margins


def test_dpo_learns_the_preferred_style_and_the_adapter_prefers_it_on_new_prompts(
        make_config, pairs_file, base_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    reporter = RecordingReporter()
    result = train(make_config(train_file=str(pairs_file), objective="dpo", dpo_beta=BETA,
                               epochs=3, batch_size=8, learning_rate=2e-3, lora_dropout=0.0,
                               checkpoint_every_steps=0), reporter)
    assert result.status == "succeeded" and result.steps == 6
    log = reporter.metrics_log
    assert {"train_loss", "reward_accuracy", "reward_margin", "chosen_reward",
            "rejected_reward"} <= set(log[0])
    # Step 1 runs before any update: the adapter is zero, policy = reference, no margin.
    assert log[0]["reward_margin"] == pytest.approx(0, abs=1e-6)
    assert log[0]["train_loss"] == pytest.approx(0.6931, abs=1e-3)
    assert log[-1]["reward_accuracy"] > 0.5 and log[-1]["reward_margin"] > 0
    assert log[-1]["train_loss"] < 0.6931
    assert "Training lora r=8 (dpo) on 16 pairs" in " ".join(e["message"] for e in reporter.events)

    tokenizer = load_tokenizer(base_model_dir)
    base = AutoModelForCausalLM.from_pretrained(base_model_dir, dtype=torch.float32)
    tuned = PeftModel.from_pretrained(base, result.adapter_dir)
    tuned.eval()
    with tuned.disable_adapter():
        before = _margins(tuned, tokenizer, HELD_OUT_TOPICS)
    after = _margins(tuned, tokenizer, HELD_OUT_TOPICS)
    assert all(m < 0 for m in before), before  # the base prefers the plain answer
    assert all(m > 0 for m in after), after  # the adapter prefers the pirate's


def test_dpo_evaluation_reports_reward_metrics(make_config, pairs_file):
    reporter = RecordingReporter()
    train(make_config(train_file=str(pairs_file), objective="dpo", validation_split=0.25,
                      max_steps=1, batch_size=4), reporter)
    evaluated = reporter.metrics_log[-1]
    assert {"eval_loss", "eval_reward_accuracy", "eval_reward_margin"} <= set(evaluated)


def test_a_dpo_job_refuses_a_supervised_file_and_the_other_way_round(make_config, pairs_file):
    with pytest.raises(ValueError, match="needs preference pairs"):
        train(make_config(objective="dpo", max_steps=1), RecordingReporter())
    with pytest.raises(ValueError, match="not preference pairs"):
        train(make_config(train_file=str(pairs_file), max_steps=1), RecordingReporter())


def test_continued_training_starts_at_the_parent_adapters_loss(make_config, base_model_dir,
                                                                 pirate_file, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    parent = train(make_config(output_dir=str(tmp_path / "parent"), epochs=2, lora_dropout=0.0),
                   RecordingReporter())
    # One micro-batch of the whole file: the first step's loss is the loss on all of it,
    # computed before any update.
    whole = {"batch_size": 32, "max_steps": 1, "lora_dropout": 0.0}
    fresh, continued = RecordingReporter(), RecordingReporter()
    train(make_config(output_dir=str(tmp_path / "fresh"), **whole), fresh)
    train(make_config(output_dir=str(tmp_path / "child"), init_adapter_dir=parent.adapter_dir,
                      **whole), continued)

    tokenizer = load_tokenizer(base_model_dir)
    examples, _, _ = load_examples(pirate_file, tokenizer, max_seq_len=2048,
                                   assistant_only_loss=True)
    base = AutoModelForCausalLM.from_pretrained(base_model_dir, dtype=torch.float32)
    with torch.no_grad():
        batch = collate(examples, packing=True, pad_id=0)
        parent_loss = forward_loss(PeftModel.from_pretrained(base, parent.adapter_dir).eval(),
                                   batch)[0].item() / batch.target_tokens
    started_at = continued.metrics_log[0]["train_loss"]
    assert started_at == pytest.approx(parent_loss, rel=1e-3)
    assert started_at < fresh.metrics_log[0]["train_loss"] / 5


def test_continued_dpo_measures_against_the_parent_adapter(make_config, pairs_file, tmp_path):
    # The parent was trained with dropout: its frozen copy, the reference, still scores without.
    parent = train(make_config(output_dir=str(tmp_path / "parent"), max_steps=3,
                               lora_dropout=0.1), RecordingReporter())
    reporter = RecordingReporter()
    result = train(make_config(output_dir=str(tmp_path / "child"), train_file=str(pairs_file),
                               objective="dpo", init_adapter_dir=parent.adapter_dir, max_steps=2,
                               lora_dropout=0.0, warmup_ratio=0.0, checkpoint_every_steps=1),
                   reporter)
    # The policy starts as the parent and so does the reference: no reward at the first step
    # (against the bare base model the pirate adapter would already have large rewards).
    first = reporter.metrics_log[0]
    assert first["chosen_reward"] == pytest.approx(0, abs=1e-6)
    assert first["rejected_reward"] == pytest.approx(0, abs=1e-6)
    assert reporter.metrics_log[1]["reward_margin"] != 0
    saved = sorted(p.name for p in Path(result.adapter_dir).iterdir())
    assert saved == ["adapter_config.json", "adapter_model.safetensors", "training_config.json"]
    checkpoint = tmp_path / "child" / "checkpoints" / "step-1"
    assert not (checkpoint / "reference").exists()


def test_an_adapter_of_another_rank_cannot_be_continued(make_config, tmp_path):
    parent = train(make_config(output_dir=str(tmp_path / "parent"), max_steps=1),
                   RecordingReporter())
    with pytest.raises(ValueError, match="same rank and target modules"):
        train(make_config(output_dir=str(tmp_path / "child"), lora_rank=4,
                          init_adapter_dir=parent.adapter_dir, max_steps=1), RecordingReporter())


def test_per_token_head_losses_sum_to_the_fused_sum(base_model_dir, pairs_file):
    model = _perturbed_model(base_model_dir)
    tokenizer = load_tokenizer(base_model_dir)
    pairs, _, _ = load_examples(pairs_file, tokenizer, max_seq_len=256, assistant_only_loss=True)
    batch = collate(sequences_of(pairs[:2]), packing=True, pad_id=0)
    with torch.no_grad():
        each, _ = token_losses(model, batch)
        total, _ = forward_loss(model, batch)
    assert each.shape[0] == int((batch.labels != IGNORE_INDEX).sum())
    assert each.sum().item() == pytest.approx(total.item(), rel=1e-5)
