"""Creating jobs: everything wrong is refused up front with a code and param; lifecycle basics."""

from __future__ import annotations

import pytest

from tests.conftest import bearer
from tests.finetuning.conftest import create_job, upload
from tests.fixtures.datasets import MALFORMED
from tuneplex.audit.models import AuditEvent
from tuneplex.finetuning.models import FineTuningJob

pytestmark = pytest.mark.django_db


def test_a_valid_job_is_created_in_openai_shape(org_a, default_model, pirate_file_of_a):
    response = create_job(org_a, model="SmolLM2-135M-Instruct", training_file=pirate_file_of_a,
                          suffix="pirate", hyperparameters={"n_epochs": 2, "lora_rank": 8})
    assert response.status_code == 200, response.content
    job = response.json()
    assert job["object"] == "fine_tuning.job" and job["id"].startswith("ftjob-")
    assert job["status"] == "validating_files" and job["model"] == "SmolLM2-135M-Instruct"
    assert job["hyperparameters"] == {"n_epochs": 2, "batch_size": "auto",
                                      "learning_rate_multiplier": "auto"}
    assert job["training"]["lora_rank"] == 8 and job["training"]["max_seq_len"] == 2048
    assert job["organization_id"] == org_a.organization.id and job["error"] is None
    assert job["estimated_memory_bytes"] > 500 * 2**20
    assert AuditEvent.objects.filter(action="finetuning_job.create", object_id=job["id"]).exists()
    events = bearer(org_a.owner_key).get(f"/v1/fine_tuning/jobs/{job['id']}/events").json()
    assert "Estimated peak memory" in events["data"][0]["message"]


@pytest.mark.parametrize("body,status,code,param", [
    ({"hyperparameters": {"lora_rank": -1}}, 400, "invalid_hyperparameter", "hyperparameters.lora_rank"),
    ({"hyperparameters": {"target_modules": ["q_proj", "attention_mixer"]}}, 400,
     "invalid_hyperparameter", "hyperparameters.target_modules"),
    ({"hyperparameters": {"method": "qlora"}}, 400, "qlora_unavailable", "hyperparameters.method"),
    ({"hyperparameters": {"warp_speed": 9}}, 400, "invalid_hyperparameter", "hyperparameters.warp_speed"),
    ({"hyperparameters": {"n_epochs": 0}}, 400, "invalid_hyperparameter", "hyperparameters.epochs"),
    ({"hyperparameters": {"learning_rate_multiplier": -2}}, 400, "invalid_hyperparameter",
     "hyperparameters.learning_rate_multiplier"),
    ({"hyperparameters": {"learning_rate": 1e-4, "learning_rate_multiplier": 2}}, 400,
     "invalid_hyperparameter", "hyperparameters.learning_rate_multiplier"),
    ({"hyperparameters": {"max_seq_len": 100000}}, 400, "invalid_hyperparameter",
     "hyperparameters.max_seq_len"),
    ({"hyperparameters": {"lr_scheduler": "sawtooth"}}, 400, "invalid_hyperparameter",
     "hyperparameters.lr_scheduler"),
    ({"hyperparameters": {"gpus": 2}}, 400, "invalid_hyperparameter", "hyperparameters.gpus"),
    ({"hyperparameters": {"gpus": 0}}, 400, "invalid_hyperparameter", "hyperparameters.gpus"),
    ({"hyperparameters": {"cuda_graphs": "always"}}, 400, "invalid_hyperparameter",
     "hyperparameters.cuda_graphs"),
    ({"model": "gpt-7"}, 400, "model_not_available", "model"),
    ({"training_file": "file-doesnotexist"}, 400, "file_not_found", "training_file"),
    ({"suffix": "Not OK!"}, 400, "invalid_suffix", "suffix"),
    ({"method": {"type": "reinforcement"}}, 400, "unsupported_method", "method"),
    ({"seed": -5}, 400, "min_value", "seed"),
    ({"hyperparameters": "fast"}, 400, "not_a_dict", "hyperparameters"),
])
def test_bad_jobs_are_refused_with_code_and_param(org_a, default_model, pirate_file_of_a, body,
                                                  status, code, param):
    request = {"model": "SmolLM2-135M-Instruct", "training_file": pirate_file_of_a, **body}
    response = create_job(org_a, **request)
    assert response.status_code == status, response.content
    error = response.json()["error"]
    assert (error["code"], error["param"]) == (code, param), error
    assert error["message"]
    assert not FineTuningJob.objects.exists()


def test_an_adapter_the_pool_could_not_load_is_refused_before_it_trains(
        org_a, default_model, pirate_file_of_a, settings):
    settings.ENGINE_MODE, settings.ENGINE_MAX_LORA_RANK = "attach", 16
    request = {"model": "SmolLM2-135M-Instruct", "training_file": pirate_file_of_a}
    response = create_job(org_a, **request, hyperparameters={"lora_rank": 32})
    assert response.status_code == 400, response.content
    error = response.json()["error"]
    assert (error["code"], error["param"]) == ("adapter_not_servable", "hyperparameters.lora_rank")
    assert "TUNEPLEX_ENGINE_MAX_LORA_RANK" in error["message"]
    assert not FineTuningJob.objects.exists()
    # The positive controls: the engines' maximum itself, and any rank where nothing is served.
    assert create_job(org_a, **request, hyperparameters={"lora_rank": 16}).status_code == 200
    settings.ENGINE_MODE = "off"
    assert create_job(org_a, **request, hyperparameters={"lora_rank": 32}).status_code == 200


def test_a_dataset_with_errors_or_of_another_org_is_refused(org_a, org_b, default_model):
    broken = upload(org_a, MALFORMED["unknown_role"][0])
    response = create_job(org_a, model="SmolLM2-135M-Instruct", training_file=broken)
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_file"
    from tests.fixtures.datasets import good_chat

    theirs = upload(org_b, good_chat())
    response = create_job(org_a, model="SmolLM2-135M-Instruct", training_file=theirs)
    assert response.status_code == 400
    assert response.json()["error"] == {"code": "file_not_found", "param": "training_file",
                                        "message": f"No such file: {theirs!r}."}


def test_a_disabled_base_model_is_refused(org_a, default_model, pirate_file_of_a):
    default_model.enabled = False
    default_model.save()
    response = create_job(org_a, model="SmolLM2-135M-Instruct", training_file=pirate_file_of_a)
    assert response.status_code == 400 and "disabled" in response.json()["error"]["message"]


def test_a_job_that_cannot_fit_in_memory_is_refused_with_advice(org_a, default_model,
                                                                 pirate_file_of_a, settings):
    settings.TRAINING_MEMORY = 2 * 2**30
    response = create_job(org_a, model="SmolLM2-135M-Instruct", training_file=pirate_file_of_a,
                          hyperparameters={"batch_size": 32, "max_seq_len": 2048})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "insufficient_memory" and error["param"] == "hyperparameters.batch_size"
    assert "gradient_checkpointing" in error["message"] and "2.0 GiB available" in error["message"]


def test_openai_method_shape_is_accepted(org_a, default_model, pirate_file_of_a):
    response = create_job(org_a, model="SmolLM2-135M-Instruct", training_file=pirate_file_of_a,
                          method={"type": "supervised",
                                  "supervised": {"hyperparameters": {"n_epochs": 3,
                                                                     "learning_rate_multiplier": 0.5}}})
    assert response.status_code == 200, response.content
    assert response.json()["training"]["epochs"] == 3
    assert response.json()["training"]["learning_rate"] == pytest.approx(1e-4)


def test_cancel_while_validating_or_queued_is_immediate(org_a, default_model, pirate_file_of_a,
                                                         django_capture_on_commit_callbacks):
    job = create_job(org_a, model="SmolLM2-135M-Instruct", training_file=pirate_file_of_a).json()
    with django_capture_on_commit_callbacks(execute=False):
        response = bearer(org_a.owner_key).post(f"/v1/fine_tuning/jobs/{job['id']}/cancel")
    assert response.status_code == 200 and response.json()["status"] == "cancelled"
    assert response.json()["finished_at"] is not None
    again = bearer(org_a.owner_key).post(f"/v1/fine_tuning/jobs/{job['id']}/cancel")
    assert again.status_code == 409 and again.json()["error"]["code"] == "job_finished"


def test_a_file_used_by_an_active_job_cannot_be_deleted(org_a, default_model, pirate_file_of_a):
    job = create_job(org_a, model="SmolLM2-135M-Instruct", training_file=pirate_file_of_a).json()
    response = bearer(org_a.owner_key).delete(f"/v1/files/{pirate_file_of_a}")
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "file_in_use" and job["id"] in response.json()["error"]["message"]
    FineTuningJob.objects.filter(id=job["id"]).update(status="succeeded")
    assert bearer(org_a.owner_key).delete(f"/v1/files/{pirate_file_of_a}").status_code == 200


def test_a_viewer_cannot_create_or_cancel(org_a, viewer_of_a, default_model, pirate_file_of_a):
    from tests.conftest import key_for

    key = key_for(org_a, viewer_of_a, ["read"])
    response = bearer(key).post("/v1/fine_tuning/jobs", {"model": "SmolLM2-135M-Instruct",
                                                         "training_file": pirate_file_of_a}, format="json")
    assert response.status_code == 403
    job = create_job(org_a, model="SmolLM2-135M-Instruct", training_file=pirate_file_of_a).json()
    assert bearer(key).post(f"/v1/fine_tuning/jobs/{job['id']}/cancel").status_code == 403
    assert bearer(key).get(f"/v1/fine_tuning/jobs/{job['id']}").status_code == 200


@pytest.mark.parametrize("metadata,param", [
    ({f"k{i}": "v" for i in range(17)}, "metadata"),
    ({"k" * 65: "v"}, "metadata"),
    ({"k": "v" * 513}, "metadata.k"),
    ({"k": {"nested": 1}}, "metadata.k"),
])
def test_job_metadata_has_openais_limits(org_a, metadata, param):
    from tuneplex.finetuning.models import FineTuningJob

    response = bearer(org_a.owner_key).post("/v1/fine_tuning/jobs", {
        "model": "SmolLM2-135M-Instruct", "training_file": "file-x", "metadata": metadata},
        format="json")
    assert response.status_code == 400, response.content
    assert response.json()["error"]["param"] == param
    assert not FineTuningJob.objects.filter(organization=org_a.organization).exists()


def test_training_curves_are_a_conflict_until_an_attempt_stored_them(org_a, default_model,
                                                                      pirate_file_of_a, tmp_path):
    from jobs.training.tensorboard import EventWriter
    from tuneplex.core.storage import upload_file
    from tuneplex.core.storage_layout import tensorboard_prefix

    job_id = create_job(org_a, model="SmolLM2-135M-Instruct", training_file=pirate_file_of_a).json()["id"]
    client = bearer(org_a.owner_key)
    early = client.get(f"/v1/fine_tuning/jobs/{job_id}/tensorboard")
    assert early.status_code == 409 and early.json()["error"]["code"] == "no_training_curves"
    with EventWriter(tmp_path, suffix="a1") as events:
        events.scalars(1, {"train/loss": 2.0})
    job = FineTuningJob.objects.get(id=job_id)
    upload_file(events.path, f"{tensorboard_prefix(job.organization_id, job.id)}/{events.path.name}")
    download = client.get(f"/v1/fine_tuning/jobs/{job_id}/tensorboard")
    assert download.status_code == 200 and download["Content-Type"] == "application/zip"
    import io
    import zipfile

    archive = zipfile.ZipFile(io.BytesIO(b"".join(download.streaming_content)))
    assert archive.namelist() == [f"{job_id}/{events.path.name}"]
    assert archive.read(archive.namelist()[0]) == events.path.read_bytes()


def test_an_organization_cannot_queue_more_jobs_than_its_limit(org_a, org_b, default_model,
                                                               pirate_file_of_a, settings):
    settings.ORG_MAX_QUEUED_JOBS = 2
    body = {"model": default_model.name, "training_file": pirate_file_of_a}
    assert [create_job(org_a, **body).status_code for _ in range(2)] == [200, 200]
    refused = create_job(org_a, **body)
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "too_many_queued_jobs"
    assert FineTuningJob.objects.filter(organization=org_a.organization).count() == 2
    FineTuningJob.objects.filter(organization=org_a.organization).update(status="running")
    assert create_job(org_a, **body).status_code == 200  # running jobs do not wait


@pytest.mark.parametrize("field,value", [("training_file", 5), ("suffix", 7), ("seed", "1"),
                                         ("seed", True), ("model", ["x"])])
def test_fields_of_the_wrong_json_type_are_refused_not_coerced(org_a, default_model,
                                                               pirate_file_of_a, field, value):
    """Before, DRF turned 5 into "5" and "1" into 1: the schema said no, the server said yes."""
    body = {"model": default_model.name, "training_file": pirate_file_of_a, field: value}
    refused = create_job(org_a, **body)
    assert refused.status_code == 400
    assert (refused.json()["error"]["code"], refused.json()["error"]["param"]) == ("invalid_type", field)
    assert not FineTuningJob.objects.filter(organization=org_a.organization).exists()
