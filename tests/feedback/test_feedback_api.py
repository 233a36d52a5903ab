"""The feedback API: rate exchanges with an `infer` key, list them, export the good ones as a
dataset with a `train` key. The dashboard's buttons do the same through the same service."""

from __future__ import annotations

import pytest

from tests.conftest import add_member, bearer, key_for
from tuneplex.core.scopes import Role
from tuneplex.feedback.models import Feedback
from tuneplex.files.models import File

pytestmark = pytest.mark.django_db


def exchange(i: int) -> list[dict]:
    return [{"role": "user", "content": f"Question {i}?"},
            {"role": "assistant", "content": f"Answer {i}."}]


def test_rating_listing_and_exporting_through_the_api(org_a, default_model, settings):
    infer_only = bearer(key_for(org_a, org_a.owner, ["infer"]))
    created = infer_only.post("/v1/feedback", {"model": default_model.name, "messages": exchange(0),
                                               "rating": 1}, format="json")
    assert created.status_code == 200, created.content
    body = created.json()
    assert body["object"] == "feedback" and body["rating"] == 1 and body["exported_to"] is None
    assert body["messages"][-1] == {"role": "assistant", "content": "Answer 0."}

    owner = bearer(org_a.owner_key)
    too_few = owner.post("/v1/feedback/export")
    assert too_few.status_code == 400 and too_few.json()["error"]["code"] == "too_few_examples"
    for i in range(1, settings.DATASET_MIN_EXAMPLES):
        infer_only.post("/v1/feedback", {"model": default_model.name, "messages": exchange(i),
                                         "rating": 1}, format="json")
    infer_only.post("/v1/feedback", {"model": default_model.name, "messages": exchange(99),
                                     "rating": -1}, format="json")
    listed = owner.get("/v1/feedback?limit=100").json()
    assert [f["rating"] for f in listed["data"]].count(1) == settings.DATASET_MIN_EXAMPLES
    exported = owner.post("/v1/feedback/export")
    assert exported.status_code == 200, exported.content
    file = exported.json()
    assert file["object"] == "file" and file["status"] == "processed" and file["format"] == "chat"
    assert File.objects.get(id=file["id"]).validation["examples"] == settings.DATASET_MIN_EXAMPLES
    after = {f["id"]: f for f in owner.get("/v1/feedback?limit=100").json()["data"]}
    assert sorted(f["exported_to"] or "-" for f in after.values()).count(file["id"]) == \
        settings.DATASET_MIN_EXAMPLES
    again = owner.post("/v1/feedback/export")  # nothing new to export
    assert again.status_code == 400 and again.json()["error"]["code"] == "too_few_examples"


@pytest.mark.parametrize("body,code,param", [
    ({"messages": [], "rating": 1}, "required", "model"),
    ({"model": "M", "messages": "hi", "rating": 1}, "invalid_messages", "messages"),
    ({"model": "M", "messages": [{"role": "user", "content": "q"}], "rating": 1},
     "invalid_messages", "messages[0]"),
    ({"model": "M", "messages": [{"role": "user", "content": 3},
                                 {"role": "assistant", "content": "a"}], "rating": 1},
     "invalid_messages", "messages[0].content"),
    ({"model": "M", "messages": exchange(0), "rating": 0}, "invalid_rating", "rating"),
    ({"model": "M", "messages": [{"role": {}, "content": "q"}, {"role": "assistant", "content": "a"}],
      "rating": 1}, "invalid_messages", "messages[0].role"),  # found by the fuzzer: a 500
    ({"model": "M", "messages": exchange(0), "rating": "good"}, "invalid_type", "rating"),
    ({"model": "M", "messages": exchange(0), "rating": True}, "invalid_type", "rating"),
    ({"model": 5, "messages": exchange(0), "rating": 1}, "invalid_type", "model"),
    ({"model": "ft:not-ours", "messages": exchange(0), "rating": 1}, "model_not_found", "model"),
])
def test_bad_ratings_are_refused_with_code_and_param(org_a, default_model, body, code, param):
    if body.get("model") == "M":
        body = {**body, "model": default_model.name}
    response = bearer(org_a.owner_key).post("/v1/feedback", body, format="json")
    assert response.status_code == 400, response.content
    assert response.json()["error"]["code"] == code and response.json()["error"]["param"] == param
    assert not Feedback.objects.exists()


def test_scopes_and_another_organizations_adapters(org_a, org_b, default_model):
    from tests.fixtures.adapter_rows import adapter_row

    theirs = adapter_row(org_b.organization, default_model, deployed=True)
    refused = bearer(org_a.owner_key).post("/v1/feedback", {
        "model": theirs.name, "messages": exchange(0), "rating": 1}, format="json")
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "model_not_found"
    viewer_key = key_for(org_a, add_member(org_a, Role.VIEWER), ["read"])
    assert bearer(viewer_key).post("/v1/feedback", {"model": default_model.name,
                                                    "messages": exchange(0), "rating": 1},
                                   format="json").status_code == 403
    assert bearer(viewer_key).post("/v1/feedback/export").status_code == 403
    assert bearer(viewer_key).get("/v1/feedback").status_code == 200
