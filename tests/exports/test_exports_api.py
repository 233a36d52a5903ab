"""The exports API: what it refuses (a 400 naming the field), what another organization sees (a
404 for everything), one export per kind, the quota, the scopes, and an export that waits for
its adapter's merge."""

from __future__ import annotations

import pytest

from tests.conftest import bearer, key_for
from tests.exports.conftest import merged, stored_adapter
from tuneplex.adapters.models import Adapter
from tuneplex.audit.models import AuditEvent
from tuneplex.core import queue
from tuneplex.exports import services
from tuneplex.exports.models import Export
from tuneplex.exports.worker_writes import exports_after_merge
from tuneplex.files.selectors import storage_used

pytestmark = pytest.mark.django_db


def url(adapter, *rest: str) -> str:
    return "/".join([f"/v1/adapters/{adapter.id}/exports", *rest])


def post(tenant, adapter, body: dict):
    return bearer(tenant.owner_key).post(url(adapter), body, format="json")


@pytest.mark.parametrize(("body", "code", "param"), [
    ({}, "required", "format"),
    ({"format": "zip"}, "unsupported_format", "format"),
    ({"format": 5}, "invalid_type", "format"),
    ({"format": "gguf", "quantization": "q2_k"}, "unsupported_quantization", "quantization"),
    ({"format": "safetensors", "quantization": "q8_0"}, "unsupported_quantization",
     "quantization"),
    ({"format": "onnx", "quantization": "q4_0"}, "unsupported_quantization", "quantization"),
    ({"format": "gguf", "quantization": 8}, "invalid_type", "quantization"),
])
def test_a_wrong_format_or_quantization_is_refused_naming_the_field(org_a, adapter_of_a, sent,
                                                                    body, code, param):
    response = post(org_a, adapter_of_a, body)
    assert response.status_code == 400, response.content
    assert response.json()["error"]["code"] == code
    assert response.json()["error"]["param"] == param
    assert not Export.objects.exists() and sent == []


def test_an_export_of_the_adapter_alone_is_queued_for_a_worker_and_audited(
        org_a, adapter_of_a, sent, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        response = post(org_a, adapter_of_a, {"format": "gguf-lora"})
    assert response.status_code == 202, response.content
    body = response.json()
    assert body["id"].startswith("export-") and body["object"] == "adapter.export"
    assert (body["adapter_id"], body["format"], body["quantization"]) == (
        adapter_of_a.id, "gguf-lora", "f16")  # the format's default
    assert (body["status"], body["progress"], body["bytes"], body["sha256"], body["check"],
            body["error"], body["finished_at"]) == ("queued", 0.0, 0, "", None, "", None)
    assert sent == [(queue.EXPORT_RUN, body["id"])]  # no merge needed
    adapter_of_a.refresh_from_db()
    assert adapter_of_a.merge_status == Adapter.MergeStatus.NONE
    event = AuditEvent.objects.get(action="export.create")
    assert event.object_id == body["id"] and event.metadata["format"] == "gguf-lora"
    listed = bearer(org_a.owner_key).get(url(adapter_of_a)).json()
    assert listed["object"] == "list" and [e["id"] for e in listed["data"]] == [body["id"]]
    assert bearer(org_a.owner_key).get(url(adapter_of_a, body["id"])).json() == body


def test_a_format_of_the_merged_model_waits_for_the_merge_it_asks_for(
        org_a, adapter_of_a, sent, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        gguf = post(org_a, adapter_of_a, {"format": "gguf", "quantization": "q8_0"}).json()
        onnx = post(org_a, adapter_of_a, {"format": "onnx"}).json()
    adapter_of_a.refresh_from_db()
    assert adapter_of_a.merge_status == Adapter.MergeStatus.QUEUED
    assert AuditEvent.objects.filter(action="adapter.merge").count() == 1  # asked for once
    assert (gguf["status"], onnx["status"], onnx["quantization"]) == ("queued", "queued", "fp32")
    assert sent == [(queue.DISPATCH_JOBS,)], "the exports wait: only the merge is dispatched"
    sent.clear()
    # The merge ends (its worker sends exports.after_merge): both go to the exports queue.
    merged(adapter_of_a)
    exports_after_merge(adapter_of_a.id)
    assert sorted(sent) == sorted([(queue.EXPORT_RUN, gguf["id"]), (queue.EXPORT_RUN, onnx["id"])])


def test_a_failed_merge_fails_the_exports_that_waited_for_it(org_a, base_model, tmp_path, sent,
                                                             django_capture_on_commit_callbacks):
    adapter = stored_adapter(org_a, base_model, tmp_path)
    with django_capture_on_commit_callbacks(execute=True):
        created = post(org_a, adapter, {"format": "ollama"}).json()
    Adapter.objects.filter(pk=adapter.pk).update(merge_status=Adapter.MergeStatus.FAILED,
                                                 merge_error="The merge failed: out of memory")
    exports_after_merge(adapter.id)
    export = Export.objects.get(id=created["id"])
    assert export.status == "failed"
    assert export.error == "merge_failed: The merge failed: out of memory"
    assert (queue.EXPORT_RUN, export.id) not in sent


def test_the_same_kind_is_one_export_until_it_fails(org_a, adapter_of_a, sent):
    merged(adapter_of_a)
    first = post(org_a, adapter_of_a, {"format": "gguf"})
    again = post(org_a, adapter_of_a, {"format": "gguf", "quantization": "f16"})  # the default
    assert first.status_code == again.status_code == 202
    assert again.json()["id"] == first.json()["id"]
    other = post(org_a, adapter_of_a, {"format": "gguf", "quantization": "q8_0"}).json()
    assert other["id"] != first.json()["id"]
    Export.objects.filter(id=first.json()["id"]).update(status="succeeded")
    done = post(org_a, adapter_of_a, {"format": "gguf"})
    assert done.status_code == 200 and done.json()["id"] == first.json()["id"]
    Export.objects.filter(id=other["id"]).update(status="failed", error="export_error: x")
    retried = post(org_a, adapter_of_a, {"format": "gguf", "quantization": "q8_0"})
    assert retried.status_code == 202 and retried.json()["id"] != other["id"]
    assert Export.objects.count() == 3


def test_two_requests_of_one_kind_at_once_get_one_export(org_a, adapter_of_a, sent, monkeypatch):
    principal = org_a.principal()
    first, _ = services.export_create(organization=org_a.organization, actor=principal,
                                      adapter=adapter_of_a, format="gguf-lora")
    real = services.export_live
    looked: list[str] = []

    def export_live(**kind):  # the second request looked before the first was stored
        looked.append(kind["format"])
        return None if len(looked) == 1 else real(**kind)
    monkeypatch.setattr(services, "export_live", export_live)
    second, created = services.export_create(organization=org_a.organization, actor=principal,
                                             adapter=adapter_of_a, format="gguf-lora")
    assert second.id == first.id and created is False
    assert looked == ["gguf-lora", "gguf-lora"]  # before and after the refused insert
    assert Export.objects.count() == 1


def test_another_organization_gets_404_for_the_adapter_its_exports_and_their_content(
        org_a, org_b, adapter_of_a, base_model, tmp_path, sent):
    export = post(org_a, adapter_of_a, {"format": "gguf-lora"}).json()
    Export.objects.filter(id=export["id"]).update(status="succeeded")
    other = bearer(org_b.owner_key)
    for method, path in (("get", url(adapter_of_a)), ("post", url(adapter_of_a)),
                         ("get", url(adapter_of_a, export["id"])),
                         ("delete", url(adapter_of_a, export["id"])),
                         ("get", url(adapter_of_a, export["id"], "content"))):
        response = getattr(other, method)(path, {"format": "gguf-lora"} if method == "post"
                                          else None, format="json")
        assert response.status_code == 404, (method, path)
        assert response.json()["error"]["param"] == "adapter_id", (method, path)
    # Its own adapter with the other organization's export id: no such export either.
    own = stored_adapter(org_b, base_model, tmp_path)
    for method, path in (("get", url(own, export["id"])), ("delete", url(own, export["id"])),
                         ("get", url(own, export["id"], "content"))):
        response = getattr(other, method)(path)
        assert response.status_code == 404 and response.json()["error"]["param"] == "export_id"
    assert Export.objects.filter(id=export["id"], status="succeeded").exists()
    assert Export.objects.count() == 1


def test_reading_needs_read_and_creating_or_deleting_needs_train(org_a, adapter_of_a, sent):
    export = post(org_a, adapter_of_a, {"format": "gguf-lora"}).json()
    reader = bearer(key_for(org_a, org_a.owner, ["read"]))
    assert reader.get(url(adapter_of_a)).status_code == 200
    assert reader.get(url(adapter_of_a, export["id"])).status_code == 200
    assert reader.post(url(adapter_of_a), {"format": "onnx"}, format="json").status_code == 403
    assert reader.delete(url(adapter_of_a, export["id"])).status_code == 403
    assert Export.objects.count() == 1


def test_its_content_is_a_409_until_it_has_succeeded(org_a, adapter_of_a, sent):
    export = post(org_a, adapter_of_a, {"format": "gguf-lora"}).json()
    response = bearer(org_a.owner_key).get(url(adapter_of_a, export["id"], "content"))
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "export_not_ready"


def test_a_full_storage_quota_refuses_an_export(org_a, adapter_of_a, sent):
    org_a.organization.storage_quota_bytes = storage_used(organization=org_a.organization)
    org_a.organization.save()
    response = post(org_a, adapter_of_a, {"format": "gguf-lora"})
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "storage_quota_exceeded"
    assert not Export.objects.exists() and sent == []


def test_too_many_exports_in_flight_are_refused(org_a, adapter_of_a, sent, settings):
    settings.ORG_MAX_ACTIVE_EXPORTS = 1
    first = post(org_a, adapter_of_a, {"format": "gguf-lora"}).json()
    assert post(org_a, adapter_of_a, {"format": "gguf-lora"}).json()["id"] == first["id"]
    refused = post(org_a, adapter_of_a, {"format": "onnx"})
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "too_many_active_exports"
    Export.objects.filter(id=first["id"]).update(status="succeeded")
    assert post(org_a, adapter_of_a, {"format": "onnx"}).status_code == 202


def test_a_failed_export_shows_its_error_and_its_checks_figures(org_a, adapter_of_a, sent):
    export = post(org_a, adapter_of_a, {"format": "gguf-lora"}).json()
    figures = {"passed": False, "kind": "lora_effect", "changed_tokens": 0, "tokens": 64}
    Export.objects.filter(id=export["id"]).update(
        status="failed", error="check_failed: the adapter changes nothing", check_result=figures)
    body = bearer(org_a.owner_key).get(url(adapter_of_a, export["id"])).json()
    assert (body["status"], body["check"]) == ("failed", figures)
    assert body["error"] == "check_failed: the adapter changes nothing"


def test_a_succeeded_export_downloads_as_its_file(org_a, adapter_of_a, sent):
    from django.core.files.base import ContentFile

    from tuneplex.core.storage import artifact_storage
    from tuneplex.core.storage_layout import export_prefix

    merged(adapter_of_a)
    export = post(org_a, adapter_of_a, {"format": "ollama", "quantization": "q4_0"}).json()
    blob = f"{export_prefix(org_a.organization.id, export['id'])}/model.tar"
    artifact_storage().save(blob, ContentFile(b"tar bytes"))
    Export.objects.filter(id=export["id"]).update(status="succeeded", blob_name=blob,
                                                  filename="model.tar", bytes=9)
    response = bearer(org_a.owner_key).get(url(adapter_of_a, export["id"], "content"),
                                           HTTP_ACCEPT="application/binary")
    assert response.status_code == 200 and b"".join(response.streaming_content) == b"tar bytes"
    assert response["Content-Type"] == "application/x-tar"
    assert response["Content-Disposition"] == 'attachment; filename="model.tar"'
