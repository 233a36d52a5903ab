"""Uploads in parts (OpenAI's Uploads API) through the official `openai` SDK against a live
server: a file sent in parts, one of them cut off and sent again, completed into a validated file
that a job accepts, on local storage and on a real S3 server; the SDK's upload_file_chunked; the
refusals of complete (each naming its field, nothing stored), of another organization's upload
(404) and of a cancelled one; expiry and the beat's cleanup of parts."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlsplit

import openai
import pytest
from django.core.management import call_command
from django.db.models.functions import Now

from tests.conftest import key_for
from tests.fixtures.datasets import chat_line, good_chat, lines_to_bytes
from tuneplex.audit.models import AuditEvent
from tuneplex.core.storage import artifact_storage, list_prefix
from tuneplex.core.storage_layout import upload_prefix
from tuneplex.files.models import File, Upload, UploadPart
from tuneplex.files.upload_services import uploads_clean

pytestmark = pytest.mark.django_db(transaction=True)


def client(live_server, tenant, key: str | None = None) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live_server.url}/v1", api_key=key or tenant.owner_key,
                         max_retries=0)


def dataset(lines: int, answer_words: int = 1) -> bytes:
    return lines_to_bytes([chat_line(f"Question {i}?", " ".join(["answer"] * answer_words))
                           for i in range(lines)])


def cut(content: bytes, *sizes: int) -> list[bytes]:
    """``content`` in pieces of ``sizes`` (and the rest): mid-line, so that order matters."""
    pieces, start = [], 0
    for size in sizes:
        pieces.append(content[start:start + size])
        start += size
    return pieces + [content[start:]]


def send_part_cut_off(url: str, key: str, upload_id: str, data: bytes) -> bytes:
    """POST a part over a raw socket, stopping half way through its body (a dropped connection);
    returns what the server answered, if anything."""
    boundary = "tuneplexboundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"data\"; filename=\"data\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode() + data + \
        f"\r\n--{boundary}--\r\n".encode()
    where = urlsplit(url)
    head = (f"POST /v1/uploads/{upload_id}/parts HTTP/1.1\r\nHost: {where.netloc}\r\n"
            f"Authorization: Bearer {key}\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    reply = b""
    with socket.create_connection((where.hostname, where.port), timeout=60) as sock:
        sock.sendall(head + body[: len(body) // 2])
        sock.shutdown(socket.SHUT_WR)
        while chunk := sock.recv(65536):
            reply += chunk
    return reply


def stored_content(file_id: str) -> bytes:
    with artifact_storage().open(File.objects.get(id=file_id).blob_name, "rb") as stored:
        return stored.read()


def part_blobs(upload_id: str) -> list[str]:
    upload = Upload.objects.get(id=upload_id)
    return list_prefix(upload_prefix(upload.organization_id, upload_id))


@pytest.fixture
def base_model(db, settings):
    # The converted SmolLM2 of the shared models folder (converting it is minutes of CPU).
    shared = Path(__file__).resolve().parents[2] / "var" / "models"
    if (shared / "SmolLM2-135M-Instruct" / "config.json").exists():
        settings.MODELS_DIR = shared
    call_command("prepare_default_model")
    return "SmolLM2-135M-Instruct"


@pytest.mark.parametrize("storage", ["local", "s3"])
def test_a_file_sent_in_parts_one_of_them_again_becomes_a_file_a_job_accepts(
        live_server, org_a, base_model, storage, request):
    if storage == "s3":
        request.getfixturevalue("s3_artifacts")
    sdk = client(live_server, org_a)
    content = dataset(2400, answer_words=1500)  # about 22 MB: the S3 file is written in 3 parts
    first, second, third = cut(content, 9_000_001, 6_000_000)
    upload = sdk.uploads.create(bytes=len(content), filename="big.jsonl", mime_type="text/jsonl",
                                purpose="fine-tune")
    assert upload.object == "upload" and upload.status == "pending" and upload.file is None
    assert abs(upload.expires_at - upload.created_at - 3600) <= 1 and upload.bytes == len(content)

    part_ids = [sdk.uploads.parts.create(upload.id, data=first).id]
    # The second part's connection drops half way: nothing of it is kept ...
    reply = send_part_cut_off(live_server.url, org_a.owner_key, upload.id, second)
    assert not reply.startswith(b"HTTP/1.1 200"), reply[:300]
    assert UploadPart.objects.filter(upload_id=upload.id).count() == 1
    # ... it is sent again, and once more (the answer to the first was lost): each is a part
    lost = sdk.uploads.parts.create(upload.id, data=second)
    again = sdk.uploads.parts.create(upload.id, data=second)
    assert again.object == "upload.part" and again.upload_id == upload.id and again.id != lost.id
    part_ids += [again.id, sdk.uploads.parts.create(upload.id, data=third).id]
    assert len(part_blobs(upload.id)) == 4  # stored as they arrived

    done = sdk.uploads.complete(upload.id, part_ids=part_ids,
                                md5=hashlib.md5(content).hexdigest())
    assert done.status == "completed" and done.file is not None
    assert done.file.status == "processed" and done.file.bytes == len(content)
    assert done.file.filename == "big.jsonl" and done.file.purpose == "fine-tune"
    record = File.objects.get(id=done.file.id)
    assert record.sha256 == hashlib.sha256(content).hexdigest()
    # Its statistics are left to a worker (one of another test's may already have taken them).
    assert record.validation["examples"] == 2400
    assert record.statistics_status in ("pending", "running", "ready")
    assert stored_content(record.id) == content
    assert sdk.files.retrieve(done.file.id).status == "processed"
    # The same event as a file sent in one request, saying where it came from.
    created = AuditEvent.objects.get(action="file.create", object_id=record.id)
    assert created.metadata["upload_id"] == upload.id
    assert AuditEvent.objects.filter(action="upload.complete", object_id=upload.id).exists()

    job = sdk.fine_tuning.jobs.create(model=base_model, training_file=done.file.id,
                                      hyperparameters={"n_epochs": 1})
    assert job.status == "validating_files" and job.training_file == done.file.id

    with pytest.raises(openai.ConflictError) as raised:  # completed: no more parts
        sdk.uploads.parts.create(upload.id, data=b"more")
    assert raised.value.body["code"] == "upload_completed"
    assert len(part_blobs(upload.id)) == 4  # the positive control of the cleanup below
    assert uploads_clean()["cleaned"] == [upload.id]
    assert part_blobs(upload.id) == [] and not UploadPart.objects.filter(upload_id=upload.id)
    assert hashlib.sha256(stored_content(record.id)).hexdigest() == record.sha256  # it stays


def test_upload_file_chunked_sends_a_file_in_parts(live_server, org_a, tmp_path):
    sdk = client(live_server, org_a)
    content = good_chat(3000)
    path = tmp_path / "chunked.jsonl"
    path.write_bytes(content)
    done = sdk.uploads.upload_file_chunked(file=path, mime_type="text/jsonl",
                                           purpose="fine-tune", part_size=100_000,
                                           md5=hashlib.md5(content).hexdigest())
    assert done.status == "completed" and done.file.status == "processed"
    assert done.file.filename == "chunked.jsonl"
    assert UploadPart.objects.filter(upload_id=done.id).count() == -(-len(content) // 100_000) > 2
    assert stored_content(done.file.id) == content
    in_memory = sdk.uploads.upload_file_chunked(file=content, filename="again.jsonl",
                                                bytes=len(content), mime_type="text/jsonl",
                                                purpose="fine-tune")
    assert File.objects.get(id=in_memory.file.id).sha256 == hashlib.sha256(content).hexdigest()


def test_a_file_with_bad_lines_is_kept_with_the_report_of_a_one_request_upload(live_server, org_a):
    sdk = client(live_server, org_a)
    content = good_chat(20).replace(b'"Answer 7."', b'"Answer 7.",,')
    done = sdk.uploads.upload_file_chunked(file=content, filename="bad.jsonl", bytes=len(content),
                                           mime_type="text/jsonl", purpose="fine-tune",
                                           part_size=300)
    one_request = sdk.files.create(file=("bad.jsonl", content), purpose="fine-tune")
    assert done.file.status == one_request.status == "error"
    assert (File.objects.get(id=done.file.id).validation
            == File.objects.get(id=one_request.id).validation)
    assert File.objects.get(id=done.file.id).validation["errors"][0]["line"] == 8


def test_complete_refuses_a_wrong_total_an_unknown_or_repeated_part_and_a_wrong_md5(
        live_server, org_a):
    sdk = client(live_server, org_a)
    content = good_chat(40)
    head, tail = cut(content, 1000)
    upload = sdk.uploads.create(bytes=len(content), filename="d.jsonl", mime_type="text/jsonl",
                                purpose="fine-tune")
    one, two = (sdk.uploads.parts.create(upload.id, data=piece).id for piece in (head, tail))
    other = sdk.uploads.create(bytes=4, filename="o.jsonl", mime_type="text/jsonl",
                               purpose="fine-tune")
    theirs = sdk.uploads.parts.create(other.id, data=b"abcd").id
    refusals = [
        (dict(part_ids=[one]), "bytes_mismatch", "part_ids"),
        (dict(part_ids=[one, two, one]), "duplicate_part", "part_ids[2]"),
        (dict(part_ids=[one, "part_nosuchpart"]), "unknown_part", "part_ids[1]"),
        (dict(part_ids=[one, theirs]), "unknown_part", "part_ids[1]"),  # another upload's
        (dict(part_ids=[]), "invalid_part_ids", "part_ids"),
        (dict(part_ids=[one, two], md5="0" * 32), "md5_mismatch", "md5"),
        (dict(part_ids=[one, two], md5="not-an-md5"), "invalid_md5", "md5"),
        (dict(part_ids=[two, one]), None, None),  # the right bytes in the wrong order: invalid
    ]
    for arguments, code, param in refusals[:-1]:
        with pytest.raises(openai.BadRequestError) as raised:
            sdk.uploads.complete(upload.id, **arguments)
        assert (raised.value.body["code"], raised.value.body["param"]) == (code, param), arguments
    assert not File.objects.exists()
    assert list_prefix(f"orgs/{org_a.organization.id}/files") == []
    assert Upload.objects.get(id=upload.id).completing_since is None  # released each time
    # Out of order, the parts make a file, but not a valid one: the client's order is the file's.
    swapped = sdk.uploads.complete(upload.id, part_ids=[two, one])
    assert swapped.status == "completed" and swapped.file.status == "error"
    assert stored_content(swapped.file.id) == tail + head


def test_another_organizations_upload_is_404_and_a_read_key_may_not_upload(
        live_server, org_a, org_b):
    mine = client(live_server, org_a)
    content = good_chat(12)
    upload = mine.uploads.create(bytes=len(content), filename="a.jsonl", mime_type="text/jsonl",
                                 purpose="fine-tune")
    part = mine.uploads.parts.create(upload.id, data=content)
    theirs = client(live_server, org_b)
    for call in (lambda: theirs.uploads.parts.create(upload.id, data=b"x"),
                 lambda: theirs.uploads.complete(upload.id, part_ids=[part.id]),
                 lambda: theirs.uploads.cancel(upload.id)):
        with pytest.raises(openai.NotFoundError) as raised:
            call()
        assert raised.value.body["code"] == "not_found"
    other = theirs.uploads.create(bytes=len(content), filename="b.jsonl",
                                  mime_type="text/jsonl", purpose="fine-tune")
    with pytest.raises(openai.BadRequestError):  # A's part in B's upload: unknown
        theirs.uploads.complete(other.id, part_ids=[part.id])
    assert UploadPart.objects.filter(upload_id=upload.id).count() == 1
    reader = client(live_server, org_a, key_for(org_a, org_a.owner, ["read"]))
    with pytest.raises(openai.PermissionDeniedError):
        reader.uploads.create(bytes=1, filename="r.jsonl", mime_type="text/jsonl",
                              purpose="fine-tune")
    with pytest.raises(openai.PermissionDeniedError):
        reader.uploads.parts.create(upload.id, data=b"x")
    # Untouched by all that: A completes it.
    assert mine.uploads.complete(upload.id, part_ids=[part.id]).file.status == "processed"


def test_a_cancelled_upload_takes_no_parts_and_its_parts_are_deleted(live_server, org_a):
    sdk = client(live_server, org_a)
    content = good_chat(12)
    upload = sdk.uploads.create(bytes=len(content), filename="c.jsonl", mime_type="text/jsonl",
                                purpose="fine-tune")
    part = sdk.uploads.parts.create(upload.id, data=content)
    cancelled = sdk.uploads.cancel(upload.id)
    assert cancelled.status == "cancelled" and cancelled.file is None
    assert sdk.uploads.cancel(upload.id).status == "cancelled"  # again: nothing changes
    for call in (lambda: sdk.uploads.parts.create(upload.id, data=content),
                 lambda: sdk.uploads.complete(upload.id, part_ids=[part.id])):
        with pytest.raises(openai.ConflictError) as raised:
            call()
        assert raised.value.body["code"] == "upload_cancelled"
        assert raised.value.body["param"] == "upload_id"
    assert len(part_blobs(upload.id)) == 1  # the positive control
    assert uploads_clean()["cleaned"] == [upload.id]
    assert part_blobs(upload.id) == [] and not File.objects.exists()
    assert uploads_clean() == {"expired": 0, "cleaned": []}


def test_an_upload_expires_and_the_beat_task_deletes_its_parts(live_server, org_a, settings):
    from jobs.tasks import clean_uploads

    assert settings.CELERY_BEAT_SCHEDULE["uploads-clean"]["task"] == clean_uploads.name
    settings.UPLOAD_EXPIRY_SECONDS = 120
    sdk = client(live_server, org_a)
    content = good_chat(12)
    old, fresh = (sdk.uploads.create(bytes=len(content), filename=f"{n}.jsonl",
                                     mime_type="text/jsonl", purpose="fine-tune")
                  for n in ("old", "fresh"))
    assert abs(old.expires_at - old.created_at - 120) <= 1
    part = sdk.uploads.parts.create(old.id, data=content[:100])
    sdk.uploads.parts.create(old.id, data=content[100:])
    sdk.uploads.parts.create(fresh.id, data=content)
    Upload.objects.filter(id=old.id).update(expires_at=Now() - timedelta(seconds=1))
    # Expired by the database's clock before the cleanup has marked it.
    with pytest.raises(openai.ConflictError) as raised:
        sdk.uploads.complete(old.id, part_ids=[part.id])
    assert raised.value.body["code"] == "upload_expired"
    assert len(part_blobs(old.id)) == 2 and len(part_blobs(fresh.id)) == 1
    clean_uploads()  # the beat's task, run here
    assert Upload.objects.get(id=old.id).status == "expired" and part_blobs(old.id) == []
    assert not UploadPart.objects.filter(upload_id=old.id).exists()
    assert Upload.objects.get(id=fresh.id).status == "pending" and len(part_blobs(fresh.id)) == 1
    assert sdk.uploads.complete(fresh.id, part_ids=[p.id for p in
                                                    UploadPart.objects.filter(upload_id=fresh.id)]
                                ).status == "completed"


def test_bad_input_is_refused_naming_the_field(live_server, org_a, settings):
    sdk = client(live_server, org_a)
    good = dict(bytes=100, filename="d.jsonl", mime_type="text/jsonl", purpose="fine-tune")
    settings.UPLOAD_MAX_BYTES = 1000
    refusals = [
        (dict(bytes=0), "min_value", "bytes"),
        (dict(bytes=1001), "upload_too_large", "bytes"),
        (dict(bytes="100"), "invalid_type", "bytes"),
        (dict(purpose="assistants"), "invalid_purpose", "purpose"),
        (dict(mime_type="image/png"), "unsupported_mime_type", "mime_type"),
        (dict(filename="  "), "invalid_filename", "filename"),
        (dict(expires_after={"anchor": "created_at", "seconds": 3600}), "unsupported_parameter",
         "expires_after"),
    ]
    for change, code, param in refusals:
        with pytest.raises(openai.BadRequestError) as raised:
            sdk.uploads.create(**{**good, **change})
        assert (raised.value.body["code"], raised.value.body["param"]) == (code, param), change
    org_a.organization.storage_quota_bytes = 99
    org_a.organization.save()
    with pytest.raises(openai.PermissionDeniedError) as raised:
        sdk.uploads.create(**good)
    assert (raised.value.body["code"], raised.value.body["param"]) == ("storage_quota_exceeded",
                                                                        "bytes")
    org_a.organization.storage_quota_bytes = None
    org_a.organization.save()
    upload = sdk.uploads.create(**good)
    with pytest.raises(openai.BadRequestError) as raised:
        sdk.uploads.parts.create(upload.id, data=b"")
    assert (raised.value.body["code"], raised.value.body["param"]) == ("empty_part", "data")
    settings.UPLOAD_PART_MAX_BYTES = 50
    with pytest.raises(openai.APIStatusError) as raised:
        sdk.uploads.parts.create(upload.id, data=b"x" * 51)
    assert raised.value.status_code == 413
    assert (raised.value.body["code"], raised.value.body["param"]) == ("part_too_large", "data")
    sdk.uploads.parts.create(upload.id, data=b"x" * 50)
    sdk.uploads.parts.create(upload.id, data=b"x" * 50)
    sdk.uploads.parts.create(upload.id, data=b"x" * 50)
    sdk.uploads.parts.create(upload.id, data=b"x" * 50)
    with pytest.raises(openai.BadRequestError) as raised:  # twice its bytes are stored already
        sdk.uploads.parts.create(upload.id, data=b"x")
    assert (raised.value.body["code"], raised.value.body["param"]) == ("too_much_data", "data")
    assert UploadPart.objects.filter(upload_id=upload.id).count() == 4
    assert len(part_blobs(upload.id)) == 4  # the refused parts left no blob


# --- memory ---------------------------------------------------------------------------------------


def _kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def test_the_web_process_holds_no_whole_part_in_memory(test_database_url, org_a):
    """A 64 MiB part, and completing a 70 MB upload, under the real ASGI server: its peak
    resident memory grows by far less than a part (a buffered part alone would be 64 MiB)."""
    from tests.conftest import GatewayProcess

    server = GatewayProcess(database_url=test_database_url, engine=None)
    try:
        sdk = openai.OpenAI(base_url=f"{server.url}/v1", api_key=org_a.owner_key,
                            max_retries=0, timeout=600)
        warm = good_chat(12)  # the code paths loaded and used once before measuring
        sdk.uploads.upload_file_chunked(file=warm, filename="w.jsonl", bytes=len(warm),
                                        mime_type="text/jsonl", purpose="fine-tune",
                                        part_size=400)
        content = dataset(6700, answer_words=1500)
        big, rest = cut(content, 64 * 2**20)
        upload = sdk.uploads.create(bytes=len(content), filename="m.jsonl",
                                    mime_type="text/jsonl", purpose="fine-tune")
        pid = server.process.pid
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # peak := now
        baseline = _kib(pid, "VmHWM")
        part_ids = [sdk.uploads.parts.create(upload.id, data=piece).id for piece in (big, rest)]
        after_parts = _kib(pid, "VmHWM")
        done = sdk.uploads.complete(upload.id, part_ids=part_ids)
        after_complete = _kib(pid, "VmHWM")
        assert done.file.status == "processed" and done.file.bytes == len(content)
        growth = {"parts": after_parts - baseline, "complete": after_complete - baseline}
        print(f"peak RSS growth, KiB: {growth} (baseline {baseline})")
        assert max(growth.values()) < 24 * 1024, growth
    finally:
        server.stop()


# --- settings -------------------------------------------------------------------------------------


def _settings_with(**environment: str) -> subprocess.CompletedProcess:
    code = ("import json, django; from django.conf import settings; django.setup(); "
            "print(json.dumps([settings.UPLOAD_MAX_BYTES, settings.UPLOAD_PART_MAX_BYTES, "
            "settings.UPLOAD_EXPIRY_SECONDS]))")
    return subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[2],
                          env={**os.environ, "DJANGO_SETTINGS_MODULE": "tuneplex.settings",
                               **environment}, capture_output=True, text=True, timeout=60)


def test_the_upload_settings_take_effect_and_bad_values_are_refused():
    given = _settings_with(TUNEPLEX_UPLOAD_MAX_BYTES="2GiB", TUNEPLEX_UPLOAD_PART_MAX_BYTES="16MiB",
                           TUNEPLEX_UPLOAD_EXPIRY_SECONDS="120")
    assert given.returncode == 0, given.stderr[-2000:]
    assert json.loads(given.stdout) == [2 * 2**30, 16 * 2**20, 120]
    refused = _settings_with(TUNEPLEX_UPLOAD_EXPIRY_SECONDS="10")
    assert refused.returncode != 0
    assert "ImproperlyConfigured" in refused.stderr
    assert "TUNEPLEX_UPLOAD_EXPIRY_SECONDS" in refused.stderr
