"""Node-local GPU leases: a job's trainer gets GPUs no other task on the node holds."""

from __future__ import annotations

import pytest
from tuneplex.finetuning import gpus


@pytest.fixture
def three_gpus(settings, tmp_path, monkeypatch):
    settings.DATA_DIR = tmp_path
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2")
    monkeypatch.setattr(gpus, "POLL_SECONDS", 0.01)


def test_leases_are_exclusive_all_or_none_and_end_with_the_block(three_gpus):
    with gpus.lease(2) as first:
        assert first == ["0", "1"]
        waits: list[int] = []
        with pytest.raises(TimeoutError):  # two more do not fit beside them: none is kept
            with gpus.lease(2, give_up=lambda: bool(waits), on_wait=waits.append):
                pass
        assert waits == [1]
        with gpus.lease(1) as second:  # the GPU the refused lease did not keep
            assert second == ["2"]
    with gpus.lease(3) as everything:
        assert everything == ["0", "1", "2"]


def test_a_job_bigger_than_the_worker_is_refused(three_gpus):
    with pytest.raises(gpus.NotEnoughGpus, match="needs 4 GPUs and this worker sees 3"):
        with gpus.lease(4):
            pass
