"""Preference (DPO) datasets: validated line by line on upload, with pair statistics."""

from __future__ import annotations

import json

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile

from tests.conftest import bearer
from tests.fixtures.datasets import MALFORMED_PAIRS, lines_to_bytes, preference_line, preference_lines
from tuneplex.files.statistics import compute_statistics


def _upload(tenant, content: bytes):
    return bearer(tenant.owner_key).post(
        "/v1/files", {"file": SimpleUploadedFile("pairs.jsonl", content), "purpose": "fine-tune"},
        format="multipart")


def test_a_good_preference_file_is_processed_and_previewed_as_pairs(org_a):
    body = _upload(org_a, lines_to_bytes(preference_lines(12))).json()
    assert body["status"] == "processed" and body["format"] == "preference"
    assert body["validation"]["examples"] == 12


@pytest.mark.parametrize("name", sorted(MALFORMED_PAIRS))
def test_each_malformed_pair_gets_its_code_at_its_line(org_a, name):
    content, code, line = MALFORMED_PAIRS[name]
    response = _upload(org_a, content)
    assert response.status_code == 200, response.content
    report = response.json()["validation"]
    assert response.json()["status"] == "error"
    assert report["error_count"] == 1, report["errors"]
    assert (report["errors"][0]["code"], report["errors"][0]["line"]) == (code, line)


def test_pair_statistics_count_prompts_answers_and_the_pairs_too_long(org_a, default_model):
    lines = preference_lines(11)
    lines.insert(6, preference_line("the sea", preferred_output=[
        {"role": "assistant", "content": "Arr! " + "yo ho " * 2100}]))
    body = _upload(org_a, lines_to_bytes(lines)).json()
    assert body["status"] == "processed"
    compute_statistics(body["id"])
    stats = bearer(org_a.owner_key).get(f"/v1/files/{body['id']}").json()["statistics"]
    pairs = stats["pairs"]
    assert stats["examples"] == 12 and stats["format"] == "preference"
    assert pairs["truncated"] == 1 == stats["examples_over_max_length"]
    assert pairs["truncated_share"] == round(1 / 12, 4)
    assert [(p["code"], p["line"]) for p in pairs["problems"]] == [("preference_too_long", 7)]
    assert pairs["chosen_tokens"]["max"] > 2048 > pairs["rejected_tokens"]["max"]
    first = json.loads(lines[0])
    assert pairs["prompt_tokens"]["min"] > len(first["input"]["messages"][0]["content"].split())
    assert stats["role_counts"] == {"assistant": 24, "user": 12}
