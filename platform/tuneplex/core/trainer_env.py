"""The one way the platform runs a module of the trainer environment (jobs.training.*).

The trainer is a plain library in its own virtual environment (TUNEPLEX_TRAINER_PYTHON); the
platform starts its modules as child processes from the repository root, with a small, explicit
environment: no Django settings, secrets or database URLs leak into it, and it never touches a
model hub.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from django.conf import settings

PASSED_THROUGH = ("CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS", "LD_LIBRARY_PATH")


def trainer_command(module: str, *args: str, processes: int = 1) -> list[str]:
    """``python -m module args``; with several processes, under torchrun on this node (one
    process per visible GPU, ranks 0..processes-1; see jobs.training.distributed)."""
    if processes > 1:
        return [str(settings.TRAINER_PYTHON), "-m", "torch.distributed.run", "--standalone",
                f"--nproc-per-node={processes}", "-m", module, *args]
    return [str(settings.TRAINER_PYTHON), "-m", module, *args]


def trainer_environment(*, home: Path | None = None,
                        devices: list[str] | None = None) -> dict[str, str]:
    """The child's whole environment; ``devices``: the GPUs it may use (CUDA_VISIBLE_DEVICES)."""
    environ = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HF_HUB_OFFLINE": "1",
               "PYTHONUNBUFFERED": "1"}
    if home is not None:
        environ["HOME"] = str(home)
    for name in PASSED_THROUGH:
        if name in os.environ:
            environ[name] = os.environ[name]
    if devices is not None:
        environ["CUDA_VISIBLE_DEVICES"] = ",".join(devices)
    return environ


def run_trainer_module(module: str, *args: str, timeout: float,
                       home: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run to completion, capturing stdout and stderr as text."""
    return subprocess.run(trainer_command(module, *args), cwd=settings.REPO_DIR,
                          capture_output=True, text=True, timeout=timeout,
                          env=trainer_environment(home=home))


def last_error_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = result.stderr.strip().splitlines()
    return lines[-1] if lines else f"exit status {result.returncode}"
