"""Sweeps: a sweep of the embedded model's template, and a trial's job driven through the
fine-tuning services as a GPU worker would drive it (its files checked, dispatched, claimed,
metrics recorded, succeeded, failed or cancelled), without training anything."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from tuneplex.finetuning import scheduler
from tuneplex.finetuning.models import FineTuningJob
from tuneplex.finetuning.services.lifecycle import job_fail, job_files_validated, job_mark_cancelled
from tuneplex.finetuning.services.worker_writes import job_record_metrics, job_succeed

from serving.engine import stop_process_group
from tests.conftest import bearer
from tests.finetuning.conftest import upload
from tests.fixtures.datasets import lines_to_bytes, pirate_lines

MODEL = "SmolLM2-135M-Instruct"
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def files_of_a(org_a, default_model) -> dict[str, str]:
    return {"training_file": upload(org_a, lines_to_bytes(pirate_lines(16))),
            "validation_file": upload(org_a, lines_to_bytes(pirate_lines(10, seed=1)))}


def sweep_body(files: dict[str, str], **changes) -> dict:
    body = {"model": MODEL, **files, "hyperparameters": {"n_epochs": 1, "eval_every_steps": 1},
            "search_space": {"learning_rate": {"type": "float", "low": 1e-5, "high": 1e-2,
                                               "log": True},
                             "lora_rank": {"type": "categorical", "choices": [4, 8]}},
            "sampler": "random", "max_trials": 4, "seed": 7}
    body.update(changes)
    return body


def create_sweep(tenant, files, **changes):
    return bearer(tenant.owner_key).post("/v1/sweeps", sweep_body(files, **changes), format="json")


class FakeWorker:
    """A trial's job taken through its states by the services a GPU worker calls."""

    def __init__(self, captured, tmp_path: Path) -> None:
        self.captured = captured  # django_capture_on_commit_callbacks: enqueues are not sent
        self.adapter_dir = tmp_path / "adapter"
        self.adapter_dir.mkdir(exist_ok=True)
        (self.adapter_dir / "adapter_config.json").write_text('{"r": 8}')
        (self.adapter_dir / "adapter_model.safetensors").write_bytes(b"x")

    def start(self, job: FineTuningJob) -> FineTuningJob:
        """Files checked, dispatched by the scheduler (within the organization's limit) and
        claimed: running, attempt 1."""
        with self.captured(execute=False):
            job_files_validated(job_id=job.id)
            scheduler.dispatch()
        claimed = scheduler.claim(job_id=job.id, worker="fake-gpu")
        assert claimed is not None, f"{job.id} was not dispatched"
        return claimed

    def evaluate(self, job: FineTuningJob, step: int, loss: float, total: int = 10) -> None:
        job_record_metrics(job=job, attempt=job.attempts, metrics={
            "step": step, "total_steps": total, "train_loss": loss + 0.1, "eval_loss": loss})

    def train(self, job: FineTuningJob, step: int, total: int = 10) -> None:
        job_record_metrics(job=job, attempt=job.attempts, metrics={
            "step": step, "total_steps": total, "train_loss": 1.0})

    def succeed(self, job: FineTuningJob) -> None:
        with self.captured(execute=False):
            assert job_succeed(job=job, attempt=job.attempts, adapter_dir=self.adapter_dir,
                               result={"sha256": "0" * 64, "steps": job.step})

    def fail(self, job: FineTuningJob) -> None:
        with self.captured(execute=False):
            job_fail(job=job, code="training_error", message="out of memory", attempt=job.attempts)

    def stop_cancelled(self, job: FineTuningJob) -> None:
        """The worker's heartbeat saw cancel_requested and stopped the trainer."""
        with self.captured(execute=False):
            job_mark_cancelled(job=job, attempt=job.attempts)


@pytest.fixture
def fake_worker(django_capture_on_commit_callbacks, tmp_path, settings) -> FakeWorker:
    settings.GPU_SLOTS = 8  # the organization's limit, not the GPUs, bounds what runs
    return FakeWorker(django_capture_on_commit_callbacks, tmp_path)


class BeatProcess:
    """A real `celery beat` on the test database and broker: it sends the periodic tasks of
    CELERY_BEAT_SCHEDULE (the sweeps' step among them) to the default queue."""

    def __init__(self, *, database_url: str, directory: Path, extra_env: dict) -> None:
        environ = dict(os.environ, DATABASE_URL=database_url, **extra_env)
        self.log_path = directory / "beat.log"
        self._log = self.log_path.open("w")
        self.process = subprocess.Popen(
            [str(Path(sys.executable).parent / "celery"), "-A", "jobs.celery", "beat",
             "--schedule", str(directory / "beat-schedule"), "--loglevel", "INFO"],
            cwd=REPO, env=environ, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True)

    def sent(self, task: str) -> int:
        return self.log_path.read_text().count(f"Sending due task {task}")

    def stop(self) -> None:
        stop_process_group(self.process, timeout=20)
        self._log.close()


@pytest.fixture
def beat(test_database_url, tmp_path):
    """Starts a beat with the given settings (environment); stopped after the test."""
    started: list[BeatProcess] = []

    def start(**extra_env: str) -> BeatProcess:
        process = BeatProcess(database_url=test_database_url, directory=tmp_path,
                              extra_env=extra_env)
        started.append(process)
        return process

    try:
        yield start
    finally:
        for process in started:
            process.stop()
