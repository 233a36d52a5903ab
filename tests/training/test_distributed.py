"""Data-parallel training on CPU: torchrun with two gloo processes against one process.

The same global batch must give the same losses whatever the world size (the ranks split each
step's examples and sum their gradients); a checkpoint written by two processes that are then
killed resumes in one process at the step it recorded, with the losses of the run that was never
interrupted. Each run is the real entry point (`python -m jobs.training.run`, under torchrun for
two processes), read through its protocol (jobs.training.protocol) as the GPU worker reads it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from jobs.training import protocol
from jobs.training.distributed import World, shard
from tests.fixtures.datasets import pirate_lines

REPO = Path(__file__).resolve().parents[2]
STEPS = 4  # 32 examples, 8 a step (micro-batch 4 x accumulation 2)


def _command(processes: int, config: Path) -> list[str]:
    if processes == 1:
        return [sys.executable, "-m", "jobs.training.run", str(config)]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={processes}", "-m", "jobs.training.run", str(config)]


def _start(processes: int, make_config, tmp_path: Path, name: str, **overrides) -> subprocess.Popen:
    config = make_config(**{"output_dir": str(tmp_path / name), "batch_size": 4,
                            "gradient_accumulation_steps": 2, "lora_dropout": 0.0,
                            "max_steps": STEPS, "checkpoint_every_steps": 2, **overrides})
    path = tmp_path / f"{name}.json"
    path.write_text(config.to_json())
    environ = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return subprocess.Popen(_command(processes, path), cwd=REPO, env=environ, text=True,
                            stdout=subprocess.PIPE, stderr=(tmp_path / f"{name}.log").open("w"),
                            start_new_session=True)


def _messages(process: subprocess.Popen, *, until=None):
    """The protocol's messages, until the process ends or ``until(message)`` is true."""
    messages: list[protocol.Message] = []
    for line in process.stdout:
        message = protocol.parse(line)
        assert message is not None, line  # stdout carries only the protocol
        messages.append(message)
        if until is not None and until(message):
            break
    return messages


def _run(processes: int, make_config, tmp_path: Path, name: str, **overrides
         ) -> list[protocol.Message]:
    process = _start(processes, make_config, tmp_path, name, **overrides)
    try:
        messages = _messages(process)
        assert process.wait(timeout=600) == 0, (tmp_path / f"{name}.log").read_text()[-3000:]
    finally:
        _kill(process)
    return messages


def _kill(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def _killed_at_first_checkpoint(make_config, tmp_path: Path, name: str, **overrides
                                ) -> protocol.Checkpoint:
    """Two processes killed (SIGKILL, the whole torchrun group) once their step-2 checkpoint is
    recorded: that checkpoint's message."""
    killed = _start(2, make_config, tmp_path, name, **overrides)
    try:
        seen = _messages(killed, until=lambda m: isinstance(m, protocol.Checkpoint))
    finally:
        _kill(killed)
    checkpoint = next(m for m in seen if isinstance(m, protocol.Checkpoint))
    assert checkpoint.step == 2 and killed.returncode == -signal.SIGKILL
    return checkpoint


def _losses(messages: list[protocol.Message]) -> dict[int, float]:
    return {m.data["step"]: m.data["train_loss"] for m in messages
            if isinstance(m, protocol.Metrics)}


def test_each_rank_gets_a_balanced_share_and_together_they_get_every_example():
    indices, lengths = [10, 11, 12, 13, 14, 15], [50, 10, 40, 20, 30, 60]
    shares = [shard(indices, lengths, World(rank=r, size=2)) for r in range(2)]
    assert sorted(shares[0] + shares[1]) == indices
    loads = [sum(lengths[indices.index(i)] for i in share) for share in shares]
    assert abs(loads[0] - loads[1]) <= 10
    assert all(share == sorted(share, key=indices.index) for share in shares)  # step order kept
    # More ranks than examples: the extra rank gets none and still takes part in the step.
    assert shard([7], [5], World(rank=1, size=2)) == []


def test_two_gloo_processes_match_one_and_resume_in_one_after_a_kill(make_config, tmp_path):
    one = _run(1, make_config, tmp_path, "one")
    two = _run(2, make_config, tmp_path, "two")
    expected = _losses(one)
    assert sorted(expected) == list(range(1, STEPS + 1))
    assert _losses(two) == pytest.approx(expected, rel=1e-4, abs=1e-5)
    started = next(m for m in two if isinstance(m, protocol.Event) and "processes" in m.message)
    assert "x 2 processes (data-parallel)" in started.message
    assert sum(1 for m in two if isinstance(m, protocol.Result)) == 1  # rank 0 alone speaks

    # Two processes again, killed once step 2's checkpoint is recorded; then one process
    # resumes from it.
    checkpoint = _killed_at_first_checkpoint(make_config, tmp_path, "killed")
    resumed = _run(1, make_config, tmp_path, "resumed", resume_from=checkpoint.path)
    assert sorted(_losses(resumed)) == [3, 4]
    assert _losses(resumed) == pytest.approx({s: expected[s] for s in (3, 4)}, rel=1e-4, abs=1e-5)
    assert any("Resumed from checkpoint at step 2" in m.message for m in resumed
               if isinstance(m, protocol.Event))


def test_fsdp_sharded_processes_match_one_and_a_sharded_checkpoint_resumes_in_one(make_config,
                                                                                  tmp_path):
    """The same, with the model sharded across the two processes (FSDP2, ``sharding: fsdp``):
    same losses and evaluation as one unsharded process (9 held-out examples: one rank evaluates
    two batches, the other one, so it runs an extra pass that counts nothing), the same adapter,
    gathered whole by rank 0; a sharded checkpoint resumes unsharded in one process."""
    validation = tmp_path / "validation.jsonl"
    validation.write_text("\n".join(pirate_lines(9)) + "\n")
    options = {"validation_file": str(validation), "eval_every_steps": 2}
    one = _run(1, make_config, tmp_path, "one", **options)
    two = _run(2, make_config, tmp_path, "sharded", sharding="fsdp", **options)
    expected = _losses(one)
    assert sorted(expected) == list(range(1, STEPS + 1))
    assert _losses(two) == pytest.approx(expected, rel=1e-4, abs=1e-5)
    assert _evals(two) == pytest.approx(_evals(one), rel=1e-4, abs=1e-5)
    assert sorted(_evals(one)) == [2, 4]
    started = next(m for m in two if isinstance(m, protocol.Event) and "processes" in m.message)
    assert "x 2 processes (sharded, FSDP2)" in started.message
    adapters = [load_file(tmp_path / name / "adapter" / "adapter_model.safetensors")
                for name in ("one", "sharded")]
    assert sorted(adapters[0]) == sorted(adapters[1]) and adapters[0]
    for key, tensor in adapters[0].items():
        assert adapters[1][key].shape == tensor.shape
        torch.testing.assert_close(adapters[1][key], tensor, rtol=1e-3, atol=1e-5)

    checkpoint = _killed_at_first_checkpoint(make_config, tmp_path, "sharded-killed",
                                             sharding="fsdp", **options)
    resumed = _run(1, make_config, tmp_path, "sharded-resumed", resume_from=checkpoint.path,
                   **options)
    assert _losses(resumed) == pytest.approx({s: expected[s] for s in (3, 4)}, rel=1e-4, abs=1e-5)

    # Continued training from the finished adapter, sharded and not: the same losses, so each
    # rank loaded its own rows of the adapter.
    adapter = str(tmp_path / "one" / "adapter")
    continued = [_losses(_run(n, make_config, tmp_path, f"continued-{n}", init_adapter_dir=adapter,
                              max_steps=2, **({"sharding": "fsdp"} if n == 2 else {})))
                 for n in (1, 2)]
    assert sorted(continued[0]) == [1, 2]
    assert continued[1] == pytest.approx(continued[0], rel=1e-4, abs=1e-5)
    assert continued[0][1] < expected[1] - 0.1  # it starts from the trained adapter


def _evals(messages: list[protocol.Message]) -> dict[int, float]:
    return {m.data["step"]: m.data["eval_loss"] for m in messages
            if isinstance(m, protocol.Metrics) and "eval_loss" in m.data}


def test_a_sharded_load_names_a_weight_the_files_lack(tmp_path):
    from safetensors.torch import save_file

    from jobs.training.sharding import _read_weights

    save_file({"model.norm.weight": torch.ones(4)}, tmp_path / "model.safetensors")

    def params():
        return {name: torch.nn.Parameter(torch.zeros(4), requires_grad=False)
                for name in ("model.norm.weight", "lm_head.weight")}

    with pytest.raises(ValueError, match="lack \\['lm_head.weight'\\]"):
        _read_weights(params(), tmp_path, World(), tied=False)
    loaded = params()
    _read_weights(loaded, tmp_path, World(), tied=True)  # a tied head is the embedding's copy
    assert torch.equal(loaded["model.norm.weight"], torch.ones(4))
