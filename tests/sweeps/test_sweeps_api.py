"""POST/GET /v1/sweeps and cancel: every field checked with a 400 naming it, nothing stored on a
refusal, another organization's sweep a 404."""

from __future__ import annotations

import pytest
from tuneplex.audit.models import AuditEvent
from tuneplex.sweeps.models import Sweep

from tests.conftest import bearer, key_for
from tests.sweeps.conftest import create_sweep, sweep_body

pytestmark = pytest.mark.django_db


def test_a_sweep_is_created_with_its_search_space_as_checked(org_a, files_of_a):
    response = create_sweep(org_a, files_of_a, max_parallel=3, name="lr and rank")
    assert response.status_code == 200, response.content
    body = response.json()
    assert body["object"] == "sweep" and body["id"].startswith("sweep_")
    assert (body["status"], body["sampler"], body["pruner"], body["metric"], body["direction"]) == (
        "running", "random", "median", "validation_loss", "minimize")
    assert body["search_space"] == {
        "learning_rate": {"type": "float", "low": 1e-5, "high": 1e-2, "log": True},
        "lora_rank": {"type": "categorical", "choices": [4, 8]}}
    # max_parallel is capped by the organization's concurrency limit (1 by default).
    assert (body["max_parallel"], body["parallel"]) == (3, 1)
    assert body["trials"] == [] and body["best_trial"] is None and body["seed"] == 7
    assert AuditEvent.objects.filter(action="sweep.create", object_id=body["id"]).exists()
    listed = bearer(org_a.owner_key).get("/v1/sweeps").json()
    assert [s["id"] for s in listed["data"]] == [body["id"]]


def _bad(files, **changes):
    return sweep_body(files, **changes)


SPACE = {"lora_rank": {"type": "categorical", "choices": [4, 8]}}


@pytest.mark.parametrize(("changes", "param", "code"), [
    ({"sampler": "bayes"}, "sampler", "invalid_value"),
    ({"pruner": "hyperband"}, "pruner", "invalid_value"),
    ({"metric": "accuracy"}, "metric", "invalid_value"),
    ({"max_trials": 0}, "max_trials", "min_value"),
    ({"max_trials": "4"}, "max_trials", "invalid_type"),
    ({"max_trials": 101}, "max_trials", "max_value"),
    ({"max_parallel": 0}, "max_parallel", "min_value"),
    ({"deploy_best": "yes"}, "deploy_best", "invalid_type"),
    ({"seed": -1}, "seed", "min_value"),
    ({"suffix": "Not Valid"}, "suffix", "invalid_suffix"),
    ({"model": "no-such-model"}, "model", "model_not_available"),
    ({"training_file": "file-missing"}, "training_file", "file_not_found"),
    ({"validation_file": None}, "validation_file", "validation_required"),
    ({"hyperparameters": {"lora_alpha": -1}}, "hyperparameters.lora_alpha", "invalid_hyperparameter"),
    ({"hyperparameters": {"lora_rank": 8}, "search_space": SPACE}, "search_space.lora_rank",
     "invalid_search_space"),
    ({"search_space": {}}, "search_space", "invalid_search_space"),
    ({"search_space": []}, "search_space", "invalid_search_space"),
    ({"search_space": {"base_model_dir": {"type": "categorical", "choices": ["/"]}}},
     "search_space.base_model_dir", "invalid_search_space"),
    ({"search_space": {"lora_rank": {"type": "integer", "low": 1, "high": 8}}},
     "search_space.lora_rank.type", "invalid_search_space"),
    ({"search_space": {"lora_rank": {"type": "int", "low": 8, "high": 4}}},
     "search_space.lora_rank.high", "invalid_search_space"),
    ({"search_space": {"lora_rank": {"type": "int", "low": 1.5, "high": 4}}},
     "search_space.lora_rank.low", "invalid_search_space"),
    ({"search_space": {"lora_rank": {"type": "int", "low": 1, "high": 8, "by": 2}}},
     "search_space.lora_rank.by", "invalid_search_space"),
    ({"search_space": {"learning_rate": {"type": "float", "low": 0, "high": 1e-3, "log": True}}},
     "search_space.learning_rate.low", "invalid_search_space"),
    ({"search_space": {"learning_rate": {"type": "float", "low": 1e-5, "high": 1e-3, "log": True,
                                         "step": 1e-5}}},
     "search_space.learning_rate.step", "invalid_search_space"),
    ({"search_space": {"lora_rank": {"type": "categorical", "choices": []}}},
     "search_space.lora_rank.choices", "invalid_search_space"),
    ({"search_space": {"lora_rank": {"type": "categorical", "choices": [4, {"r": 8}]}}},
     "search_space.lora_rank.choices[1]", "invalid_search_space"),
    ({"search_space": {"lora_rank": {"type": "categorical", "choices": [4, 4]}}},
     "search_space.lora_rank.choices[1]", "invalid_search_space"),
    # Values no trial's job could run with are refused now, naming the extreme at fault.
    ({"search_space": {"lora_rank": {"type": "int", "low": 4, "high": 1024}}},
     "search_space.lora_rank.high", "invalid_hyperparameter"),
    ({"search_space": {"lora_rank": {"type": "categorical", "choices": [8, 0]}}},
     "search_space.lora_rank.choices[1]", "invalid_hyperparameter"),
    ({"search_space": {"lr_scheduler": {"type": "categorical", "choices": ["cosine", "cyclic"]}}},
     "search_space.lr_scheduler.choices[1]", "invalid_hyperparameter"),
    # The grid needs finitely many points, at least one per trial.
    ({"sampler": "grid", "search_space": {"learning_rate": {"type": "float", "low": 1e-4,
                                                            "high": 1e-3}}},
     "search_space.learning_rate.step", "invalid_search_space"),
    ({"sampler": "grid", "search_space": SPACE, "max_trials": 3}, "max_trials", "invalid_value"),
])
def test_each_field_is_checked_and_named(org_a, files_of_a, changes, param, code):
    response = create_sweep(org_a, files_of_a, **changes)
    assert response.status_code == 400, response.content
    error = response.json()["error"]
    assert (error["param"], error["code"]) == (param, code), error
    assert error["message"]
    assert not Sweep.objects.exists()


def test_a_grid_of_exactly_max_trials_points_is_accepted(org_a, files_of_a):
    response = create_sweep(org_a, files_of_a, sampler="grid", max_trials=4, search_space={
        "lora_rank": {"type": "categorical", "choices": [4, 8]},
        "learning_rate": {"type": "float", "low": 1e-4, "high": 2e-4, "step": 1e-4}})
    assert response.status_code == 200, response.content


def test_an_organization_has_a_limited_number_of_running_sweeps(org_a, files_of_a, settings):
    settings.ORG_MAX_ACTIVE_SWEEPS = 1
    assert create_sweep(org_a, files_of_a).status_code == 200
    refused = create_sweep(org_a, files_of_a)
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "too_many_active_sweeps"
    assert Sweep.objects.count() == 1


def test_a_viewer_cannot_start_a_sweep(org_a, files_of_a, viewer_of_a):
    response = bearer(key_for(org_a, viewer_of_a, ["read"])).post(
        "/v1/sweeps", sweep_body(files_of_a), format="json")
    assert response.status_code == 403
    assert not Sweep.objects.exists()


def test_another_organizations_sweep_is_a_404(org_a, org_b, files_of_a):
    sweep_id = create_sweep(org_a, files_of_a).json()["id"]
    client = bearer(org_b.owner_key)
    for response in (client.get(f"/v1/sweeps/{sweep_id}"),
                     client.post(f"/v1/sweeps/{sweep_id}/cancel")):
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "not_found"
    assert client.get("/v1/sweeps").json()["data"] == []
    assert Sweep.objects.get(id=sweep_id).status == "running"
    # Its owner still reads and cancels it.
    assert bearer(org_a.owner_key).get(f"/v1/sweeps/{sweep_id}").status_code == 200
    assert bearer(org_a.owner_key).post(f"/v1/sweeps/{sweep_id}/cancel").json()["status"] == "cancelled"
