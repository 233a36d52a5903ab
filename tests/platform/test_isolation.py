"""Tenant isolation, driven by the OpenAPI schema so every new endpoint is covered.

For every path with an object id, a caller of organization A (an all-scope key, and a signed-in
owner) gets 404 in the error shape for B's object, and B's object is left unchanged. Every list
A can read contains none of B's ids. A new path with an id fails this test until it is added to
OBJECT_OF_B (or GLOBAL_PATHS, for objects shared by all organizations).
"""

from __future__ import annotations

import json
import re

import pytest
from rest_framework.test import APIClient

from tests.conftest import Tenant, bearer
from tests.fixtures.datasets import good_chat
from tuneplex.apikeys.models import ApiKey
from tuneplex.files.models import File
from tuneplex.tenancy.models import Membership

GLOBAL_PATHS = {"/v1/base_models/{name}"}

OBJECT_OF_B = {
    "/v1/organization/members/{id}": lambda b: Membership.objects.get(
        organization=b.organization, user=b.owner).id,
    "/v1/api_keys/{id}": lambda b: ApiKey.objects.filter(organization=b.organization).first().id,
    "/v1/api_keys/{id}/revoke": lambda b: ApiKey.objects.filter(
        organization=b.organization).first().id,
    "/v1/organization/invitations/{id}/revoke": lambda b: _invitation_of_b(b),
}


def _invitation_of_b(b: Tenant) -> str:
    from tuneplex.tenancy.models import Invitation
    from tuneplex.tenancy.services import invitation_create

    existing = Invitation.objects.filter(organization=b.organization).first()
    if existing is not None:
        return existing.id
    return invitation_create(organization=b.organization, actor=b.principal(),
                             invitee="someone@b.example", role="member",
                             base_url="http://b.example").invitation.id


def _file_of_b(b: Tenant) -> str:
    existing = File.objects.filter(organization=b.organization).first()
    if existing is not None:
        return existing.id
    from django.core.files.uploadedfile import SimpleUploadedFile

    response = bearer(b.owner_key).post(
        "/v1/files", {"file": SimpleUploadedFile("b.jsonl", good_chat()), "purpose": "fine-tune"},
        format="multipart")
    return response.json()["id"]


def _job_of_b(b: Tenant) -> str:
    from tuneplex.basemodels.models import BaseModel
    from tuneplex.finetuning.models import FineTuningJob

    existing = FineTuningJob.objects.filter(organization=b.organization).first()
    if existing is not None:
        return existing.id
    base = BaseModel.objects.get_or_create(name="iso-model", defaults=dict(
        directory="/nonexistent", parameter_count=1, max_sequence_length=16,
        has_chat_template=True))[0]
    job = FineTuningJob.objects.create(organization=b.organization, base_model=base,
                                       training_file=_file_of_b(b), seed=1, status="running")
    job.events.create(message="hello from B")
    job.checkpoints.create(step=1, blob_prefix="orgs/x/jobs/y/checkpoints/step-1-a1")
    return job.id


def _adapter_of_b(b: Tenant) -> str:
    from tuneplex.adapters.models import Adapter
    from tuneplex.finetuning.models import FineTuningJob

    existing = Adapter.objects.filter(organization=b.organization).first()
    if existing is not None:
        return existing.id
    job = FineTuningJob.objects.get(id=_job_of_b(b))
    return Adapter.objects.create(organization=b.organization, job=job, base_model=job.base_model,
                                  name=f"ft:iso:{b.organization.slug}::x", blob_prefix="x",
                                  sha256="0" * 64, bytes=1, rank=8).id


OBJECT_OF_B.update({
    "/v1/files/{id}": _file_of_b,
    "/v1/files/{id}/content": _file_of_b,
    "/v1/fine_tuning/jobs/{id}": _job_of_b,
    "/v1/fine_tuning/jobs/{id}/cancel": _job_of_b,
    "/v1/fine_tuning/jobs/{id}/pause": _job_of_b,
    "/v1/fine_tuning/jobs/{id}/resume": _job_of_b,
    "/v1/fine_tuning/jobs/{id}/events": _job_of_b,
    "/v1/fine_tuning/jobs/{id}/checkpoints": _job_of_b,
    "/v1/fine_tuning/jobs/{id}/tensorboard": _job_of_b,
    "/v1/fine_tuning/jobs/{id}/wandb": _job_of_b,
    "/v1/adapters/{id}": _adapter_of_b,
    "/v1/adapters/{id}/download": _adapter_of_b,
    "/v1/adapters/{id}/merge": _adapter_of_b,
    "/v1/adapters/{id}/deploy": _adapter_of_b,
    "/v1/adapters/{id}/undeploy": _adapter_of_b,
    "/v1/models/{model}": lambda b: _deployed_adapter_of_b(b),
    "/v1/uploads/{id}/parts": lambda b: _upload_of_b(b),
    "/v1/uploads/{id}/complete": lambda b: _upload_of_b(b),
    "/v1/uploads/{id}/cancel": lambda b: _upload_of_b(b),
})


def _upload_of_b(b: Tenant) -> str:
    from tuneplex.files.models import Upload

    existing = Upload.objects.filter(organization=b.organization).first()
    if existing is not None:
        return existing.id
    response = bearer(b.owner_key).post("/v1/uploads", {
        "bytes": 10, "filename": "b.jsonl", "mime_type": "text/jsonl", "purpose": "fine-tune"},
        format="json")
    return response.json()["id"]


def _eval_of_b(b: Tenant):
    from tuneplex.evals.models import Eval

    return Eval.objects.filter(organization=b.organization).first() or Eval.objects.create(
        organization=b.organization, name="b's eval", testing_criteria=[],
        data_source_config={"type": "custom", "item_schema": {}, "include_sample_schema": False})


def _run_of_b(b: Tenant):
    from tuneplex.evals.models import EvalOutputItem, EvalRun

    made = _eval_of_b(b)
    run = EvalRun.objects.filter(eval=made).first()
    if run is None:
        run = EvalRun.objects.create(organization=b.organization, eval=made, items_blob="x",
                                     data_source={"type": "jsonl"})
        EvalOutputItem.objects.create(organization=b.organization, run=run, datasource_item_id=0,
                                      datasource_item={}, sample={}, results=[], status="pass")
    return run


def _gate_of_b(b: Tenant) -> str:
    from tuneplex.evals.models import DeployGate

    existing = DeployGate.objects.filter(organization=b.organization).first()
    if existing is not None:
        return existing.id
    job = _job_of_b(b)
    from tuneplex.finetuning.models import FineTuningJob

    return DeployGate.objects.create(organization=b.organization, eval=_eval_of_b(b),
                                     base_model=FineTuningJob.objects.get(id=job).base_model,
                                     data_source={}, criterion="x").id


OBJECT_OF_B.update({
    "/v1/evals/{eval_id}": lambda b: _eval_of_b(b).id,
    "/v1/evals/{eval_id}/runs": lambda b: _eval_of_b(b).id,
    "/v1/evals/{eval_id}/runs/{run_id}": lambda b: (_eval_of_b(b).id, _run_of_b(b).id),
    "/v1/evals/{eval_id}/runs/{run_id}/cancel": lambda b: (_eval_of_b(b).id, _run_of_b(b).id),
    "/v1/evals/{eval_id}/runs/{run_id}/output_items": lambda b: (_eval_of_b(b).id, _run_of_b(b).id),
    "/v1/evals/{eval_id}/runs/{run_id}/output_items/{output_item_id}": lambda b: (
        _eval_of_b(b).id, _run_of_b(b).id, _run_of_b(b).output_items.first().id),
    "/v1/deploy_gates/{gate_id}": _gate_of_b,
    "/v1/sweeps/{sweep_id}": lambda b: _sweep_of_b(b),
    "/v1/sweeps/{sweep_id}/cancel": lambda b: _sweep_of_b(b),
})


def _batch_of_b(b: Tenant) -> str:
    from tuneplex.batches.models import Batch

    existing = Batch.objects.filter(organization=b.organization).first()
    return existing.id if existing is not None else Batch.objects.create(
        organization=b.organization, input_file_id=_file_of_b(b),
        endpoint="/v1/chat/completions", expires_at="2999-01-01T00:00:00Z").id


OBJECT_OF_B.update({
    "/v1/batches/{batch_id}": _batch_of_b,
    "/v1/batches/{batch_id}/cancel": _batch_of_b,
})


def _export_of_b(b: Tenant) -> tuple[str, str]:
    """(B's adapter, its export), the export succeeded (its content downloadable by B)."""
    from tuneplex.exports.models import Export

    adapter_id = _adapter_of_b(b)
    existing = Export.objects.filter(adapter_id=adapter_id).first()
    export = existing or Export.objects.create(
        organization=b.organization, adapter_id=adapter_id, format="gguf-lora",
        quantization="f16", needs_merge=False, status="succeeded", blob_name="x")
    return adapter_id, export.id


OBJECT_OF_B.update({
    "/v1/adapters/{id}/exports": _adapter_of_b,
    "/v1/adapters/{id}/exports/{export_id}": _export_of_b,
    "/v1/adapters/{id}/exports/{export_id}/content": _export_of_b,
})


def _sweep_of_b(b: Tenant) -> str:
    from tuneplex.sweeps.models import Sweep

    existing = Sweep.objects.filter(organization=b.organization).first()
    return existing.id if existing is not None else Sweep.objects.create(
        organization=b.organization, model="iso-model", training_file=_file_of_b(b),
        search_space={"lora_rank": {"type": "categorical", "choices": [4]}}, sampler="random",
        pruner="none", max_trials=1, seed=1).id
# The inference endpoints answer in OpenAI's words: a model you may not use "does not exist".
NOT_FOUND_CODES = {"/v1/models/{model}": "model_not_found"}


def _deployed_adapter_of_b(b: Tenant) -> str:
    from tuneplex.adapters.models import Adapter

    Adapter.objects.filter(id=_adapter_of_b(b)).update(deployed=True)
    return Adapter.objects.get(id=_adapter_of_b(b)).name

BODIES = {"patch": {"role": "viewer"}, "post": {}, "put": {}}


def _schema(client: APIClient) -> dict:
    response = client.get("/v1/openapi.json")
    assert response.status_code == 200
    return json.loads(response.content)


def _object_operations(schema: dict) -> list[tuple[str, str]]:
    operations = []
    for path, item in schema["paths"].items():
        if "{" not in path or path in GLOBAL_PATHS:
            continue
        for method in item:
            if method in ("get", "post", "put", "patch", "delete"):
                operations.append((path, method))
    return operations


def _b_snapshot(b: Tenant) -> list:
    return [
        sorted(Membership.objects.filter(organization=b.organization).values_list("id", "role")),
        sorted(ApiKey.objects.filter(organization=b.organization).values_list("id", "revoked_at")),
        sorted(File.objects.filter(organization=b.organization).values_list("id", "bytes")),
        sorted(b.organization.finetuning_jobs.values_list("id", "status", "cancel_requested",
                                                          "pause_requested")),
        sorted(b.organization.adapters.values_list("id", "merge_status", "deployed", "pinned")),
        sorted(b.organization.evals.values_list("id", "name", "metadata")),
        sorted(b.organization.eval_runs.values_list("id", "status", "cancel_requested")),
        sorted(b.organization.deploy_gates.values_list("id", "enabled")),
        sorted(b.organization.batches.values_list("id", "status", "cancelling_at")),
        sorted(b.organization.uploads.values_list("id", "status", "completion_attempt")),
        sorted(b.organization.exports.values_list("id", "status")),
    ]


def _signed_in(a: Tenant) -> APIClient:
    client = APIClient()
    client.force_login(a.owner)
    return client


@pytest.mark.django_db
def test_every_object_path_is_covered(org_a):
    paths = {path for path, _ in _object_operations(_schema(bearer(org_a.owner_key)))}
    missing = sorted(paths - set(OBJECT_OF_B))
    assert not missing, f"add these paths to OBJECT_OF_B or GLOBAL_PATHS: {missing}"


@pytest.mark.django_db
@pytest.mark.parametrize("as_session", [False, True], ids=["api-key", "session"])
def test_a_caller_of_a_gets_404_for_every_object_of_b(org_a, org_b, as_session):
    client = _signed_in(org_a) if as_session else bearer(org_a.owner_key)
    operations = _object_operations(_schema(bearer(org_a.owner_key)))
    assert len(operations) >= 5
    _deployed_adapter_of_b(org_b)
    # made before B's snapshot
    _run_of_b(org_b), _gate_of_b(org_b), _sweep_of_b(org_b), _upload_of_b(org_b)
    _batch_of_b(org_b), _export_of_b(org_b)  # made before B's snapshot too
    before = _b_snapshot(org_b)
    for path, method in operations:
        ids = OBJECT_OF_B[path](org_b)  # one id, or one per placeholder, in order
        ids = iter(ids if isinstance(ids, tuple) else (ids,) * path.count("{"))
        url = re.sub(r"\{[^}]+\}", lambda _: next(ids), path)
        kwargs = {"format": "json"} if method in BODIES else {}
        if method in BODIES:
            kwargs["data"] = BODIES[method]
        response = getattr(client, method)(url, **kwargs)
        assert response.status_code == 404, (method, path, response.status_code, response.content)
        error = response.json()["error"]
        assert error["code"] == NOT_FOUND_CODES.get(path, "not_found") and error["message"]
    assert _b_snapshot(org_b) == before


@pytest.mark.django_db
def test_no_list_shows_rows_of_b(org_a, org_b):
    client = bearer(org_a.owner_key)
    # Give B some history of its own.
    bearer(org_b.owner_key).post("/v1/api_keys", {"name": "b's second"}, format="json")
    ids_of_b = {org_b.organization.id}
    ids_of_b |= set(Membership.objects.filter(organization=org_b.organization).values_list("id", flat=True))
    ids_of_b |= set(ApiKey.objects.filter(organization=org_b.organization).values_list("id", flat=True))
    ids_of_b.add(_file_of_b(org_b))
    ids_of_b.add(_job_of_b(org_b))
    ids_of_b.add(_adapter_of_b(org_b))
    ids_of_b.add(_batch_of_b(org_b))
    from tuneplex.feedback.models import Feedback

    ids_of_b.add(Feedback.objects.create(organization=org_b.organization, model="m", rating=1,
                                         messages=[{"role": "user", "content": "b"}]).id)
    schema = _schema(client)
    lists = [p for p, item in schema["paths"].items() if "{" not in p and "get" in item
             and p not in ("/v1/openapi.json", "/v1/docs")]
    assert "/v1/api_keys" in lists and "/v1/audit_events" in lists and "/v1/feedback" in lists
    for path in lists:
        response = client.get(path)
        assert response.status_code == 200, (path, response.content)
        text = response.content.decode()
        leaked = [i for i in ids_of_b if i in text]
        assert not leaked, f"{path} shows B's ids {leaked}"
        assert org_b.organization.name not in text
