"""Dataset statistics: computed after upload by a real Celery worker, with the base model's tokenizer."""

from __future__ import annotations

import json

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.core.management import call_command
from tokenizers import Tokenizer

from tests.conftest import bearer, wait_for
from tests.fixtures.datasets import good_chat, lines_to_bytes
from tuneplex.files.models import File
from tuneplex.files.statistics import compute_statistics


def _upload(tenant, content: bytes) -> dict:
    response = bearer(tenant.owner_key).post(
        "/v1/files", {"file": SimpleUploadedFile("d.jsonl", content), "purpose": "fine-tune"},
        format="multipart")
    assert response.status_code == 200 and response.json()["status"] == "processed"
    return response.json()


def test_text_statistics_match_hand_counts(org_a, default_model):
    texts = [f"Sentence number {i} about adapters." for i in range(9)]
    texts.append("hello " * 2500)  # longer than the model's 2048-token limit
    lines = [json.dumps({"text": t}) for t in texts]
    lines.append(json.dumps({"text": texts[0]}))  # exact duplicate
    lines.append('{"text":   "Sentence number 1 about adapters."}')  # same value, other spacing
    body = _upload(org_a, lines_to_bytes(lines))
    compute_statistics(body["id"])

    stats = bearer(org_a.owner_key).get(f"/v1/files/{body['id']}").json()
    assert stats["statistics_status"] == "ready", stats["statistics"]
    stats = stats["statistics"]
    tokenizer = Tokenizer.from_file(f"{default_model.directory}/tokenizer.json")
    lengths = sorted(len(tokenizer.encode(json.loads(line)["text"], add_special_tokens=False).ids) + 1
                     for line in lines)  # + the end-of-sequence token
    assert stats["examples"] == 12 and stats["duplicates"] == 2
    assert stats["total_tokens"] == sum(lengths) == stats["trained_tokens"]
    assert stats["token_length"]["max"] == lengths[-1] > 2048
    assert stats["token_length"]["min"] == lengths[0]
    assert stats["token_length"]["p50"] == lengths[5]  # nearest rank: ceil(0.5 * 12) = 6th
    assert stats["token_length"]["p95"] == lengths[11]  # ceil(0.95 * 12) = 12th
    assert stats["examples_over_max_length"] == 1 and stats["max_sequence_length"] == 2048
    assert sum(b["count"] for b in stats["token_length"]["histogram"]) == 12
    assert stats["role_counts"] == {} and stats["model"] == "SmolLM2-135M-Instruct"


def test_chat_statistics_count_roles_and_trained_tokens(org_a, default_model):
    lines = []
    for i in range(10):
        messages = [{"role": "user", "content": f"Question {i}?"},
                    {"role": "assistant", "content": f"Answer {i}."}]
        if i < 3:
            messages.insert(0, {"role": "system", "content": "Be brief."})
        if i == 9:
            messages += [{"role": "user", "content": "More?"},
                         {"role": "assistant", "content": "No.", "weight": 0}]
        lines.append(json.dumps({"messages": messages}))
    body = _upload(org_a, lines_to_bytes(lines))
    compute_statistics(body["id"])
    stats = File.objects.get(id=body["id"]).statistics
    assert stats["role_counts"] == {"assistant": 11, "system": 3, "user": 11}
    assert stats["duplicates"] == 0 and stats["format"] == "chat"
    # Trained tokens: each weighted answer plus its end-of-turn ("<|im_end|>" and newline).
    tokenizer = Tokenizer.from_file(f"{default_model.directory}/tokenizer.json")
    expected = sum(len(tokenizer.encode(f"Answer {i}.<|im_end|>\n", add_special_tokens=False).ids)
                   for i in range(10))
    assert stats["trained_tokens"] == expected
    assert stats["total_tokens"] > 3 * stats["trained_tokens"]


def test_a_second_delivery_does_not_recompute(org_a, default_model):
    body = _upload(org_a, good_chat())
    compute_statistics(body["id"])
    File.objects.filter(id=body["id"]).update(statistics={"sentinel": True})
    compute_statistics(body["id"])  # redelivered message: the claim fails, nothing changes
    assert File.objects.get(id=body["id"]).statistics == {"sentinel": True}


def test_statistics_fail_visibly_without_a_base_model(org_a):
    body = _upload(org_a, good_chat())
    compute_statistics(body["id"])
    row = File.objects.get(id=body["id"])
    assert row.statistics_status == "failed" and "not registered" in row.statistics["error"]


@pytest.mark.django_db(transaction=True)
def test_a_real_worker_computes_statistics_after_upload(celery_worker, org_a):
    call_command("prepare_default_model")
    body = _upload(org_a, good_chat(15))
    assert body["statistics_status"] == "pending"
    row = wait_for(lambda: File.objects.filter(id=body["id"], statistics_status="ready").first(),
                   timeout=120, message="statistics from the worker")
    assert row.statistics["examples"] == 15 and row.statistics["role_counts"]["assistant"] == 15
