"""DPO jobs and continued training through the jobs API: what is accepted, refused and recorded."""

from __future__ import annotations

import pytest

from tests.conftest import bearer
from tests.finetuning.conftest import create_job, upload
from tests.fixtures.adapter_rows import adapter_row
from tests.fixtures.datasets import lines_to_bytes, pirate_lines, preference_lines
from tuneplex.finetuning.models import FineTuningJob, JobCheckpoint

MODEL = "SmolLM2-135M-Instruct"
DPO = {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.25, "n_epochs": 2}}}


@pytest.fixture
def pairs_of_a(org_a) -> str:
    return upload(org_a, lines_to_bytes(preference_lines(12)))


def _error(response) -> tuple[int, str, str | None]:
    error = response.json()["error"]
    return response.status_code, error["code"], error["param"]


def test_a_dpo_job_is_created_and_returns_its_method(org_a, default_model, pairs_of_a):
    response = create_job(org_a, model=MODEL, training_file=pairs_of_a, method=DPO)
    assert response.status_code == 200, response.content
    body = response.json()
    assert body["method"] == {"type": "dpo", "dpo": {"hyperparameters": {
        "n_epochs": 2, "batch_size": "auto", "learning_rate_multiplier": "auto", "beta": 0.25}}}
    assert body["training"]["objective"] == "dpo" and body["training"]["dpo_beta"] == 0.25
    assert body["lineage"] == {} and body["model"] == MODEL == body["base_model"]
    job = FineTuningJob.objects.get(id=body["id"])
    assert job.method_type == "dpo" and job.config["objective"] == "dpo"


def test_beta_auto_is_the_default(org_a, default_model, pairs_of_a):
    body = create_job(org_a, model=MODEL, training_file=pairs_of_a, method={
        "type": "dpo", "dpo": {"hyperparameters": {"beta": "auto"}}}).json()
    assert body["method"]["dpo"]["hyperparameters"]["beta"] == 0.1


@pytest.mark.parametrize(("method", "file", "expected"), [
    (DPO, "chat", (400, "invalid_file", "training_file")),
    ({"type": "supervised"}, "pairs", (400, "invalid_file", "training_file")),
    ({"type": "supervised", "supervised": {"hyperparameters": {"beta": 0.1}}}, "chat",
     (400, "invalid_hyperparameter", "hyperparameters.beta")),
    ({"type": "dpo", "dpo": {"hyperparameters": {"beta": 0}}}, "pairs",
     (400, "invalid_hyperparameter", "hyperparameters.beta")),
    ({"type": "dpo", "dpo": {"hyperparameters": {"beta": "high"}}}, "pairs",
     (400, "invalid_hyperparameter", "hyperparameters.beta")),
    ({"type": "reinforcement"}, "pairs", (400, "unsupported_method", "method")),
    ({"type": "dpo", "dpo": {"hyperparameters": ["beta"]}}, "pairs", (400, "invalid", "method")),
])
def test_a_method_and_its_data_must_agree(org_a, default_model, pairs_of_a, method, file, expected):
    files = {"pairs": pairs_of_a, "chat": upload(org_a, lines_to_bytes(pirate_lines(12)))}
    response = create_job(org_a, model=MODEL, training_file=files[file], method=method)
    assert _error(response) == expected
    assert not FineTuningJob.objects.exists()


def _parent(tenant, default_model, **config):
    adapter = adapter_row(tenant.organization, default_model)
    adapter.job.config = {"lora_rank": 8, "lora_alpha": 16.0, "target_modules": ["q_proj", "v_proj"],
                          **config}
    adapter.job.save()
    return adapter


def test_another_organizations_adapter_or_checkpoint_is_not_found(org_a, org_b, default_model,
                                                                  pairs_of_a):
    theirs = _parent(org_b, default_model)
    checkpoint = JobCheckpoint.objects.create(job=theirs.job, step=2, blob_prefix="x")
    for model in (theirs.name, theirs.id, f"{theirs.name}:ckpt-step-2",
                  f"{theirs.job.id}:ckpt-step-2", checkpoint.id, "ft:nothing:at:all:x"):
        response = create_job(org_a, model=model, training_file=pairs_of_a, method=DPO)
        assert _error(response) == (404, "model_not_found", "model"), model
    assert not FineTuningJob.objects.filter(organization=org_a.organization).exists()


def test_a_job_continues_from_an_adapter_with_its_lora_shape_and_records_the_lineage(
        org_a, default_model, pairs_of_a):
    parent = _parent(org_a, default_model)
    body = create_job(org_a, model=parent.name, training_file=pairs_of_a, method=DPO).json()
    assert body["model"] == parent.name and body["base_model"] == MODEL
    assert (body["training"]["lora_rank"], body["training"]["lora_alpha"],
            body["training"]["target_modules"]) == (8, 16.0, ["q_proj", "v_proj"])
    lineage = body["lineage"]
    assert lineage["adapter"] == {"id": parent.id, "name": parent.name}
    assert lineage["checkpoint"] is None and lineage["parent_job_id"] == parent.job.id
    assert lineage["datasets"] == [
        {"job_id": parent.job.id, "training_file": "file-fixture", "validation_file": None,
         "method": "supervised"},
        {"job_id": body["id"], "training_file": pairs_of_a, "validation_file": None,
         "method": "dpo"}]
    job = FineTuningJob.objects.get(id=body["id"])
    assert job.parent_adapter == parent and job.parent_checkpoint is None


def test_a_job_continues_from_a_checkpoint_by_name_or_id(org_a, default_model, pairs_of_a):
    parent = _parent(org_a, default_model)
    checkpoint = JobCheckpoint.objects.create(job=parent.job, step=4, blob_prefix="x")
    for model in (f"{parent.name}:ckpt-step-4", f"{parent.job.id}:ckpt-step-4", checkpoint.id):
        body = create_job(org_a, model=model, training_file=pairs_of_a, method=DPO).json()
        assert body["lineage"]["checkpoint"] == {"id": checkpoint.id, "job_id": parent.job.id,
                                                 "step": 4}, model
    missing = create_job(org_a, model=f"{parent.name}:ckpt-step-5", training_file=pairs_of_a,
                         method=DPO)
    assert _error(missing) == (404, "model_not_found", "model")


@pytest.mark.parametrize(("hyperparameters", "param"), [
    ({"lora_rank": 16}, "hyperparameters.lora_rank"),
    ({"lora_alpha": 32}, "hyperparameters.lora_alpha"),
    ({"target_modules": "all-linear"}, "hyperparameters.target_modules"),
])
def test_a_continued_job_may_not_change_the_lora_shape(org_a, default_model, pairs_of_a,
                                                       hyperparameters, param):
    parent = _parent(org_a, default_model)
    response = create_job(org_a, model=parent.name, training_file=pairs_of_a, method=DPO,
                          hyperparameters=hyperparameters)
    assert _error(response) == (400, "invalid_hyperparameter", param)
    same = create_job(org_a, model=parent.name, training_file=pairs_of_a, method=DPO,
                      hyperparameters={"lora_rank": 8, "target_modules": ["v_proj", "q_proj"]})
    assert same.status_code == 200, same.content


def test_continuing_a_lineage_keeps_every_generation(org_a, default_model, pairs_of_a):
    parent = _parent(org_a, default_model)
    first = FineTuningJob.objects.get(id=create_job(org_a, model=parent.name,
                                                    training_file=pairs_of_a, method=DPO).json()["id"])
    from tuneplex.adapters.models import Adapter

    child = Adapter.objects.create(organization=org_a.organization, job=first, base_model=default_model,
                                   name=f"ft:{MODEL}:{org_a.organization.slug}:c:{first.id[6:]}",
                                   blob_prefix="x", sha256="0" * 64, bytes=1, rank=8,
                                   lineage=first.lineage)
    body = create_job(org_a, model=child.name, training_file=pairs_of_a, method=DPO).json()
    assert [d["job_id"] for d in body["lineage"]["datasets"]] == [parent.job.id, first.id, body["id"]]
    assert bearer(org_a.owner_key).get(f"/v1/adapters/{child.id}").json()["lineage"] == first.lineage


def test_the_time_estimate_of_a_dpo_job_counts_the_reference_forward(org_a, default_model,
                                                                     pairs_of_a):
    from tuneplex.files.models import File
    from tuneplex.finetuning.estimates import time_estimate
    from tuneplex.finetuning.services.plan import job_plan

    def estimate(method_type: str):
        plan = job_plan(organization=org_a.organization, model=MODEL, training_file=pairs_of_a,
                        method_type=method_type)
        return time_estimate(organization=org_a.organization, config=plan.config,
                             base_model=plan.base_model, train=plan.train)

    dpo = estimate("dpo")
    File.objects.filter(id=pairs_of_a).update(format="chat")  # the same tokens, trained supervised
    supervised = estimate("supervised")
    assert dpo.tokens == supervised.tokens
    assert dpo.seconds == pytest.approx(supervised.seconds * 6 / 4, rel=1e-3)


def test_adapter_dropout_raises_the_memory_estimate(org_a, default_model, pairs_of_a):
    """With lora_dropout (off by default) each adapted projection keeps its dropped input and
    mask: the pre-flight estimate counts them, as the trainer's plan does."""
    jobs = [create_job(org_a, model=MODEL, training_file=pairs_of_a, method=DPO,
                       hyperparameters=hyperparameters)
            for hyperparameters in ({}, {"lora_dropout": 0.1})]
    assert [r.status_code for r in jobs] == [200, 200], jobs[1].content
    plain, dropped = (FineTuningJob.objects.get(id=r.json()["id"]) for r in jobs)
    assert plain.config["lora_dropout"] == 0.0
    assert dropped.estimated_memory_bytes > plain.estimated_memory_bytes


def test_sharding_is_a_hyperparameter_and_a_continued_dpo_job_is_never_sharded(
        org_a, default_model, pairs_of_a, settings):
    settings.JOB_MAX_GPUS = settings.GPU_SLOTS = 2
    sharded = create_job(org_a, model=MODEL, training_file=pairs_of_a, method=DPO,
                         hyperparameters={"gpus": 2, "sharding": "fsdp"})
    whole = create_job(org_a, model=MODEL, training_file=pairs_of_a, method=DPO,
                       hyperparameters={"gpus": 2, "sharding": "off"})
    assert sharded.status_code == whole.status_code == 200, sharded.content
    assert sharded.json()["training"]["sharding"] == "fsdp"
    estimates = [FineTuningJob.objects.get(id=r.json()["id"]).estimated_memory_bytes
                 for r in (sharded, whole)]
    assert estimates[0] < estimates[1]  # each GPU holds about half of the decoder layers
    auto = create_job(org_a, model=MODEL, training_file=pairs_of_a, method=DPO,
                      hyperparameters={"sharding": "auto", "gpus": 2})
    assert auto.json()["training"]["sharding"] == "auto", auto.content  # a value, not "unset"
    bogus = create_job(org_a, model=MODEL, training_file=pairs_of_a, method=DPO,
                       hyperparameters={"sharding": "zero3"})
    assert _error(bogus) == (400, "invalid_hyperparameter", "hyperparameters.sharding")

    parent = _parent(org_a, default_model)
    jobs = FineTuningJob.objects.filter(organization=org_a.organization).count()
    refused = create_job(org_a, model=parent.name, training_file=pairs_of_a, method=DPO,
                         hyperparameters={"gpus": 2, "sharding": "fsdp"})
    assert _error(refused) == (400, "invalid_hyperparameter", "hyperparameters.sharding")
    assert "reference adapter" in refused.json()["error"]["message"]
    assert FineTuningJob.objects.filter(organization=org_a.organization).count() == jobs
    replicas = create_job(org_a, model=parent.name, training_file=pairs_of_a, method=DPO,
                          hyperparameters={"gpus": 2, "sharding": "off"})
    assert replicas.status_code == 200, replicas.content
