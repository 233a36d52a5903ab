"""jobs/training/tensorboard.py: event files that TensorBoard's own reader loads."""

from __future__ import annotations

import math

import pytest

from jobs.training.tensorboard import EventWriter, crc32c

loader = pytest.importorskip("tensorboard.backend.event_processing.event_file_loader")


def read(path) -> list:
    """The events as written (the legacy loader keeps scalars as ``simple_value``)."""
    return list(loader.LegacyEventFileLoader(str(path)).Load())


def test_crc32c_is_castagnolis():
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(b"") == 0


def test_tensorboard_reads_the_curves_back(tmp_path):
    with EventWriter(tmp_path, suffix="a1") as events:
        events.metrics({"step": 1, "total_steps": 2, "train_loss": 2.5, "learning_rate": 1e-4,
                        "grad_norm": 0.75, "tokens_per_second": 181.5, "elapsed_seconds": 3})
        events.metrics({"step": 2, "train_loss": 1.25, "eval_loss": 1.5, "learning_rate": 5e-5,
                        "grad_norm": None, "flag": True})
        events.scalars(3_000_000_000, {"custom/large_step": -1.0})
    assert events.path.name.startswith("events.out.tfevents.") and events.path.name.endswith(".a1")
    loaded = read(events.path)
    assert loaded[0].file_version == "brain.Event:2"
    values = [(e.step, v.tag, v.simple_value) for e in loaded[1:] for v in e.summary.value]
    assert values == [
        (1, "train/loss", 2.5), (1, "train/learning_rate", pytest.approx(1e-4)),
        (1, "train/grad_norm", 0.75), (1, "train/tokens_per_second", 181.5),
        (2, "train/loss", 1.25), (2, "eval/loss", 1.5), (2, "train/learning_rate", pytest.approx(5e-5)),
        (3_000_000_000, "custom/large_step", -1.0)]
    assert all(math.isclose(e.wall_time, loaded[0].wall_time, abs_tol=60) for e in loaded)


def test_the_reader_checks_the_checksums_it_accepted_above(tmp_path):
    with EventWriter(tmp_path) as events:
        events.scalars(1, {"train/loss": 1.0})
        events.scalars(2, {"train/loss": 0.5})
    assert [e.step for e in read(events.path)] == [0, 1, 2]
    raw = bytearray(events.path.read_bytes())
    raw[-6] ^= 0xFF  # inside the last record's payload: its checksum no longer matches
    events.path.write_bytes(bytes(raw))
    assert [e.step for e in read(events.path)] == [0, 1]  # dropped as corrupt
