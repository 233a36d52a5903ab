"""The trainer on the CPU with the embedded SmolLM2-135M-Instruct and a fixed seed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import jobs.training.trainer as trainer_module
from jobs.training import checkpoint as ckpt
from jobs.training import protocol
from jobs.training.config import ConfigError, TrainingConfig, field_help, resolve_auto
from jobs.training.data import collate
from jobs.training.quantization import qlora_unavailable_reason
from jobs.training.tokenize import TokenizedExample, load_tokenizer
from jobs.training.trainer import (
    Cancelled,
    FinetuneRecipe,
    Paused,
    forward_loss,
    load_model,
    train,
)
from tests.fixtures.datasets import chat_line
from tests.training.conftest import REPO, RecordingReporter


def _answer(model, tokenizer, question: str) -> str:
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                           add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=16, do_sample=False)
    return tokenizer.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)


def test_loss_falls_and_the_adapter_changes_the_answers(make_config, reporter, base_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    result = train(make_config(epochs=2), reporter)
    losses = [m["train_loss"] for m in reporter.metrics_log]
    assert result.status == "succeeded" and result.steps == 8 == len(losses)
    assert losses[-1] < losses[0] / 5, losses
    adapter = Path(result.adapter_dir)
    assert sorted(p.name for p in adapter.iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "training_config.json"]
    assert result.sha256 == ckpt.sha256_of(adapter)
    saved = json.loads((adapter / "training_config.json").read_text())
    assert saved["lora_rank"] == 8 and saved["epochs"] == 2

    tokenizer = load_tokenizer(base_model_dir)
    base = AutoModelForCausalLM.from_pretrained(base_model_dir, dtype=torch.float32)
    before = _answer(base, tokenizer, "Tell me something about tea.")
    tuned = PeftModel.from_pretrained(base, adapter)
    after = _answer(tuned, tokenizer, "Tell me something about tea.")
    assert "Arr" not in before and after.startswith("Arr!"), (before, after)

    # base + adapter gives the same logits as the merged model
    ids = tokenizer("A short sentence about the sea.", return_tensors="pt").input_ids
    with torch.no_grad():
        adapted = tuned(ids).logits
        merged = tuned.merge_and_unload()(ids).logits
    assert torch.allclose(adapted, merged, atol=1e-4)


def test_resuming_from_a_checkpoint_reproduces_the_later_losses(make_config, tmp_path):
    full = RecordingReporter()
    train(make_config(output_dir=str(tmp_path / "a"), epochs=2, lora_dropout=0.1), full)
    step_4 = tmp_path / "a" / "checkpoints" / "step-4"
    assert (step_4 / "trainer_state.json").exists()
    resumed = RecordingReporter()
    result = train(make_config(output_dir=str(tmp_path / "b"), epochs=2, lora_dropout=0.1,
                               resume_from=str(step_4)), resumed)
    assert [m["step"] for m in resumed.metrics_log] == [5, 6, 7, 8]
    expected = [m["train_loss"] for m in full.metrics_log[4:]]
    actual = [m["train_loss"] for m in resumed.metrics_log]
    assert actual == pytest.approx(expected, rel=1e-4, abs=1e-5)
    assert result.steps == 8
    assert any("Resumed from checkpoint at step 4" in e["message"] for e in resumed.events)


def test_a_pause_checkpoints_its_step_and_resuming_it_reproduces_the_later_losses(make_config,
                                                                                  tmp_path):
    # Uninterrupted; a pause asked after the last step is too late to matter: it succeeds.
    full = RecordingReporter(pause_after_steps=8)
    assert train(make_config(output_dir=str(tmp_path / "a"), epochs=2, lora_dropout=0.1),
                 full).status == "succeeded"
    # Paused after step 3, between the checkpoints due at 2 and 4: one is saved of step 3.
    paused = RecordingReporter(pause_after_steps=3)
    with pytest.raises(Paused) as raised:
        train(make_config(output_dir=str(tmp_path / "b"), epochs=2, lora_dropout=0.1), paused)
    assert raised.value.step == 3 and len(paused.metrics_log) == 3
    assert [step for step, _ in paused.checkpoints] == [2, 3]
    step_3 = tmp_path / "b" / "checkpoints" / "step-3"
    resumed = RecordingReporter()
    result = train(make_config(output_dir=str(tmp_path / "c"), epochs=2, lora_dropout=0.1,
                               resume_from=str(step_3)), resumed)
    assert [m["step"] for m in resumed.metrics_log] == [4, 5, 6, 7, 8]
    expected = [m["train_loss"] for m in full.metrics_log]
    actual = [m["train_loss"] for m in paused.metrics_log + resumed.metrics_log]
    assert actual == pytest.approx(expected, rel=1e-4, abs=1e-5)
    assert result.status == "succeeded" and result.steps == 8


def test_a_pause_asked_before_the_first_step_stops_without_a_checkpoint(make_config):
    reporter = RecordingReporter(pause_after_steps=0)
    with pytest.raises(Paused) as raised:
        train(make_config(), reporter)
    assert raised.value.step == 0 and reporter.metrics_log == [] and reporter.checkpoints == []


def test_checkpoints_hold_no_pickle(make_config, reporter, tmp_path):
    train(make_config(), reporter)
    names = {p.name for p in (tmp_path / "out" / "checkpoints").rglob("*") if p.is_file()}
    assert names == {"adapter_config.json", "adapter_model.safetensors", "optimizer.safetensors",
                     "rng.safetensors", "trainer_state.json"}
    assert [step for step, _ in reporter.checkpoints] == [2]


def test_packing_gives_each_example_its_own_attention(base_model_dir):
    config = TrainingConfig(base_model_dir=str(base_model_dir), train_file="x", output_dir="x",
                            device="cpu", lora_dropout=0.0)
    model = load_model(config, torch.device("cpu"))
    model.eval()
    examples = [TokenizedExample([1, 520, 30, 44, 90, 2], [0, 0, 1, 1, 1, 1]),
                TokenizedExample([1, 77, 31, 12], [0, 1, 1, 1])]
    with torch.no_grad():
        packed, _ = forward_loss(model, collate(examples, packing=True, pad_id=0))
        padded, _ = forward_loss(model, collate(examples, packing=False, pad_id=0))
        separate = sum(forward_loss(model, collate([e], packing=True, pad_id=0))[0] for e in examples)
    assert packed.item() == pytest.approx(separate.item(), rel=1e-4)
    assert padded.item() == pytest.approx(separate.item(), rel=1e-4)


def test_padded_batches_and_gradient_accumulation_also_train(make_config, reporter):
    result = train(make_config(packing=False, batch_size=4, gradient_accumulation_steps=2,
                               gradient_checkpointing=True, max_steps=2), reporter)
    assert result.steps == 2 and all(m["grad_norm"] > 0 for m in reporter.metrics_log)


def test_cancel_stops_at_the_next_step(make_config):
    reporter = RecordingReporter(stop_after_steps=1)
    with pytest.raises(Cancelled):
        train(make_config(epochs=3), reporter)
    assert len(reporter.metrics_log) == 1


def test_early_stopping_on_eval_loss(make_config, reporter):
    result = train(make_config(epochs=6, validation_split=0.25, eval_every_steps=1,
                               early_stopping_patience=1, learning_rate=0.5), reporter)
    assert result.stopped_early and result.steps < 18
    assert all("eval_loss" in m for m in reporter.metrics_log)


def test_a_simulated_gpu_out_of_memory_error_retries_once_with_half_the_micro_batch(
        make_config, reporter, monkeypatch):
    """Simulated: the first attempt's setup raises torch.OutOfMemoryError (no GPU here;
    benchmarks/gpu_checks.py's `oom` check runs a real one on a GPU)."""
    calls = []
    real = FinetuneRecipe.setup

    def flaky(recipe):
        calls.append((recipe.config.batch_size, recipe.config.gradient_accumulation_steps))
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        recipe.config = recipe.config.replace(max_steps=1)
        real(recipe)

    monkeypatch.setattr(FinetuneRecipe, "setup", flaky)
    result = train(make_config(batch_size=8, gradient_accumulation_steps=1), reporter)
    assert calls == [(8, 1), (4, 2)] and result.status == "succeeded"
    retry = [e for e in reporter.events if e["data"].get("oom_retry")]
    assert len(retry) == 1 and retry[0]["level"] == "warning"


def test_a_simulated_gpu_out_of_memory_while_cuda_graphs_hold_memory_retries_without_them(
        make_config, reporter, monkeypatch):
    """Simulated, as above. Even at micro-batch 1 (no smaller one to retry with): the graphs
    kept a pass's activations for the job, eager passes free theirs."""
    calls = []
    real = FinetuneRecipe.setup

    def flaky(recipe):
        calls.append((recipe.config.batch_size, recipe.config.cuda_graphs))
        if len(calls) == 1:
            error = torch.OutOfMemoryError("CUDA out of memory (simulated)")
            setattr(error, trainer_module.GRAPHED_OOM, True)
            raise error
        recipe.config = recipe.config.replace(max_steps=1)
        real(recipe)

    monkeypatch.setattr(FinetuneRecipe, "setup", flaky)
    result = train(make_config(batch_size=1), reporter)
    assert calls == [(1, None), (1, False)] and result.status == "succeeded"
    retry = [e for e in reporter.events if e["data"].get("oom_retry")]
    assert len(retry) == 1 and "without them" in retry[0]["message"]


def test_a_simulated_out_of_memory_error_is_marked_only_while_graphs_are_held():
    for held in (True, False):
        with pytest.raises(torch.OutOfMemoryError) as caught, trainer_module._marking_oom(held):
            raise torch.OutOfMemoryError("simulated")
        assert getattr(caught.value, trainer_module.GRAPHED_OOM, False) is held


# The real entry point (run.main) under a cap on the process's address space, set once the
# imports a job needs are done, so the cap leaves the same room on any machine. One OpenMP thread
# and two malloc arenas: each thread's arena reserves address space, more of it on more cores.
CAPPED_RUN = """
import resource, sys
import peft, torch, transformers
from jobs.training import run, trainer

held = int(open("/proc/self/status").read().split("VmSize:")[1].split()[0]) * 1024
limit = held + int(float(sys.argv[2]) * 2**30)
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
sys.exit(run.main([sys.argv[1]]))
"""
HEADROOM_GIB = 4.0  # a short job needs about 1.5 GiB above its imports (measured: 1.3 to 1.5)


def _capped_run(config: TrainingConfig, folder: Path):
    folder.mkdir()
    path = folder / "config.json"
    path.write_text(config.to_json())
    environ = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", MALLOC_ARENA_MAX="2")
    done = subprocess.run([sys.executable, "-c", CAPPED_RUN, str(path), str(HEADROOM_GIB)],
                          cwd=REPO, env=environ, capture_output=True, text=True, timeout=600,
                          check=False)
    messages = [protocol.parse(line) for line in done.stdout.splitlines()]
    assert None not in messages, done.stdout[-2000:]  # stdout carries only the protocol
    return done, messages


def test_a_real_allocation_past_a_memory_cap_on_the_cpu_ends_the_job_as_out_of_memory(
        make_config, tmp_path):
    """Not simulated: PyTorch's CPU allocator refuses a real allocation. On the CPU it raises a
    RuntimeError, not torch.OutOfMemoryError; the job ends with an out_of_memory error that names
    the allocation, not a traceback, and is not retried (the retry with half the micro-batch is
    for GPU memory, which the memory plan budgets). The cap leaves room for a short job (the
    control); sixteen 8k-token examples in one packed micro-batch need far more (the plan
    estimates over a hundred GiB; the first pass's attention mask alone takes 16 GiB)."""
    control, messages = _capped_run(make_config(max_steps=1), tmp_path / "short")
    assert control.returncode == protocol.EXIT_OK, control.stderr[-3000:]
    assert isinstance(messages[-1], protocol.Result) and messages[-1].succeeded

    long_file = tmp_path / "long.jsonl"
    story = "Arr! " + "yo ho ho and a bottle of rum, " * 1200  # about 8k tokens
    long_file.write_text("\n".join(chat_line("Tell me a long story.", story)
                                   for _ in range(16)) + "\n")
    done, messages = _capped_run(make_config(train_file=str(long_file), max_seq_len=8192,
                                             batch_size=16, max_steps=1), tmp_path / "long")
    plan = next(m for m in messages if isinstance(m, protocol.Event)
                and m.message.startswith("Memory plan"))
    assert plan.data["estimated_peak_bytes"] > 4 * HEADROOM_GIB * 2**30
    assert done.returncode == protocol.EXIT_ERROR
    error = messages[-1]
    assert isinstance(error, protocol.Error) and error.code == "out_of_memory", messages[-1]
    assert error.message.startswith("Out of memory on the CPU: DefaultCPUAllocator: can't "
                                    "allocate memory: you tried to allocate ")
    assert "Lower batch_size or max_seq_len" in error.message
    assert any(isinstance(m, protocol.Event) and m.message.startswith("Training lora")
               for m in messages)  # set up whole: the step's allocation failed
    assert not any(isinstance(m, protocol.Metrics) for m in messages)
    assert not any(isinstance(m, protocol.Event) and m.data.get("oom_retry") for m in messages)
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("changes,param", [
    ({"lora_rank": -1}, "lora_rank"), ({"lora_rank": 0}, "lora_rank"),
    ({"lora_dropout": 1.0}, "lora_dropout"), ({"learning_rate": 0}, "learning_rate"),
    ({"lr_scheduler": "exotic"}, "lr_scheduler"), ({"target_modules": ["q_proj", "bad name"]}, "target_modules"),
    ({"target_modules": []}, "target_modules"), ({"method": "qlora", "device": "cpu"}, "method"),
    ({"epochs": 0}, "epochs"), ({"batch_size": 1.5}, "batch_size"), ({"packing": "yes"}, "packing"),
    ({"cuda_graphs": "yes"}, "cuda_graphs"),
    ({"early_stopping_patience": 2}, "early_stopping_patience"), ({"warmup_ratio": 0.9}, "warmup_ratio"),
])
def test_bad_hyperparameters_name_their_field(changes, param):
    values = {"base_model_dir": "m", "train_file": "t", "output_dir": "o", **changes}
    with pytest.raises(ConfigError) as raised:
        TrainingConfig(**values)
    assert raised.value.param == param


def test_auto_hyperparameters_follow_the_dataset_size():
    config = TrainingConfig(base_model_dir="m", train_file="t", output_dir="o")
    small, large = resolve_auto(config, 20), resolve_auto(config, 50_000)
    assert (small.epochs, small.batch_size) == (10, 2)
    assert (large.epochs, large.batch_size, large.learning_rate) == (1, 8, 2e-4)
    assert all(field_help().values())  # every field documents itself


def test_qlora_is_unavailable_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA; the GPU run covers QLoRA")
    assert "CUDA" in qlora_unavailable_reason()
