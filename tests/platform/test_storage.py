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


def test_a_blob_is_read_as_a_stream_on_both_backends(backend, tmp_path):
    source = tmp_path / "lines.jsonl"
    source.write_bytes(b"".join(b'{"n": %d}\n' % i for i in range(100_000)))  # ~1 MB
    name = f"tests/{backend}/{tmp_path.name}/lines.jsonl"
    storage.upload_file(source, name)
    with storage.open_stream(name) as stream:
        assert [stream.readline() for _ in range(2)] == [b'{"n": 0}\n', b'{"n": 1}\n']
        assert stream.read() == source.read_bytes()[len(b'{"n": 0}\n{"n": 1}\n'):]
    with pytest.raises(FileNotFoundError):
        storage.open_stream(f"tests/{backend}/{tmp_path.name}/missing")
    storage.delete_blobs([name])


def test_a_preview_of_an_s3_dataset_reads_its_first_lines_not_the_whole_object(s3_artifacts,
                                                                             org_a, tmp_path):
    """django-storages' S3 file reads the whole object into memory on its first read."""
    from pathlib import Path

    from tuneplex.files.selectors import file_preview

    size = 256 * 2**20
    source = tmp_path / "big.jsonl"
    with source.open("wb") as handle:
        handle.write(b'{"text": "Ahoy"}\n' * 10)
        handle.truncate(size)  # then zeros: a hole, no disk
    file = File.objects.create(organization=org_a.organization, filename="big.jsonl",
                               purpose="fine-tune", bytes=size, sha256="0" * 64,
                               blob_name=f"tests/s3/{tmp_path.name}/big.jsonl")
    storage.upload_file(source, file.blob_name)
    status = Path("/proc/self/status")

    def kib(field: str) -> int:
        return int(next(line for line in status.read_text().splitlines()
                        if line.startswith(field)).split()[1])

    Path("/proc/self/clear_refs").write_text("5")  # the peak starts again from now
    before = kib("VmRSS:")
    preview = file_preview(file=file, limit=3)
    growth = (kib("VmHWM:") - before) * 1024
    assert [item["segments"][0]["text"] for item in preview] == ["Ahoy"] * 3
    assert growth < 64 * 2**20, f"the preview grew the process by {growth / 2**20:.0f} MiB"
    storage.delete_blobs([file.blob_name])
