"""Preference data from the playground: compared answers and 👍/👎 pairs, exported as a DPO file
through the upload path (validation, quota, statistics)."""

from __future__ import annotations

import json

import pytest

from tests.conftest import bearer, key_for
from tuneplex.feedback.models import Comparison, Feedback
from tuneplex.files.models import File

pytestmark = pytest.mark.django_db


def prompt(i: int) -> list[dict]:
    return [{"role": "user", "content": f"Tell me about topic {i}."}]


def comparison(model: str, i: int, **changes) -> dict:
    return {"messages": prompt(i), "preferred": {"model": model, "content": f"Arr! Topic {i}."},
            "non_preferred": {"model": model, "content": f"Topic {i} is fine."}, **changes}


def rate(client, model: str, i: int, answer: str, rating: int):
    response = client.post("/v1/feedback", {"model": model, "rating": rating, "messages": [
        *prompt(i), {"role": "assistant", "content": answer}]}, format="json")
    assert response.status_code == 200, response.content


def _lines(organization, file_id: str) -> list[dict]:
    from tuneplex.core.storage import artifact_storage

    blob = File.objects.get(organization=organization, id=file_id).blob_name
    with artifact_storage().open(blob, "rb") as handle:
        return [json.loads(line) for line in handle.read().decode().splitlines()]


def test_comparisons_and_rated_pairs_become_one_preference_dataset(org_a, default_model, settings):
    infer_only = bearer(key_for(org_a, org_a.owner, ["infer"]))
    model = default_model.name
    for i in range(5):
        created = infer_only.post("/v1/feedback/comparisons", comparison(model, i), format="json")
        assert created.status_code == 200, created.content
    body = created.json()
    assert body["object"] == "feedback.comparison" and body["exported_to"] is None
    assert body["preferred"] == {"model": model, "content": "Arr! Topic 4."}
    for i in range(10, 14):  # a 👍 and a 👎 answer to the same prompt: a pair each
        rate(infer_only, model, i, f"Arr! Topic {i}.", 1)
        rate(infer_only, model, i, f"Topic {i} is fine.", -1)
    rate(infer_only, model, 20, "Only good.", 1)  # no 👎 for this prompt: no pair
    rate(infer_only, model, 21, "Same.", 1)
    rate(infer_only, model, 21, "Same.", -1)  # the same answer both ways: never paired

    owner = bearer(org_a.owner_key)
    too_few = owner.post("/v1/feedback/preference_export")
    assert too_few.status_code == 400 and too_few.json()["error"]["code"] == "too_few_examples"
    assert too_few.json()["error"]["message"].startswith("9 new")  # 5 comparisons + 4 pairs
    assert not File.objects.filter(organization=org_a.organization).exists()

    for i in (5, 6):
        infer_only.post("/v1/feedback/comparisons", comparison(model, i), format="json")
    exported = owner.post("/v1/feedback/preference_export")
    assert exported.status_code == 200, exported.content
    file = exported.json()
    assert file["status"] == "processed" and file["format"] == "preference"
    assert file["validation"]["examples"] == 11 and file["statistics_status"] == "pending"
    lines = _lines(org_a.organization, file["id"])
    assert lines[0] == {"input": {"messages": prompt(0)},
                        "preferred_output": [{"role": "assistant", "content": "Arr! Topic 0."}],
                        "non_preferred_output": [{"role": "assistant", "content": "Topic 0 is fine."}]}
    assert {line["preferred_output"][0]["content"] for line in lines[7:]} == {
        f"Arr! Topic {i}." for i in range(10, 14)}
    assert Comparison.objects.filter(exported_to=file["id"]).count() == 7
    assert Feedback.objects.filter(preference_exported_to=file["id"]).count() == 8
    assert Feedback.objects.filter(preference_exported_to="").count() == 3
    again = owner.post("/v1/feedback/preference_export")
    assert again.status_code == 400 and again.json()["error"]["code"] == "too_few_examples"
    # The 👍 answers still go into a chat dataset of their own: the two exports are independent.
    assert Feedback.objects.filter(rating=1, exported_to="").count() == 6


@pytest.mark.parametrize(("change", "code", "param"), [
    ({"messages": [{"role": "assistant", "content": "Hi"}]}, "preference_input_must_end_with_user",
     "messages[0].role"),
    ({"messages": []}, "invalid_messages", "messages"),
    ({"preferred": {"model": "SmolLM2-135M-Instruct", "content": "Topic 1 is fine."}},
     "preference_identical_outputs", "non_preferred"),
    ({"non_preferred": {"model": "SmolLM2-135M-Instruct", "content": " "}}, "missing_content",
     "non_preferred"),
    ({"preferred": "better"}, "invalid_comparison", "preferred"),
    ({"preferred": {"model": "ft:someone-elses", "content": "x"}}, "model_not_found", "preferred.model"),
])
def test_a_malformed_comparison_is_refused_with_its_code(org_a, default_model, change, code, param):
    response = bearer(org_a.owner_key).post("/v1/feedback/comparisons",
                                            comparison(default_model.name, 1, **change), format="json")
    assert response.status_code in (400, 404), response.content
    error = response.json()["error"]
    assert (error["code"], error["param"]) == (code, param)
    assert not Comparison.objects.exists()


def test_comparisons_are_per_organization_and_need_the_right_scopes(org_a, org_b, default_model):
    bearer(org_a.owner_key).post("/v1/feedback/comparisons", comparison(default_model.name, 1),
                                 format="json")
    assert bearer(org_b.owner_key).get("/v1/feedback/comparisons").json()["data"] == []
    read_only = bearer(key_for(org_a, org_a.owner, ["read"]))
    assert read_only.post("/v1/feedback/comparisons", comparison(default_model.name, 2),
                          format="json").status_code == 403
    assert read_only.post("/v1/feedback/preference_export").status_code == 403
    assert len(read_only.get("/v1/feedback/comparisons").json()["data"]) == 1
