"""An upload cut off mid-body leaves neither a row nor a blob (nor a spooled temporary file)."""

from __future__ import annotations

import socket
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.fixtures.datasets import good_chat
from tuneplex.files.models import File


def send_upload(url: str, key: str, content: bytes, *, send_fraction: float = 1.0) -> bytes:
    """POST ``content`` as a dataset over a raw socket (``Connection: close``), stopping after
    ``send_fraction`` of the body (1: all of it) and then ending the stream (a client cut off
    mid-body is gone: the server reads the end of its stream); then read until the server closes
    the connection, its own signal that it is done with the request. Returns what it answered
    (nothing at all when it just hung up)."""
    boundary = "tuneplexboundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nfine-tune\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"d.jsonl\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode() + content + \
        f"\r\n--{boundary}--\r\n".encode()
    parts = urlsplit(url)
    head = (f"POST /v1/files HTTP/1.1\r\nHost: {parts.netloc}\r\nAuthorization: Bearer {key}\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    reply = b""
    with socket.create_connection((parts.hostname, parts.port), timeout=60) as sock:
        sock.sendall(head + body[: int(len(body) * send_fraction)])
        if send_fraction < 1:
            sock.shutdown(socket.SHUT_WR)
        while chunk := sock.recv(65536):
            reply += chunk
    return reply


@pytest.mark.django_db(transaction=True)
def test_an_interrupted_upload_leaves_nothing_and_the_same_upload_completed_leaves_a_file(
        live_server, org_a, settings):
    uploads = Path(settings.FILE_UPLOAD_TEMP_DIR)
    blobs = Path(settings.ARTIFACTS_DIR) / "orgs" / org_a.organization.id
    before = set(uploads.iterdir())
    content = good_chat(40_000)  # megabytes: spooled to a temporary file on the way in
    cut_off = send_upload(live_server.url, org_a.owner_key, content, send_fraction=0.5)
    assert cut_off.startswith(b"HTTP/1.1 400"), cut_off[:300]  # no file arrived whole
    assert not File.objects.exists()
    assert not blobs.exists()
    assert set(uploads.iterdir()) == before
    # The positive control: the same upload, sent whole, leaves its row and its blob.
    completed = send_upload(live_server.url, org_a.owner_key, content)
    assert completed.startswith(b"HTTP/1.1 200"), completed[:300]
    file = File.objects.get()
    assert file.bytes == len(content) and any(p.is_file() for p in blobs.rglob("*"))
    assert set(uploads.iterdir()) == before
