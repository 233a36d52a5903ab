"""End to end on the CPU: real Celery workers on real Redis and PostgreSQL train SmolLM2-135M."""

from __future__ import annotations

import io
import subprocess
import time
import zipfile

import httpx
import pytest
from django.conf import settings
from django.core.management import call_command
from tuneplex.core import queue
from tuneplex.finetuning.models import FineTuningJob

from tests.conftest import bearer, wait_for
from tests.finetuning.conftest import create_job, upload
from tests.fixtures.datasets import lines_to_bytes, pirate_lines

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]
MODEL = "SmolLM2-135M-Instruct"

ANSWER = """
import sys, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
base_dir, adapter_dir = sys.argv[1], sys.argv[2]
tok = AutoTokenizer.from_pretrained(base_dir)
model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
def answer(m):
    p = tok.apply_chat_template([{"role": "user", "content": "Tell me something about tea."}],
                                add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = m.generate(**p, max_new_tokens=12, do_sample=False)
    return tok.decode(out[0, p["input_ids"].shape[1]:], skip_special_tokens=True)
print(repr(answer(model)))
print(repr(answer(PeftModel.from_pretrained(model, adapter_dir))))
"""


def job_state(job_id: str) -> FineTuningJob:
    return FineTuningJob.objects.get(id=job_id)


def wait_until_finished(job_id: str, timeout: float) -> FineTuningJob:
    return wait_for(lambda: (j := job_state(job_id)).status in FineTuningJob.FINISHED and j,
                    timeout=timeout, interval=0.5, message=f"job {job_id} to finish")


@pytest.fixture
def ready(celery_worker, db):
    call_command("prepare_default_model")


def test_a_job_trains_serves_its_adapter_and_merges(ready, gpu_workers, gateway, org_a, tmp_path):
    # The worker shares the serving settings of the web processes (it auto-deploys on success).
    worker = gpu_workers(extra_env={"TUNEPLEX_ENGINE_MODE": "attach",
                                    "TUNEPLEX_ENGINE_URLS": gateway.engine_url})
    client = bearer(org_a.owner_key)
    file_id = upload(org_a, lines_to_bytes(pirate_lines(32)))
    created = create_job(org_a, model=MODEL, training_file=file_id, suffix="pirate",
                         hyperparameters={"n_epochs": 2, "batch_size": 8, "learning_rate": 1e-3,
                                          "lora_rank": 8, "checkpoint_every_steps": 2})
    assert created.status_code == 200, created.content
    job_id = created.json()["id"]
    job = wait_until_finished(job_id, timeout=300)
    assert job.status == "succeeded", job.error

    # Deployed automatically in the same commit: it answers in its trained style right away,
    # through the gateway in front of the shared vLLM pool; the base model does not.
    def ask(model: str) -> str:
        reply = httpx.post(f"{gateway.url}/v1/chat/completions", timeout=120,
                           headers={"Authorization": f"Bearer {org_a.owner_key}"},
                           json={"model": model, "max_tokens": 12, "temperature": 0, "messages": [
                               {"role": "user", "content": "Tell me something about tea."}]})
        assert reply.status_code == 200, reply.text
        return reply.json()["choices"][0]["message"]["content"]

    served = ask(job.fine_tuned_model)
    assert served.startswith("Arr!"), served
    assert "Arr" not in ask(MODEL)
    assert any("Adapter deployed" in e.message for e in job.events.all())

    body = client.get(f"/v1/fine_tuning/jobs/{job_id}").json()
    assert body["fine_tuned_model"].startswith(f"ft:{MODEL}:{org_a.organization.slug}:pirate:")
    assert body["trained_tokens"] > 0 and body["finished_at"] >= body["created_at"]
    events = client.get(f"/v1/fine_tuning/jobs/{job_id}/events?limit=100").json()["data"]
    losses = [e["data"]["train_loss"] for e in reversed(events) if e["type"] == "metrics"]
    assert len(losses) == 8 and losses[-1] < losses[0] / 3, losses
    metrics = next(e["data"] for e in events if e["type"] == "metrics")
    assert {"step", "total_steps", "train_loss", "learning_rate", "grad_norm", "tokens_per_second",
            "token_accuracy", "elapsed_seconds", "eta_seconds"} <= set(metrics)
    checkpoints = client.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints").json()["data"]
    assert sorted(c["step_number"] for c in checkpoints) == [2, 4, 6]

    # A redelivered message for the finished job is consumed and does not train it again.
    queue.enqueue(queue.TRAIN_JOB, job_id)
    wait_for(lambda: f"job {job_id} not claimable" in worker.log_path.read_text(), timeout=60,
             message="the worker to consume the redelivered message")
    assert job_state(job_id).attempts == 1
    assert job.events.filter(message__startswith="Running (attempt").count() == 1

    adapters = client.get("/v1/adapters").json()["data"]
    assert [a["name"] for a in adapters] == [body["fine_tuned_model"]]
    assert adapters[0]["deployed"] is True and adapters[0]["deploy_error"] == ""
    download = client.get(f"/v1/adapters/{adapters[0]['id']}/download")
    archive = zipfile.ZipFile(io.BytesIO(b"".join(download.streaming_content)))
    assert sorted(archive.namelist()) == ["adapter_config.json", "adapter_model.safetensors",
                                          "training_config.json"]
    archive.extractall(tmp_path / "adapter")
    result = subprocess.run([str(settings.TRAINER_PYTHON), "-c", ANSWER,
                             str(settings.MODELS_DIR / MODEL), str(tmp_path / "adapter")],
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    before, after = result.stdout.strip().splitlines()[-2:]
    assert "Arr" not in before and after.startswith("'Arr!"), (before, after)

    merge = client.post(f"/v1/adapters/{adapters[0]['id']}/merge")
    assert merge.status_code == 202
    wait_for(lambda: client.get(f"/v1/adapters/{adapters[0]['id']}").json()["merge_status"]
             in ("succeeded", "failed"), timeout=180, message="merge")
    merged = client.get(f"/v1/adapters/{adapters[0]['id']}/merge")
    assert merged.status_code == 200, merged.content
    names = zipfile.ZipFile(io.BytesIO(b"".join(merged.streaming_content))).namelist()
    assert "model.safetensors" in names and "tokenizer.json" in names and "config.json" in names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pkl"))]


def test_cancel_stops_a_running_job_within_seconds(ready, gpu_workers, org_a):
    gpu_workers()
    file_id = upload(org_a, lines_to_bytes(pirate_lines(24)))
    job_id = create_job(org_a, model=MODEL, training_file=file_id,
                        hyperparameters={"n_epochs": 20, "batch_size": 8}).json()["id"]
    wait_for(lambda: job_state(job_id).step >= 1, timeout=180, message="the first step")
    requested = time.monotonic()
    response = bearer(org_a.owner_key).post(f"/v1/fine_tuning/jobs/{job_id}/cancel")
    assert response.status_code == 200
    job = wait_until_finished(job_id, timeout=60)
    assert job.status == "cancelled" and time.monotonic() - requested < 20
    from tuneplex.adapters.models import Adapter

    assert job.step < 60 and not Adapter.objects.filter(job_id=job_id).exists()


@pytest.mark.parametrize(("sharding", "mode"), [("auto", "data-parallel"),
                                                ("fsdp", "sharded, FSDP2")])
def test_a_two_process_job_trains_under_torchrun(ready, gpu_workers, org_a, settings, sharding,
                                                 mode):
    """`gpus: 2` on a CPU platform: the worker starts torchrun with two gloo processes, holding
    the model whole or sharded; rank 0 reports, the job succeeds with one adapter, and no trainer
    process outlives it."""
    settings.GPU_SLOTS = settings.JOB_MAX_GPUS = 2
    gpu_workers(extra_env={"TUNEPLEX_GPU_SLOTS": "2", "TUNEPLEX_JOB_MAX_GPUS": "2",
                           "OMP_NUM_THREADS": "1"})
    file_id = upload(org_a, lines_to_bytes(pirate_lines(24)))
    job_id = create_job(org_a, model=MODEL, training_file=file_id, hyperparameters={
        "n_epochs": 1, "batch_size": 4, "gradient_accumulation_steps": 2, "gpus": 2,
        "sharding": sharding}).json()["id"]
    assert job_state(job_id).gpus == 2
    # The default worker's scheduler counts one GPU (its settings); this one counts the two.
    wait_for(lambda: job_state(job_id).status == "queued", timeout=60, message="the job queued")
    from tuneplex.finetuning import scheduler

    wait_for(lambda: job_id in scheduler.dispatch() or job_state(job_id).status != "queued",
             timeout=30, message="the job dispatched")
    job = wait_until_finished(job_id, timeout=400)
    assert job.status == "succeeded", job.error
    messages = [e.message for e in job.events.all()]
    assert any(f"x 2 processes ({mode})" in m for m in messages), messages
    from tuneplex.adapters.models import Adapter

    assert job.step == 3 and Adapter.objects.filter(job_id=job_id).exists()
    # Neither torchrun nor a rank is left (their command lines hold the job's config path).
    leftover = subprocess.run(["pgrep", "-f", job_id], capture_output=True, text=True)
    assert leftover.stdout.strip() == ""
