"""The job page's settings: grouped and ordered as the new-job form asks for them, the same on
every job whatever it set or however its settings were stored."""

from __future__ import annotations

import re

import pytest

from tests.fixtures.datasets import good_chat
from tests.frontend.conftest import browser
from tests.frontend.test_pages import upload
from tuneplex.finetuning.models import FineTuningJob
from tuneplex.finetuning.services import lifecycle

pytestmark = pytest.mark.django_db


def _settings(html: str) -> list[tuple[str, list[tuple[str, str]]]]:
    """(group, [(label, value)]) as the job page's settings card shows them."""
    card = re.search(r'<h2 id="settings-title">Settings</h2>(.*?)</section>', html, re.DOTALL)[1]
    groups = re.findall(r'<h3 class="settings-group">(.*?)</h3>\s*<dl class="facts compact">(.*?)</dl>',
                        card, re.DOTALL)
    return [(title, re.findall(r"<dt>(.*?)</dt><dd>(.*?)</dd>", body)) for title, body in groups]


def test_the_job_page_lists_settings_in_the_new_job_forms_order_for_every_job(org_a, default_model):
    file = upload(org_a, good_chat(40))
    principal = org_a.principal()
    first = lifecycle.job_create(organization=org_a.organization, actor=principal,
                                 model=default_model.name, training_file=file.id,
                                 hyperparameters={"n_epochs": 2})
    second = lifecycle.job_create(organization=org_a.organization, actor=principal,
                                  model=default_model.name, training_file=file.id, suffix="other",
                                  hyperparameters={"lora_rank": 8, "learning_rate": 1e-4,
                                                   "batch_size": 4, "sharding": "off"})
    # A job stored before some settings existed: fewer keys, in another order.
    legacy = dict(reversed([(k, v) for k, v in second.config.items()
                            if k not in ("cuda_graphs", "gpus", "sharding")]))
    FineTuningJob.objects.filter(pk=second.pk).update(config=legacy)
    client = browser(org_a.owner)
    shown = [_settings(client.get(f"/jobs/{job.id}/").content.decode()) for job in (first, second)]
    titles = [[title for title, _ in page] for page in shown]
    assert titles[0] == titles[1] == ["Model and data", "Training method", "Adapter",
                                      "Advanced hyperparameters", "Experiment tracking",
                                      "Other settings"]
    form_groups = [[label for label, _ in rows] for _, rows in shown[0][:4]]
    assert form_groups == [[label for label, _ in rows] for _, rows in shown[1][:4]]
    # The advanced settings are in the new-job form's own order, under its labels.
    new_job = client.get(f"/jobs/new?file={file.id}").content.decode()
    advanced = re.search(r'<details class="card" id="advanced".*?</details>', new_job, re.DOTALL)[0]
    form_labels = [re.sub(r"<[^>]+>", "", label).strip()
                   for label in re.findall(r'<label[^>]*for="f-[a-z_]+"[^>]*>(.*?)</label>', advanced)]
    assert form_groups[3] == form_labels
    values = [dict(rows) for _, rows in shown[0][:4]], [dict(rows) for _, rows in shown[1][:4]]
    assert values[0][3]["Epochs"] == "2" and values[1][3]["LoRA rank"] == "8"
    assert values[0][3]["LoRA rank"] == "16" and values[1][3]["Sharding"] == "auto"  # not stored
    assert values[1][0]["Name suffix"] == "other"
    assert shown[0][4][1] == [("Tracking", "none")]
    other = [[label for label, _ in page[5][1]] for page in shown]
    assert set(other[1]) < set(other[0])
    assert other[1] == [label for label in other[0] if label in other[1]]  # same relative order


def test_the_job_page_says_where_the_job_is_tracked(org_a, default_model, settings):
    settings.MLFLOW_TRACKING_URI = "http://127.0.0.1:9"  # set by the operator; never called here
    file = upload(org_a, good_chat(40))
    job = lifecycle.job_create(
        organization=org_a.organization, actor=org_a.principal(), model=default_model.name,
        training_file=file.id, integrations=[
            {"type": "wandb", "wandb": {"project": "capitals", "entity": "geo", "tags": ["a", "b"]}},
            {"type": "mlflow", "mlflow": {"experiment_name": "sweeps", "run_name": "r1"}}])
    client = browser(org_a.owner)
    page = client.get(f"/jobs/{job.id}/").content.decode()
    tracking = dict(dict(_settings(page))["Experiment tracking"])
    assert tracking == {"Weights &amp; Biases": "project geo / capitals, tags a, b",
                        "MLflow": f"experiment {org_a.organization.slug}/sweeps, run r1"}
    # The W&B files link appears once the job has run and ended (no files yet: the API says so).
    assert 'id="wandb-download"' not in page
    FineTuningJob.objects.filter(pk=job.pk).update(status="failed", started_at=job.created_at)
    assert 'href="/v1/fine_tuning/jobs/%s/wandb"' % job.id in client.get(f"/jobs/{job.id}/").content.decode()


def test_an_admin_sets_and_removes_the_organizations_wandb_key_on_the_team_page(org_a, viewer_of_a):
    from tests.frontend.conftest import form
    from tuneplex.tenancy.models import Organization
    from tuneplex.tenancy.secrets import WANDB_API_KEY, unseal

    client = browser(org_a.owner)
    assert '<strong id="wandb-key-status">not set</strong>' in client.get("/team/").content.decode()
    short = client.post("/team/wandb-key", form(client, {"action": "set", "api_key": "x" * 12}))
    assert short.status_code == 400 and 'id="wandb-error"' in short.content.decode()
    assert not Organization.objects.get(pk=org_a.organization.pk).has_wandb_api_key
    key = "k" * 40
    saved = client.post("/team/wandb-key", form(client, {"action": "set", "api_key": key}))
    body = saved.content.decode()
    assert saved.status_code == 200 and "The W&amp;B API key was saved." in body
    assert '<strong id="wandb-key-status">set</strong>' in body and key not in body
    stored = Organization.objects.get(pk=org_a.organization.pk)
    assert unseal(stored.wandb_api_key_sealed, purpose=WANDB_API_KEY) == key
    # A viewer sees whether it is set, with no form, and cannot post one.
    viewer = browser(viewer_of_a)
    page = viewer.get("/team/").content.decode()
    assert '<strong id="wandb-key-status">set</strong>' in page and 'name="api_key"' not in page
    assert viewer.post("/team/wandb-key", form(viewer, {"action": "remove"})).status_code == 403
    assert Organization.objects.get(pk=org_a.organization.pk).has_wandb_api_key
    removed = client.post("/team/wandb-key", form(client, {"action": "remove"}))
    assert "The W&amp;B API key was removed." in removed.content.decode()
    assert not Organization.objects.get(pk=org_a.organization.pk).has_wandb_api_key
