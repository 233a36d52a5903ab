"""End to end on the CPU: a DPO job through the `openai` SDK, trained by a real GPU-queue worker,
then a job that continues its adapter, with the lineage recorded on both."""

from __future__ import annotations

import openai
import pytest

from tests.conftest import bearer
from tests.finetuning.test_training_e2e import ready, wait_until_finished  # noqa: F401 - fixture
from tests.fixtures.datasets import lines_to_bytes, pirate_lines, preference_lines

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]
MODEL = "SmolLM2-135M-Instruct"


def test_a_dpo_job_trains_through_the_sdk_and_a_continued_job_records_its_lineage(
        ready, gpu_workers, live_server, org_a, org_b):  # noqa: F811
    gpu_workers()
    client = openai.OpenAI(base_url=f"{live_server.url}/v1", api_key=org_a.owner_key, max_retries=0)
    pairs = client.files.create(file=("pairs.jsonl", lines_to_bytes(preference_lines(16))),
                                purpose="fine-tune")
    assert pairs.status == "processed"
    job = client.fine_tuning.jobs.create(
        model=MODEL, training_file=pairs.id, suffix="dpo",
        method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.1, "n_epochs": 2,
                                                            "batch_size": 8}}},
        extra_body={"hyperparameters": {"learning_rate": 2e-3, "lora_rank": 8,
                                        "lora_dropout": 0.0, "warmup_ratio": 0.0}})
    assert job.method.type == "dpo" and job.method.dpo.hyperparameters.beta == 0.1
    finished = wait_until_finished(job.id, timeout=420)
    assert finished.status == "succeeded", finished.error

    events = client.fine_tuning.jobs.list_events(job.id, limit=100).data
    metrics = [e.data for e in reversed(events) if e.type == "metrics"]
    assert len(metrics) == 4
    assert metrics[0]["reward_margin"] == pytest.approx(0, abs=1e-6)
    assert metrics[-1]["reward_accuracy"] > 0.5 and metrics[-1]["reward_margin"] > 0
    retrieved = client.fine_tuning.jobs.retrieve(job.id)
    assert retrieved.method.type == "dpo" and retrieved.fine_tuned_model == finished.fine_tuned_model

    # Another organization cannot continue it: the adapter does not exist for them.
    theirs = openai.OpenAI(base_url=f"{live_server.url}/v1", api_key=org_b.owner_key, max_retries=0)
    their_file = theirs.files.create(file=("chat.jsonl", lines_to_bytes(pirate_lines(12))),
                                     purpose="fine-tune")
    with pytest.raises(openai.NotFoundError) as raised:
        theirs.fine_tuning.jobs.create(model=finished.fine_tuned_model, training_file=their_file.id)
    assert raised.value.body["code"] == "model_not_found"

    chat = client.files.create(file=("chat.jsonl", lines_to_bytes(pirate_lines(12))),
                               purpose="fine-tune")
    child = client.fine_tuning.jobs.create(model=finished.fine_tuned_model, training_file=chat.id,
                                           extra_body={"hyperparameters": {"max_steps": 1}})
    assert child.model == finished.fine_tuned_model
    done = wait_until_finished(child.id, timeout=300)
    assert done.status == "succeeded", done.error
    assert any("Continues training from" in e.message for e in done.events.all())

    api = bearer(org_a.owner_key)
    lineage = api.get(f"/v1/fine_tuning/jobs/{child.id}").json()["lineage"]
    assert lineage["adapter"]["name"] == finished.fine_tuned_model
    assert [(d["job_id"], d["training_file"], d["method"]) for d in lineage["datasets"]] == [
        (job.id, pairs.id, "dpo"), (child.id, chat.id, "supervised")]
    adapters = {a["name"]: a for a in api.get("/v1/adapters").json()["data"]}
    continued = adapters[done.fine_tuned_model]
    assert continued["parent"] == finished.fine_tuned_model and continued["lineage"] == lineage
    assert adapters[finished.fine_tuned_model]["rank"] == continued["rank"] == 8
