"""Artifact storage helpers on both backends: the local folder and a real S3-compatible server."""

from __future__ import annotations

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile

from tests.conftest import bearer
from tests.fixtures.datasets import lines_to_bytes, pirate_lines
from tuneplex.core import storage
from tuneplex.files.models import File

pytestmark = pytest.mark.django_db


@pytest.fixture(params=["local", "s3"])
def backend(request, settings):
    if request.param == "s3":
        request.getfixturevalue("s3_artifacts")
    return request.param


def test_a_directory_round_trips_and_is_listed_and_deleted(backend, tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    (source / "a.bin").write_bytes(b"\x00" * (5 * 2**20 + 3))  # over one chunk
    (source / "b.json").write_text('{"b": 1}')
    prefix = f"tests/{backend}/{tmp_path.name}"
    assert storage.upload_directory(source, prefix, ["a.bin", "b.json", "missing"]) == 5 * 2**20 + 11
    assert storage.list_prefix(prefix) == [f"{prefix}/a.bin", f"{prefix}/b.json"]
    storage.upload_file(source / "b.json", f"{prefix}/a.bin")  # replaces, never renames
    target = tmp_path / "target"
    target.mkdir()
    storage.download_directory(prefix, ["a.bin", "b.json"], target)
    assert (target / "a.bin").read_text() == '{"b": 1}' and (target / "b.json").read_text() == '{"b": 1}'
    assert not [p for p in target.iterdir() if p.name.startswith(".")]  # no temporary leftovers
    storage.delete_prefix(prefix)
    assert storage.list_prefix(prefix) == []


def test_a_failed_download_leaves_no_partial_file(backend, tmp_path):
    with pytest.raises(Exception):
        storage.download_file(f"tests/{backend}/nothing-here", tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_an_upload_is_stored_validated_and_downloaded_through_the_api(backend, org_a):
    content = lines_to_bytes(pirate_lines(12))
    client = bearer(org_a.owner_key)
    created = client.post("/v1/files", {"file": SimpleUploadedFile("t.jsonl", content),
                                        "purpose": "fine-tune"}, format="multipart")
    assert created.status_code == 200, created.content
    file = File.objects.get(id=created.json()["id"])
    assert storage.artifact_storage().size(file.blob_name) == len(content)
    with storage.local_copy(file.blob_name) as path:
        assert path.read_bytes() == content
    downloaded = client.get(f"/v1/files/{file.id}/content")
    assert b"".join(downloaded.streaming_content) == content
    assert client.delete(f"/v1/files/{file.id}").status_code == 200
