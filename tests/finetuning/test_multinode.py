"""Two GPU nodes that share nothing but PostgreSQL, Redis and an S3 bucket (a real S3-compatible
server): a job survives one node paused past the heartbeat timeout and another killed outright,
resuming each time from the newest checkpoint in storage on the other node."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
from django.core.management import call_command
from tuneplex.core.storage import list_prefix
from tuneplex.finetuning import scheduler
from tuneplex.finetuning.models import FineTuningJob

from tests.conftest import wait_for
from tests.finetuning.conftest import create_job, upload
from tests.fixtures.datasets import lines_to_bytes, pirate_lines

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]
MODEL = "SmolLM2-135M-Instruct"


def job_state(job_id: str) -> FineTuningJob:
    return FineTuningJob.objects.get(id=job_id)


def sweep_until_requeued(job_id: str) -> None:
    wait_for(lambda: job_id in scheduler.sweep()["requeued"], timeout=60, interval=1,
             message="the sweep to re-queue the job")


def checkpoint_of(job_id: str, attempt: int):
    return job_state(job_id).checkpoints.filter(attempt=attempt).order_by("-step").first()


def test_a_job_survives_a_paused_node_and_a_killed_node(celery_worker, gpu_workers, org_a,
                                                        s3_artifacts, settings, tmp_path):
    call_command("prepare_default_model")
    settings.JOB_HEARTBEAT_TIMEOUT = 5  # what this test's sweep tolerates

    def node(name: str):
        """A GPU node: its own data folder (work folder, caches), the S3 bucket for artifacts."""
        environment = {**s3_artifacts.environment(), "TUNEPLEX_DATA_DIR": str(tmp_path / name),
                       "TUNEPLEX_MODELS_DIR": str(settings.MODELS_DIR)}
        return gpu_workers(name, extra_env=environment)

    first = node("node-a")
    file_id = upload(org_a, lines_to_bytes(pirate_lines(24)))
    job_id = create_job(org_a, model=MODEL, training_file=file_id,
                        hyperparameters={"n_epochs": 4, "batch_size": 8, "learning_rate": 1e-3,
                                         "checkpoint_every_steps": 2}).json()["id"]
    saved = wait_for(lambda: checkpoint_of(job_id, 1), timeout=300, message="node A's checkpoint")
    assert list_prefix(saved.blob_prefix), "the checkpoint's files are in the bucket"

    # Node A freezes (SIGSTOP: the worker, its pool and the trainer) past the heartbeat timeout.
    os.killpg(first.process.pid, signal.SIGSTOP)
    try:
        second = node("node-b")
        sweep_until_requeued(job_id)
        resumed = wait_for(lambda: checkpoint_of(job_id, 2), timeout=300,
                           message="node B's first checkpoint")
        first_resume = job_state(job_id).events.get(message__startswith="Resuming from the checkpoint")
        assert first_resume.data["resumed_from_step"] >= saved.step
        assert resumed.step > first_resume.data["resumed_from_step"]
    finally:
        os.killpg(first.process.pid, signal.SIGCONT)
    # Node A wakes up: its heartbeat is refused, it stops its trainer and writes nothing.
    wait_for(lambda: "was superseded; stopped" in first.log_path.read_text(), timeout=60,
             message="node A to notice it lost the job")
    job = job_state(job_id)
    assert (job.status, job.attempts) == ("running", 2)
    # Nothing of A's counted after the re-queue: no checkpoint of attempt 1 beyond the one B
    # resumed from (A's late uploads were refused and deleted), and progress never went back.
    recorded = set(job.checkpoints.values_list("blob_prefix", flat=True))
    in_bucket = {name.rsplit("/", 1)[0] for name in
                 list_prefix(f"orgs/{org_a.organization.id}/jobs/{job_id}/checkpoints")}
    assert in_bucket == recorded, (in_bucket, recorded)
    assert not job.checkpoints.filter(attempt=1, step__gt=first_resume.data["resumed_from_step"]
                                      ).exists()
    second_claim = job.events.filter(message__startswith="Running (attempt").latest("created_at")
    steps_b = list(job.events.filter(type="metrics", created_at__gt=second_claim.created_at)
                   .order_by("created_at").values_list("data__step", flat=True))
    assert steps_b == sorted(set(steps_b)), steps_b

    # Node B dies outright (SIGKILL); node A, alive again, takes the job over from B's checkpoint.
    newest = wait_for(lambda: checkpoint_of(job_id, 2), timeout=60, message="B's checkpoint")
    second.kill()
    killed_at = time.monotonic()
    wait_for(lambda: not subprocess.run(["pgrep", "-f", f"node-b/work/{job_id}/"],
                                        capture_output=True, text=True).stdout.split(),
             timeout=10, message="B's trainer to die with its worker")
    sweep_until_requeued(job_id)
    job = wait_for(lambda: (j := job_state(job_id)).status in FineTuningJob.FINISHED and j,
                   timeout=400, interval=0.5, message="the job to finish")
    assert job.status == "succeeded", job.error
    assert job.attempts == 3
    resumes = list(job.events.filter(message__startswith="Resuming from the checkpoint")
                   .order_by("created_at").values_list("data__resumed_from_step", flat=True))
    assert len(resumes) == 2 and resumes[1] >= newest.step, resumes
    last_claim = job.events.filter(message__startswith="Running (attempt").latest("created_at")
    steps = list(job.events.filter(type="metrics", created_at__gt=last_claim.created_at)
                 .order_by("created_at").values_list("data__step", flat=True))
    assert steps[0] == resumes[1] + 1 and steps[-1] == 12, steps
    adapter = job.adapter
    assert list_prefix(adapter.blob_prefix), "the adapter is in the bucket"
    print(f"kill-to-finished on the other node: {time.monotonic() - killed_at:.1f} s")
