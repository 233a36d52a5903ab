from __future__ import annotations

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile

from tests.conftest import bearer
from tests.fixtures.datasets import lines_to_bytes, pirate_lines


def upload(tenant, content: bytes) -> str:
    response = bearer(tenant.owner_key).post(
        "/v1/files", {"file": SimpleUploadedFile("train.jsonl", content), "purpose": "fine-tune"},
        format="multipart")
    assert response.status_code == 200, response.content
    return response.json()["id"]


@pytest.fixture
def pirate_file_of_a(org_a) -> str:
    return upload(org_a, lines_to_bytes(pirate_lines(24)))


def create_job(tenant, **body):
    return bearer(tenant.owner_key).post("/v1/fine_tuning/jobs", body, format="json")
