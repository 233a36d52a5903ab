"""Downloads of exports (and every blob download): Range requests answered with exactly those
bytes on the filesystem and on a real S3 server (moto's), and a 2 GiB artifact through a real
web process (uvicorn) in bounded memory, a range of it read without the bytes before it."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest
from django.core.files.base import ContentFile

from tests.conftest import GatewayProcess, bearer
from tests.exports.conftest import stored_adapter
from tests.platform.test_downloads import fetch, peak_growth, register_file, sparse_blob
from tuneplex.core.downloads import RangeNotSatisfiable, byte_range
from tuneplex.core.storage import artifact_storage
from tuneplex.core.storage_layout import export_prefix
from tuneplex.exports.models import Export

MiB = 2**20
CONTENT = os.urandom(3 * MiB + 5)  # more than one chunk, not a multiple of one


def succeeded_export(tenant, adapter, size: int) -> Export:
    export = Export.objects.create(organization=tenant.organization, adapter=adapter,
                                   format="gguf-lora", quantization="f16", needs_merge=False,
                                   status="succeeded", bytes=size, sha256="0" * 64,
                                   filename="adapter.gguf")
    export.blob_name = f"{export_prefix(tenant.organization.id, export.id)}/adapter.gguf"
    export.save()
    return export


@pytest.mark.parametrize(("header", "size", "expected"), [
    ("", 10, None), ("bytes=0-3", 10, (0, 3)), ("bytes=4-", 10, (4, 9)), ("bytes=-3", 10, (7, 9)),
    ("bytes=-30", 10, (0, 9)), ("bytes=2-99", 10, (2, 9)), ("bytes=9-9", 10, (9, 9)),
    ("bytes=5-3", 10, None), ("bytes=0-1,4-5", 10, None), ("items=0-3", 10, None),
    ("bytes=-", 10, None), ("bytes=a-b", 10, None),
])
def test_a_range_header_is_read_as_rfc_9110_says(header, size, expected):
    assert byte_range(header, size) == expected


@pytest.mark.parametrize(("header", "size"), [("bytes=10-", 10), ("bytes=-0", 10),
                                              ("bytes=0-", 0), ("bytes=-5", 0)])
def test_a_range_past_the_end_is_not_satisfiable(header, size):
    with pytest.raises(RangeNotSatisfiable):
        byte_range(header, size)


@pytest.fixture(params=["filesystem", "s3"])
def storage_kind(request):
    if request.param == "s3":
        request.getfixturevalue("s3_artifacts")
    return request.param


@pytest.mark.django_db
def test_a_range_request_gets_exactly_those_bytes(storage_kind, org_a, org_b, base_model,
                                                  tmp_path):
    export = succeeded_export(org_a, stored_adapter(org_a, base_model, tmp_path), len(CONTENT))
    artifact_storage().save(export.blob_name, ContentFile(CONTENT))
    url = f"/v1/adapters/{export.adapter_id}/exports/{export.id}/content"
    client = bearer(org_a.owner_key)
    size = len(CONTENT)

    def get(header: str | None):
        response = client.get(url, **({"HTTP_RANGE": header} if header else {}))
        body = b"".join(response.streaming_content) if response.streaming else response.content
        return response, body

    whole, body = get(None)
    assert whole.status_code == 200 and body == CONTENT
    assert whole["Accept-Ranges"] == "bytes" and whole["Content-Length"] == str(size)
    for header, first, last in (("bytes=0-99", 0, 99), (f"bytes={MiB - 3}-{MiB + 6}", MiB - 3, MiB + 6),
                                (f"bytes={2 * MiB}-", 2 * MiB, size - 1),
                                ("bytes=-11", size - 11, size - 1),
                                (f"bytes=100-{10 * size}", 100, size - 1)):
        response, body = get(header)
        assert response.status_code == 206, header
        assert body == CONTENT[first:last + 1], header
        assert response["Content-Range"] == f"bytes {first}-{last}/{size}", header
        assert response["Content-Length"] == str(last - first + 1)
        assert response["Accept-Ranges"] == "bytes"
    several, body = get("bytes=0-1,5-6")  # several ranges: the whole
    assert several.status_code == 200 and body == CONTENT
    past, _ = get(f"bytes={size}-")
    assert past.status_code == 416 and past["Content-Range"] == f"bytes */{size}"
    assert past.json()["error"]["code"] == "range_not_satisfiable"
    # Another organization gets nothing of it, ranged or not.
    other = bearer(org_b.owner_key).get(url, HTTP_RANGE="bytes=0-9")
    assert other.status_code == 404 and "Content-Range" not in other


@pytest.mark.django_db
def test_a_dataset_download_takes_a_range_too(storage_kind, org_a):
    content = b'{"text": "Ahoy"}\n' * 1000
    file = register_file(org_a, len(content))
    artifact_storage().save(file.blob_name, ContentFile(content))
    response = bearer(org_a.owner_key).get(f"/v1/files/{file.id}/content",
                                           HTTP_RANGE="bytes=17-33")
    assert response.status_code == 206
    assert b"".join(response.streaming_content) == content[17:34]


# --- through a real web process ---------------------------------------------------------------

TWO_GIB = 2 * 2**30 + 3 * MiB + 7
BOUND = 64 * MiB  # the most a download may add to the web process's peak memory
TAIL = b"the last bytes of the artifact"


def _read_bytes(pid: int) -> int:
    """What the process has read so far (files, pipes, sockets): /proc/<pid>/io's rchar."""
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar")


@pytest.mark.e2e
@pytest.mark.django_db(transaction=True)
def test_a_two_gibibyte_export_streams_through_bounded_memory_and_ranges(
        test_database_url, org_a, org_b, base_model, tmp_path):
    export = succeeded_export(org_a, stored_adapter(org_a, base_model, tmp_path), TWO_GIB)
    path = sparse_blob(export.blob_name, TWO_GIB)
    with path.open("r+b") as handle:
        handle.seek(TWO_GIB - len(TAIL))
        handle.write(TAIL)
    web = GatewayProcess(database_url=test_database_url, engine=None)
    url = f"{web.url}/v1/adapters/{export.adapter_id}/exports/{export.id}/content"
    key = {"Authorization": f"Bearer {org_a.owner_key}"}
    try:
        growth, (response, read, _) = peak_growth(web.process.pid,
                                                  lambda: fetch(url, org_a.owner_key))
        assert response.status_code == 200
        assert read == TWO_GIB == int(response.headers["Content-Length"])
        assert response.headers["Accept-Ranges"] == "bytes"
        assert growth < BOUND, f"the web process grew by {growth / MiB:.0f} MiB"
        # A resumed download: the last bytes only, read from their offset (not the 2 GiB before).
        before = _read_bytes(web.process.pid)
        tail = httpx.get(url, headers={**key, "Range": f"bytes=-{len(TAIL)}"}, timeout=60)
        assert _read_bytes(web.process.pid) - before < 16 * MiB
        assert tail.status_code == 206 and tail.content == TAIL
        assert tail.headers["Content-Range"] == (f"bytes {TWO_GIB - len(TAIL)}-{TWO_GIB - 1}/"
                                                 f"{TWO_GIB}")
        other = httpx.get(url, headers={"Authorization": f"Bearer {org_b.owner_key}"})
        assert other.status_code == 404
    finally:
        web.stop()
        path.unlink()
