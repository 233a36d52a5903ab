"""The official `openai` SDK against a live server: files and fine_tuning.jobs."""

from __future__ import annotations

import openai
import pytest
from django.core.management import call_command

from tests.fixtures.datasets import lines_to_bytes, pirate_lines


@pytest.mark.django_db(transaction=True)
def test_the_openai_sdk_drives_files_and_jobs(live_server, org_a):
    call_command("prepare_default_model")
    client = openai.OpenAI(base_url=f"{live_server.url}/v1", api_key=org_a.owner_key, max_retries=0)
    uploaded = client.files.create(file=("train.jsonl", lines_to_bytes(pirate_lines(20))),
                                   purpose="fine-tune")
    assert uploaded.status == "processed" and uploaded.id.startswith("file-")
    assert client.files.retrieve(uploaded.id).bytes == uploaded.bytes

    job = client.fine_tuning.jobs.create(model="SmolLM2-135M-Instruct", training_file=uploaded.id,
                                         suffix="sdk", hyperparameters={"n_epochs": 1},
                                         extra_body={"hyperparameters": {"n_epochs": 1, "lora_rank": 4}})
    assert job.status == "validating_files" and job.hyperparameters.n_epochs == 1
    assert [j.id for j in client.fine_tuning.jobs.list()] == [job.id]
    assert client.fine_tuning.jobs.retrieve(job.id).model == "SmolLM2-135M-Instruct"
    events = client.fine_tuning.jobs.list_events(job.id, limit=5)
    assert events.data[0].object == "fine_tuning.job.event"
    cancelled = client.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "cancelled"
    assert client.fine_tuning.jobs.checkpoints.list(job.id).data == []

    with pytest.raises(openai.BadRequestError) as raised:
        client.fine_tuning.jobs.create(model="SmolLM2-135M-Instruct", training_file=uploaded.id,
                                       hyperparameters={"n_epochs": 0})
    assert raised.value.body["code"] == "invalid_hyperparameter"
    with pytest.raises(openai.NotFoundError):
        client.fine_tuning.jobs.retrieve("ftjob-doesnotexist")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{live_server.url}/v1", api_key="tpx_wrong",
                      max_retries=0).fine_tuning.jobs.list()
