"""End to end on the CPU: a real adapter of the embedded model exported as safetensors through
the API, by real workers on PostgreSQL and Redis: the merge it asks for on a gpu worker, then
the conversion and its check (jobs.export in the trainer's environment) on the exports queue;
the artifact downloaded, whole and in part, matches its sha256 and holds the merged model."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile

import pytest

from tests.conftest import bearer, wait_for
from tests.fixtures.adapter_rows import adapter_from_dir
from tuneplex.audit.models import AuditEvent

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


def test_a_real_adapter_is_merged_exported_checked_and_downloaded(celery_worker, gpu_workers,
                                                                  default_model, adapters,
                                                                  org_a):
    gpu_workers()
    adapter = adapter_from_dir(org_a.organization, adapters["adapter-0"], suffix="export",
                               base_model=default_model)
    client = bearer(org_a.owner_key)
    url = f"/v1/adapters/{adapter.id}/exports"
    created = client.post(url, {"format": "safetensors"}, format="json")
    assert created.status_code == 202, created.content
    export_id = created.json()["id"]

    def finished():
        body = client.get(f"{url}/{export_id}").json()
        return body if body["status"] in ("succeeded", "failed") else None

    body = wait_for(finished, timeout=900, interval=1, message=f"export {export_id}")
    assert body["status"] == "succeeded", (body["error"], celery_worker.log_path.read_text()[-3000:])
    assert client.get(f"/v1/adapters/{adapter.id}").json()["merge_status"] == "succeeded"
    assert body["progress"] == 1.0 and body["check"]["passed"] is True, body["check"]
    assert body["filename"].endswith(".tar") and body["bytes"] > 100 * 2**20  # 135M parameters

    response = client.get(f"{url}/{export_id}/content")
    assert response.status_code == 200 and response["Content-Type"] == "application/x-tar"
    data = b"".join(response.streaming_content)
    assert len(data) == body["bytes"] and hashlib.sha256(data).hexdigest() == body["sha256"]
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        names = {member.name.split("/", 1)[1] for member in archive.getmembers()
                 if member.isfile()}
        config = json.load(archive.extractfile(next(
            m for m in archive.getmembers() if m.name.endswith("/config.json"))))
    assert {"config.json", "tokenizer.json"} <= names
    assert any(name.endswith(".safetensors") for name in names), names
    assert config["model_type"] == "llama"
    part = client.get(f"{url}/{export_id}/content", HTTP_RANGE="bytes=1000-1999")
    assert part.status_code == 206 and b"".join(part.streaming_content) == data[1000:2000]
    # Asked again: the same export, already done.
    again = client.post(url, {"format": "safetensors"}, format="json")
    assert again.status_code == 200 and again.json()["id"] == export_id
    assert AuditEvent.objects.filter(action="export.create", object_id=export_id).exists()
