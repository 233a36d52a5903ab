"""Files API: upload, validation report, storage, quota and size limits, delete, download."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile

from tests.conftest import bearer
from tests.fixtures.datasets import GOOD, GOOD_FORMATS, MALFORMED, TEST_MAX_LINE_BYTES, good_chat
from tuneplex.audit.models import AuditEvent
from tuneplex.files.models import File

pytestmark = pytest.mark.django_db


def upload(client, content: bytes, name: str = "data.jsonl", purpose: str = "fine-tune"):
    return client.post("/v1/files", {"file": SimpleUploadedFile(name, content), "purpose": purpose},
                       format="multipart")


def blobs(settings, organization) -> list[Path]:
    folder = Path(settings.ARTIFACTS_DIR) / "orgs" / organization.id / "files"
    return sorted(folder.glob("*")) if folder.exists() else []


@pytest.mark.parametrize("name", sorted(GOOD))
def test_good_files_of_every_format_are_processed(org_a, settings, name):
    response = upload(bearer(org_a.owner_key), GOOD[name], name=f"{name}.jsonl")
    assert response.status_code == 200, response.content
    body = response.json()
    assert body["object"] == "file" and body["id"].startswith("file-")
    assert body["status"] == "processed" and body["status_details"] is None
    assert body["format"] == GOOD_FORMATS[name]
    assert body["validation"]["valid"] and body["validation"]["examples"] == 10
    assert body["bytes"] == len(GOOD[name])
    assert body["sha256"] == hashlib.sha256(GOOD[name]).hexdigest()
    assert body["statistics_status"] == "pending"
    stored = blobs(settings, org_a.organization)
    assert len(stored) == 1 and stored[0].read_bytes() == GOOD[name]
    assert AuditEvent.objects.filter(action="file.create", object_id=body["id"]).exists()


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_each_malformed_file_gets_its_code_and_line(org_a, settings, name):
    settings.DATASET_MAX_LINE_BYTES = TEST_MAX_LINE_BYTES
    content, code, line = MALFORMED[name]
    response = upload(bearer(org_a.owner_key), content)
    assert response.status_code == 200, response.content
    body = response.json()
    assert body["status"] == "error"
    first = body["validation"]["errors"][0]
    assert (first["code"], first["line"]) == (code, line), body["validation"]
    assert first["message"] and body["validation"]["error_counts"][code] >= 1
    assert body["status_details"].startswith(f"{body['validation']['error_count']} problem(s)")
    assert body["statistics_status"] == "none"
    # Kept, with its report, for the user to read; never usable by a job.
    assert File.objects.get(id=body["id"]).validation == body["validation"]


def test_the_report_lists_the_first_errors_and_counts_all(org_a):
    lines = [b'{"messages": "no"}'] * 80 + [b'{"messages": [{"role": "x", "content": "y"}]}'] * 5
    body = upload(bearer(org_a.owner_key), b"\n".join(lines)).json()
    report = body["validation"]
    assert report["error_count"] == 85 and len(report["errors"]) == 50
    assert report["error_counts"] == {"missing_messages_list": 80, "unrecognized_role": 5}
    assert [e["line"] for e in report["errors"][:3]] == [1, 2, 3]


def test_a_file_over_the_size_limit_gets_413_and_leaves_nothing(org_a, settings):
    settings.FILE_UPLOAD_MAX_BYTES = 100_000
    response = upload(bearer(org_a.owner_key), good_chat(3000))
    assert response.status_code == 413
    error = response.json()["error"]
    assert error["code"] == "request_too_large" and "100000 bytes" in error["message"]
    assert not File.objects.exists() and not blobs(settings, org_a.organization)


def test_the_size_limit_also_holds_past_the_multipart_allowance(org_a, settings):
    content = good_chat(200)
    settings.FILE_UPLOAD_MAX_BYTES = len(content) - 1  # body fits the framing allowance
    response = upload(bearer(org_a.owner_key), content)
    assert response.status_code == 413 and response.json()["error"]["code"] == "file_too_large"
    assert not File.objects.exists() and not blobs(settings, org_a.organization)


def test_the_storage_quota_is_enforced_with_a_clear_error(org_a, settings):
    org_a.organization.storage_quota_bytes = len(good_chat()) * 2 + 10
    org_a.organization.save()
    client = bearer(org_a.owner_key)
    assert upload(client, good_chat()).status_code == 200
    assert upload(client, good_chat()).status_code == 200
    response = upload(client, good_chat())
    assert response.status_code == 403
    error = response.json()["error"]
    assert error["code"] == "storage_quota_exceeded" and "quota" in error["message"]
    assert File.objects.count() == 2 and len(blobs(settings, org_a.organization)) == 2


@pytest.mark.parametrize("fields,param", [
    ({"purpose": "fine-tune"}, "file"),
    ({"file": "not a file", "purpose": "fine-tune"}, "file"),
    ({"purpose": "assistants", "file": b"x"}, "purpose"),
])
def test_bad_form_fields_name_the_param(org_a, fields, param):
    data = dict(fields)
    if isinstance(data.get("file"), bytes):
        data["file"] = SimpleUploadedFile("d.jsonl", good_chat())
    response = bearer(org_a.owner_key).post("/v1/files", data, format="multipart")
    assert response.status_code == 400 and response.json()["error"]["param"] == param
    assert not File.objects.exists()


def test_a_json_body_is_415(org_a):
    response = bearer(org_a.owner_key).post("/v1/files", {"purpose": "fine-tune"}, format="json")
    assert response.status_code == 415


def test_odd_filenames_are_cleaned_or_refused(org_a):
    client = bearer(org_a.owner_key)
    body = upload(client, good_chat(), name="../../etc/données 🚀.jsonl").json()
    assert body["filename"] == "données 🚀.jsonl"
    # Invisible characters never reach a stored name (the multipart parser drops bidi overrides).
    assert upload(client, good_chat(), name="bad\u202ename.jsonl").json()["filename"] == "badname.jsonl"
    long_name = upload(client, good_chat(), name="n" * 300 + ".jsonl").json()["filename"]
    assert len(long_name) == 255 and long_name.endswith(".jsonl")


def test_list_retrieve_download_and_delete(org_a, settings, django_capture_on_commit_callbacks):
    client = bearer(org_a.owner_key)
    first = upload(client, GOOD["text"], name="a.jsonl").json()
    second = upload(client, GOOD["alpaca"], name="b.jsonl").json()
    listed = client.get("/v1/files?purpose=fine-tune").json()
    assert [f["id"] for f in listed["data"]] == [second["id"], first["id"]]
    # OpenAI's order, as the SDK's files.list(order=...) sends it (it was ignored: newest first).
    oldest_first = client.get("/v1/files?purpose=fine-tune&order=asc").json()
    assert [f["id"] for f in oldest_first["data"]] == [first["id"], second["id"]]
    sideways = client.get("/v1/files?order=sideways")
    assert sideways.status_code == 400 and sideways.json()["error"]["param"] == "order"
    assert client.get(f"/v1/files/{first['id']}").json()["filename"] == "a.jsonl"
    content = client.get(f"/v1/files/{first['id']}/content")
    assert content.status_code == 200 and b"".join(content.streaming_content) == GOOD["text"]
    with django_capture_on_commit_callbacks(execute=True):  # the blob goes once the row is gone
        deleted = client.delete(f"/v1/files/{first['id']}")
    assert deleted.json() == {"id": first["id"], "object": "file", "deleted": True}
    assert client.get(f"/v1/files/{first['id']}").status_code == 404
    assert [p.name for p in blobs(settings, org_a.organization)] == [f"{second['id']}.jsonl"]


def test_a_viewer_cannot_upload_or_delete(org_a, viewer_of_a):
    from tests.conftest import key_for

    key = key_for(org_a, viewer_of_a, ["read"])
    assert upload(bearer(key), good_chat()).status_code == 403
    existing = upload(bearer(org_a.owner_key), good_chat()).json()
    assert bearer(key).delete(f"/v1/files/{existing['id']}").status_code == 403
    assert bearer(key).get(f"/v1/files/{existing['id']}").status_code == 200
