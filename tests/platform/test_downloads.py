"""Downloads leave a real web process (uvicorn) in bounded chunks, or as a redirect to the
bucket: the process's memory does not grow with the file, however large, and another
organization's file is a 404.

The memory is the kernel's own account of the server process: its peak resident set (VmHWM),
reset just before each download (``/proc/<pid>/clear_refs``), against its resident set then.
"""

from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path

import httpx
import pytest
from django.conf import settings

from tests.conftest import GatewayProcess, wait_for
from tuneplex.files.models import File
from tuneplex.files.services import blob_name_for

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

MiB = 2**20
BIG = 2**30 + 3 * MiB + 7  # over 1 GiB, not a multiple of any chunk
BOUND = 100 * MiB  # the most a download may add to the web process's peak memory


def _kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def peak_growth(pid: int, download) -> tuple[int, object]:
    """(how far the process's peak resident memory rose above its resident memory, in bytes,
    while ``download()`` ran; what it returned)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # the peak starts again from now
    before = _kib(pid, "VmRSS")
    assert _kib(pid, "VmHWM") - before < 1024, "the peak was not reset"
    result = download()
    return (_kib(pid, "VmHWM") - before) * 1024, result


def sparse_blob(name: str, size: int) -> Path:
    """A file of ``size`` bytes in local artifact storage that costs no disk (a hole, zeros)."""
    path = Path(settings.ARTIFACTS_DIR) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as handle:
        handle.truncate(size)
    return path


def register_file(tenant, size: int, blob: str | None = None) -> File:
    file = File(organization=tenant.organization, filename="big.jsonl", purpose="fine-tune",
                bytes=size, sha256="0" * 64, status=File.Status.PROCESSED)
    file.blob_name = blob or blob_name_for(tenant.organization, file.id)
    file.save()
    return file


def fetch(url: str, key: str) -> tuple[httpx.Response, int, bytes]:
    """GET ``url`` and read the body as it comes: (response, bytes read, the first 64 KiB)."""
    read, head = 0, b""
    with httpx.stream("GET", url, headers={"Authorization": f"Bearer {key}"},
                      timeout=120) as response:
        for chunk in response.iter_raw(MiB):
            if len(head) < 65536:
                head += chunk[: 65536 - len(head)]
            read += len(chunk)
    return response, read, head


@pytest.fixture(scope="module")
def web(test_database_url):
    process = GatewayProcess(database_url=test_database_url, engine=None)
    try:
        yield process
    finally:
        process.stop()


def test_a_file_over_a_gibibyte_streams_through_bounded_memory(web, org_a, org_b):
    file = register_file(org_a, BIG)
    path = sparse_blob(file.blob_name, BIG)
    try:
        growth, (response, read, _) = peak_growth(web.process.pid, lambda: fetch(
            f"{web.url}/v1/files/{file.id}/content", org_a.owner_key))
        assert response.status_code == 200
        assert read == BIG == int(response.headers["Content-Length"])
        assert response.headers["Content-Disposition"] == 'attachment; filename="big.jsonl"'
        assert growth < BOUND, f"the web process grew by {growth / MiB:.0f} MiB"
        # The same file is not there for another organization.
        other = httpx.get(f"{web.url}/v1/files/{file.id}/content",
                          headers={"Authorization": f"Bearer {org_b.owner_key}"})
        assert other.status_code == 404 and other.json()["error"]["code"] == "not_found"
    finally:
        path.unlink()


def open_by(pid: int, path: Path) -> bool:
    """Whether process ``pid`` holds ``path`` open."""
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            if Path(os.readlink(fd)) == path:
                return True
        except OSError:  # closed meanwhile
            continue
    return False


def test_a_client_that_goes_away_stops_the_read(web, org_a):
    file = register_file(org_a, BIG)
    path = sparse_blob(file.blob_name, BIG)
    try:
        with httpx.stream("GET", f"{web.url}/v1/files/{file.id}/content", timeout=60,
                          headers={"Authorization": f"Bearer {org_a.owner_key}"}) as response:
            chunks = response.iter_raw(MiB)  # kept: dropping it would close the connection
            assert response.status_code == 200 and len(next(chunks)) > 0
            assert open_by(web.process.pid, path)  # being read
        wait_for(lambda: not open_by(web.process.pid, path), timeout=10,
                 message="the web process to close the blob of a download nobody reads")
    finally:
        path.unlink()


def _adapter_of(tenant, blob_prefix: str):
    from tuneplex.adapters.models import Adapter
    from tuneplex.basemodels.models import BaseModel
    from tuneplex.finetuning.models import FineTuningJob

    base = BaseModel.objects.get_or_create(name="downloads-model", defaults=dict(
        directory="/nonexistent", parameter_count=1, max_sequence_length=16,
        has_chat_template=True))[0]
    dataset = register_file(tenant, 1)
    job = FineTuningJob.objects.create(organization=tenant.organization, base_model=base,
                                       training_file=dataset.id, seed=1, status="succeeded")
    return Adapter.objects.create(organization=tenant.organization, job=job, base_model=base,
                                  name=f"ft:dl:{tenant.organization.slug}::x",
                                  blob_prefix=blob_prefix, sha256="0" * 64, bytes=BIG, rank=8,
                                  merge_status=Adapter.MergeStatus.SUCCEEDED)


def test_a_zip_of_blobs_over_a_gibibyte_streams_through_bounded_memory(web, org_a, org_b):
    prefix = f"orgs/{org_a.organization.id}/adapters/big"
    weights = sparse_blob(f"{prefix}/merged/model.safetensors", BIG)
    config = Path(settings.ARTIFACTS_DIR) / prefix / "merged" / "config.json"
    config.write_text('{"model_type": "llama"}')
    adapter = _adapter_of(org_a, prefix)
    try:
        growth, (response, read, head) = peak_growth(web.process.pid, lambda: fetch(
            f"{web.url}/v1/adapters/{adapter.id}/merge", org_a.owner_key))
        assert response.status_code == 200 and response.headers["Content-Type"] == "application/zip"
        assert read > BIG and head.startswith(b"PK\x03\x04")
        assert growth < BOUND, f"the web process grew by {growth / MiB:.0f} MiB"
        other = httpx.get(f"{web.url}/v1/adapters/{adapter.id}/merge",
                          headers={"Authorization": f"Bearer {org_b.owner_key}"})
        assert other.status_code == 404
    finally:
        weights.unlink()
        config.unlink()


def test_a_small_zip_is_whole_and_readable(web, org_a):
    prefix = f"orgs/{org_a.organization.id}/adapters/small"
    folder = Path(settings.ARTIFACTS_DIR) / prefix / "merged"
    folder.mkdir(parents=True)
    contents = {"config.json": b'{"a": 1}', "model.safetensors": os.urandom(3 * MiB + 5)}
    for name, data in contents.items():
        (folder / name).write_bytes(data)
    adapter = _adapter_of(org_a, prefix)
    response = httpx.get(f"{web.url}/v1/adapters/{adapter.id}/merge", timeout=60,
                         headers={"Authorization": f"Bearer {org_a.owner_key}"})
    archive = zipfile.ZipFile(io.BytesIO(response.content))
    assert {name: archive.read(name) for name in archive.namelist()} == contents


# --- an S3 bucket (moto's server) -------------------------------------------------------------


def test_an_s3_blob_streams_through_bounded_memory(s3_artifacts, test_database_url, org_a,
                                                   tmp_path):
    from tuneplex.core.storage import upload_file

    size = 256 * MiB + 5  # django-storages would hold it all in memory, twice over with Django's list
    source = tmp_path / "big.jsonl"
    with source.open("wb") as handle:
        handle.truncate(size)
    file = register_file(org_a, size)
    upload_file(source, file.blob_name)
    web = GatewayProcess(database_url=test_database_url, engine=None,
                         extra_env=s3_artifacts.environment())
    try:
        growth, (response, read, _) = peak_growth(web.process.pid, lambda: fetch(
            f"{web.url}/v1/files/{file.id}/content", org_a.owner_key))
    finally:
        web.stop()
    assert response.status_code == 200 and read == size
    assert growth < BOUND, f"the web process grew by {growth / MiB:.0f} MiB"


def test_with_s3_a_download_can_be_a_redirect_to_a_presigned_url(s3_artifacts, test_database_url,
                                                                  org_a, org_b):
    from django.core.files.base import ContentFile

    from tuneplex.core.storage import artifact_storage

    content = b'{"text": "Ahoy"}\n' * 100
    file = register_file(org_a, len(content))
    artifact_storage().save(file.blob_name, ContentFile(content))
    web = GatewayProcess(database_url=test_database_url, engine=None, extra_env={
        **s3_artifacts.environment(), "TUNEPLEX_DOWNLOAD_REDIRECT_SECONDS": "60"})
    try:
        url = f"{web.url}/v1/files/{file.id}/content"
        key = {"Authorization": f"Bearer {org_a.owner_key}"}
        response = httpx.get(url, headers=key)
        assert response.status_code == 302 and response.headers["Cache-Control"] == "no-store"
        location = response.headers["Location"]
        assert location.startswith(f"{s3_artifacts.endpoint}/{s3_artifacts.bucket}/")
        assert "Signature" in location and "Expires=" in location
        # The bucket answers the URL alone (no key of ours goes there), as an attachment.
        fetched = httpx.get(location)
        assert fetched.status_code == 200 and fetched.content == content
        assert fetched.headers["Content-Disposition"] == 'attachment; filename="big.jsonl"'
        assert fetched.headers["Content-Type"] == "application/jsonl"
        # A client that follows redirects (the openai SDK does) gets the content.
        assert httpx.get(url, headers=key, follow_redirects=True).content == content
        other = httpx.get(url, headers={"Authorization": f"Bearer {org_b.owner_key}"})
        assert other.status_code == 404 and "Location" not in other.headers
    finally:
        web.stop()
