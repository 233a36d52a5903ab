"""An upload cut off mid-body leaves neither a row nor a blob (nor a spooled temporary file)."""

from __future__ import annotations

import socket
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.fixtures.datasets import good_chat
from tuneplex.files.models import File


def send_partial_upload(url: str, key: str, content: bytes, *, send_fraction: float) -> None:
    boundary = "tuneplexboundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nfine-tune\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"d.jsonl\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode() + content + \
        f"\r\n--{boundary}--\r\n".encode()
    parts = urlsplit(url)
    head = (f"POST /v1/files HTTP/1.1\r\nHost: {parts.netloc}\r\nAuthorization: Bearer {key}\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
        sock.sendall(head + body[: int(len(body) * send_fraction)])
        time.sleep(0.5)
    # closed: the server sees the client disappear mid-body


@pytest.mark.django_db(transaction=True)
def test_an_interrupted_upload_leaves_nothing(live_server, org_a, settings):
    uploads = Path(settings.FILE_UPLOAD_TEMP_DIR)
    before = set(uploads.iterdir())
    send_partial_upload(live_server.url, org_a.owner_key, good_chat(40_000), send_fraction=0.5)
    time.sleep(1.5)
    assert not File.objects.exists()
    assert not (Path(settings.ARTIFACTS_DIR) / "orgs" / org_a.organization.id).exists()
    assert set(uploads.iterdir()) == before
