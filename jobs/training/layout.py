"""File layout of adapters and checkpoints, shared with the platform (pure Python, no torch)."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
# What a finished job stores and a download holds: the adapter and the settings it was trained with.
ADAPTER_ARTIFACT_FILES = (*ADAPTER_FILES, "training_config.json")
# A resumable checkpoint (written by jobs.training.checkpoint.save_checkpoint).
CHECKPOINT_FILES = (*ADAPTER_FILES, "optimizer.safetensors", "rng.safetensors", "trainer_state.json")


def latest_checkpoint(checkpoints_dir: Path) -> Path | None:
    """The newest complete checkpoint (directories appear only when complete)."""
    steps = [p for p in checkpoints_dir.glob("step-*") if (p / "trainer_state.json").exists()]
    return max(steps, key=lambda p: int(p.name.split("-")[1]), default=None)


def sha256_of(directory: Path) -> str:
    """One digest over the adapter files, in a fixed order."""
    digest = hashlib.sha256()
    for name in ADAPTER_FILES:
        digest.update(name.encode())
        with (directory / name).open("rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


@contextmanager
def staged_directory(final: Path) -> Iterator[Path]:
    """Write into a temporary sibling of ``final``; rename it into place only on success.

    A directory that exists at ``final`` is therefore always complete.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        yield staging
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
