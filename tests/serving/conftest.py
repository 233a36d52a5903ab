"""A real vLLM CPU server for the serving tests: started once, stopped at the end, even on failure."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
from django.conf import settings

from serving.engine import EngineProcess, EngineSpec

REPO = Path(__file__).resolve().parents[2]
MODEL = "SmolLM2-135M-Instruct"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def model_dir() -> Path:
    path = settings.MODELS_DIR / MODEL
    if not (path / "config.json").exists():
        subprocess.run([str(settings.TRAINER_PYTHON), "-m", "jobs.training.gguf_convert",
                        "--out", str(path)], cwd=REPO, check=True, capture_output=True)
    return path


@pytest.fixture(scope="session")
def engine_spec(model_dir) -> EngineSpec:
    return EngineSpec(python=settings.ENGINE_PYTHON, model_dir=str(model_dir), served_name=MODEL,
                      port=free_port(), max_loras=2, max_cpu_loras=4, max_lora_rank=16,
                      max_model_len=1024)


@pytest.fixture(scope="session")
def engine(engine_spec, tmp_path_factory):
    process = EngineProcess(engine_spec, tmp_path_factory.mktemp("engine") / "vllm.log")
    process.start()
    try:
        process.wait_ready(timeout=300)
        yield process
    finally:
        process.stop()


@pytest.fixture(scope="session")
def adapters(model_dir, tmp_path_factory) -> dict[str, Path]:
    """Five working adapters and one with a truncated weights file."""
    out = tmp_path_factory.mktemp("adapters")
    subprocess.run([str(settings.TRAINER_PYTHON), str(REPO / "tests/fixtures/make_adapters.py"),
                    str(model_dir), str(out), "5"], cwd=REPO, check=True, capture_output=True,
                   env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)})
    found = {p.name: p for p in sorted(out.iterdir())}
    corrupt = out / "corrupt"
    shutil.copytree(found["adapter-0"], corrupt)
    weights = corrupt / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 3])
    found["corrupt"] = corrupt
    return found
