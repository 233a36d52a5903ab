"""End to end on the CPU, through the official `openai` SDK: a job paused mid-training saves a
checkpoint and frees its GPU slot (another job of the organization trains meanwhile, under a
concurrency limit of one), then resumes on another worker from that checkpoint and finishes
with the losses an uninterrupted job of the same seed has, each step trained once."""

from __future__ import annotations

import openai
import pytest
from tuneplex.finetuning import scheduler
from tuneplex.finetuning.models import FineTuningJob

from tests.conftest import wait_for
from tests.finetuning.test_training_e2e import ready, wait_until_finished  # noqa: F401 - fixture
from tests.fixtures.datasets import lines_to_bytes, pirate_lines

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]
MODEL = "SmolLM2-135M-Instruct"
# 24 examples, micro-batch 8: 3 steps an epoch, 9 in all; dropout, so the RNG state matters.
HYPERPARAMETERS = {"n_epochs": 3, "batch_size": 8, "learning_rate": 1e-3, "lora_rank": 4,
                   "lora_dropout": 0.1, "checkpoint_every_steps": 4}


def status_of(job_id: str) -> str:
    return FineTuningJob.objects.get(id=job_id).api_status


def metrics_of(client: openai.OpenAI, job_id: str) -> list[dict]:
    events = list(client.fine_tuning.jobs.list_events(job_id, limit=100))  # newest first, all pages
    return [event.data for event in reversed(events) if event.type == "metrics"]


def create_job(client: openai.OpenAI, training_file: str, run: str, hyperparameters: dict):
    """A job of seed 7 on ``training_file``, ``run`` its suffix and its metadata's run."""
    return client.fine_tuning.jobs.create(model=MODEL, training_file=training_file, seed=7,
                                          suffix=run, metadata={"run": run},
                                          extra_body={"hyperparameters": hyperparameters})


def assert_resumed_with_the_same_losses(client: openai.OpenAI, job_id: str, reference_id: str,
                                        steps: int) -> None:
    """The paused and resumed job trained each of its ``steps`` once, with the losses of the
    uninterrupted job ``reference_id`` (same seed and data), and its events tell the pause, the
    resume and the end in that order."""
    expected, actual = metrics_of(client, reference_id), metrics_of(client, job_id)
    assert [m["step"] for m in actual] == list(range(1, steps + 1))  # none twice, none lost
    assert [m["train_loss"] for m in actual] == pytest.approx(
        [m["train_loss"] for m in expected], rel=1e-4, abs=1e-5)
    messages = [e.message for e in reversed(list(client.fine_tuning.jobs.list_events(job_id)))]
    order = [next(i for i, m in enumerate(messages) if m.startswith(prefix))
             for prefix in ("Pause requested", "Job paused.", "Job resumed", "Job succeeded")]
    assert order == sorted(order), messages


def test_a_paused_job_frees_its_gpu_and_resumes_elsewhere_with_the_same_losses(
        ready, gpu_workers, live_server, org_a, settings):  # noqa: F811
    assert settings.ORG_MAX_CONCURRENT_JOBS == 1 and settings.GPU_SLOTS == 1
    first_worker = gpu_workers()
    client = openai.OpenAI(base_url=f"{live_server.url}/v1", api_key=org_a.owner_key, max_retries=0)
    data = client.files.create(file=("train.jsonl", lines_to_bytes(pirate_lines(24))),
                               purpose="fine-tune")

    paused_job = create_job(client, data.id, "paused", HYPERPARAMETERS)
    wait_for(lambda: FineTuningJob.objects.get(id=paused_job.id).step >= 2, timeout=300,
             message="the job's second step")
    first_worker_name = FineTuningJob.objects.get(id=paused_job.id).worker
    assert client.fine_tuning.jobs.pause(paused_job.id).status == "pausing"
    wait_for(lambda: status_of(paused_job.id) == "paused", timeout=120, message="the pause")
    job = FineTuningJob.objects.get(id=paused_job.id)
    paused_event = job.events.get(message__startswith="Job paused.")
    at_step = paused_event.data["step"]
    assert 2 <= at_step < 9 and paused_event.data["resume_from_step"] == at_step
    assert job.checkpoints.filter(step=at_step, attempt=1).exists()
    assert client.fine_tuning.jobs.retrieve(job.id).status == "paused"
    assert scheduler.gpu_slots_in_use() == 0 and job.worker == ""

    # The freed slot trains another job of the organization (its limit is one job at a time):
    # the same seed and data, uninterrupted, the reference for the losses.
    reference = create_job(client, data.id, "reference", HYPERPARAMETERS)
    done = wait_until_finished(reference.id, timeout=400)
    assert done.status == "succeeded", done.error
    assert status_of(paused_job.id) == "paused"  # nothing resumed it meanwhile

    # Resumed on another worker (this one stopped): from the checkpoint in artifact storage.
    first_worker.stop()
    gpu_workers()
    resumed = client.fine_tuning.jobs.resume(paused_job.id)
    assert resumed.status == "queued"
    finished = wait_until_finished(paused_job.id, timeout=400)
    assert finished.status == "succeeded", finished.error
    assert finished.attempts == 2 and finished.worker not in ("", first_worker_name)
    restored = finished.events.get(message__startswith="Resuming from the checkpoint")
    assert restored.data["resumed_from_step"] == at_step
    assert_resumed_with_the_same_losses(client, paused_job.id, reference.id, steps=9)
