"""Trainer tests: run in the trainer environment (torch, transformers, peft), never with Django.

deploy/test.sh runs them with `.venv-train/bin/python -m pytest tests/training`.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from jobs.training.config import TrainingConfig
from tests.fixtures.datasets import pirate_lines

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def base_model_dir() -> Path:
    """The embedded SmolLM2-135M-Instruct, converted once per data folder."""
    data_dir = Path(os.environ.get("TUNEPLEX_DATA_DIR", REPO / "var" / "test"))
    target = data_dir / "models" / "SmolLM2-135M-Instruct"
    if not (target / "config.json").exists():
        from jobs.training.gguf_convert import convert, packaged_gguf

        convert(packaged_gguf(), target)
    return target


@pytest.fixture
def pirate_file(tmp_path) -> Path:
    path = tmp_path / "pirate.jsonl"
    path.write_text("\n".join(pirate_lines(32)) + "\n")
    return path


@pytest.fixture
def make_config(base_model_dir, pirate_file, tmp_path):
    def make(**overrides) -> TrainingConfig:
        values = {"base_model_dir": str(base_model_dir), "train_file": str(pirate_file),
                  "output_dir": str(tmp_path / "out"), "lora_rank": 8, "learning_rate": 1e-3,
                  "epochs": 1, "batch_size": 8, "checkpoint_every_steps": 2, "device": "cpu"}
        values.update(overrides)
        return TrainingConfig(**values)
    return make


class RecordingReporter:
    def __init__(self, stop_after_steps: int | None = None,
                 pause_after_steps: int | None = None) -> None:
        self.events: list[dict] = []
        self.metrics_log: list[dict] = []
        self.checkpoints: list[tuple[int, str]] = []
        self.stop_after_steps = stop_after_steps
        self.pause_after_steps = pause_after_steps

    def event(self, message, *, level="info", data=None):
        self.events.append({"message": message, "level": level, "data": data or {}})

    def metrics(self, data):
        self.metrics_log.append(data)

    def checkpoint(self, step, path, metrics):
        self.checkpoints.append((step, path))

    def should_stop(self):
        return self.stop_after_steps is not None and len(self.metrics_log) >= self.stop_after_steps

    def should_pause(self):
        return (self.pause_after_steps is not None
                and len(self.metrics_log) >= self.pause_after_steps)


@pytest.fixture
def reporter() -> RecordingReporter:
    return RecordingReporter()


@pytest.fixture(scope="module")
def smollm(base_model_dir):
    """The embedded model loaded for training on the CPU in fp32, every adapter non-zero."""
    from jobs.training.config import TrainingConfig
    from jobs.training.trainer import load_model

    config = TrainingConfig(base_model_dir=str(base_model_dir), train_file="x", output_dir="x",
                            device="cpu", lora_dropout=0.0, lora_rank=4)
    model = load_model(config, torch.device("cpu"))
    model.train()  # as the trainer does: layers checkpoint only in training mode
    for name, param in model.named_parameters():
        if "lora_B" in name:  # peft starts B at zero; make every adapter matter
            torch.nn.init.normal_(param, std=0.02)
    return model


def _step_gradients(model, examples, *, max_forward_tokens=None):
    """One optimizer step of ``examples`` as one micro-batch (no learning): the mean loss and
    every trainable parameter's gradient."""
    from jobs.training.config import TrainingConfig
    from jobs.training.trainer import FinetuneRecipe

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    config = TrainingConfig(base_model_dir="x", train_file="x", output_dir="x", packing=True,
                            max_grad_norm=0.0, batch_size=len(examples))
    captured = []
    hook = optimizer.register_step_pre_hook(
        lambda *_: captured.extend(p.grad.clone() for p in trainable))
    recipe = FinetuneRecipe.around(model, optimizer, scheduler, examples, config=config,
                                   report=_Quiet(), pad_id=0, device=torch.device("cpu"),
                                   forward_cap=max_forward_tokens)
    metrics = recipe.optimizer_step([list(range(len(examples)))])
    hook.remove()
    return metrics["train_loss"], captured


class _Quiet:
    def should_stop(self):
        return False


@pytest.fixture(scope="session")
def step_gradients():
    return _step_gradients


@pytest.fixture(scope="session")
def lora_adapter(base_model_dir, tmp_path_factory):
    """An adapter with random non-zero weights on every linear projection of the embedded model,
    and peft's merge of it (merge_and_unload in float32, cast to bf16): the merge tests' reference."""
    from transformers import AutoModelForCausalLM

    from tests.training.merging import ALL_LINEAR, make_adapter

    directory = tmp_path_factory.mktemp("adapter")
    model = AutoModelForCausalLM.from_pretrained(base_model_dir, dtype=torch.float32)
    reference = make_adapter(model, directory, r=8, lora_alpha=16, target_modules=ALL_LINEAR)
    return directory, reference


@pytest.fixture(scope="session")
def merged_model(base_model_dir, lora_adapter, tmp_path_factory):
    """The embedded model merged with ``lora_adapter`` by jobs.training.merge, and its summary."""
    from jobs.training.merge import merge

    out = tmp_path_factory.mktemp("merged") / "model"
    return out, merge(base_model_dir, lora_adapter[0], out)
