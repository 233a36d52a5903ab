"""The dashboard's preference tuning: the method on the new-job form, the rewards chart and the
lineage on the job page, and preference datasets made on the Feedback page."""

from __future__ import annotations

import pytest

from tests.fixtures.adapter_rows import adapter_row
from tests.fixtures.datasets import lines_to_bytes, preference_lines
from tests.frontend.conftest import browser, form
from tests.frontend.test_pages import a_job, upload
from tuneplex.feedback.models import Comparison
from tuneplex.files.models import File
from tuneplex.finetuning.models import FineTuningJob

pytestmark = pytest.mark.django_db


def test_the_new_job_form_offers_dpo_with_beta_and_continuing_an_adapter(org_a, default_model):
    pairs = upload(org_a, lines_to_bytes(preference_lines(12)), name="pairs.jsonl")
    parent = adapter_row(org_a.organization, default_model)
    parent.job.config = {"lora_rank": 8, "lora_alpha": 16.0, "target_modules": "all-linear"}
    parent.job.save()
    client = browser(org_a.owner)
    page = client.get(f"/jobs/new?file={pairs.id}").content.decode()
    assert 'name="method_type" value="dpo"' in page and 'id="f-beta"' in page
    assert "12 pairs" in page and f'<option value="{parent.name}"' in page
    base = {"model": default_model.name, "training_file": pairs.id, "preset": "balanced",
            "method": "lora", "method_type": "dpo"}
    checked = client.post("/jobs/new/check", form(client, base | {"beta": "0"})).content.decode()
    assert 'id="error-beta" hx-swap-oob="true">must be in (0, 100] (got 0.0)</p>' in checked
    supervised = client.post("/jobs/new/check",
                             form(client, base | {"method_type": "supervised"})).content.decode()
    assert "training_file: File" in supervised and "holds preference data" in supervised

    created = client.post("/jobs/new", form(client, base | {"beta": "0.3", "model": parent.name}))
    assert created.status_code == 302, created.content.decode()
    job = FineTuningJob.objects.get(organization=org_a.organization, method_type="dpo")
    assert job.config["dpo_beta"] == 0.3 and job.parent_adapter == parent
    assert job.config["lora_rank"] == 8


def test_a_dpo_job_page_charts_rewards_and_shows_the_lineage(org_a, default_model):
    parent = adapter_row(org_a.organization, default_model)
    job = a_job(org_a, default_model, method_type="dpo", config={"dpo_beta": 0.1},
                parent_adapter=parent,
                lineage={"model": parent.name, "parent_job_id": parent.job.id,
                         "adapter": {"id": parent.id, "name": parent.name}, "checkpoint": None,
                         "datasets": [{"job_id": parent.job.id, "training_file": "file-a",
                                       "validation_file": None, "method": "supervised"}]})
    job.events.create(type="metrics", message="m", data={
        "step": 1, "train_loss": 0.69, "reward_margin": 0.0, "reward_accuracy": 0.0})
    job.events.create(type="metrics", message="m", data={
        "step": 2, "train_loss": 0.5, "reward_margin": 0.4, "reward_accuracy": 0.75})
    html = browser(org_a.owner).get(f"/jobs/{job.id}/").content.decode()
    assert 'id="reward-chart"' in html and "DPO (preference pairs, beta 0.1)" in html
    assert '"reward_margin": [0.0, 0.4]' in html and '"reward_accuracy": [0.0, 0.75]' in html
    assert 'id="lineage"' in html and parent.name in html and f"/jobs/{parent.job.id}/" in html
    plain = a_job(org_a, default_model)
    plain_html = browser(org_a.owner).get(f"/jobs/{plain.id}/").content.decode()
    assert 'id="reward-chart"' not in plain_html and 'id="lineage"' not in plain_html


def test_the_feedback_page_makes_a_preference_dataset(org_a, default_model, settings):
    client = browser(org_a.owner)
    page = client.get("/feedback/").content.decode()
    assert 'id="export-preferences" disabled' in page
    for i in range(settings.DATASET_MIN_EXAMPLES):
        Comparison.objects.create(organization=org_a.organization,
                                  messages=[{"role": "user", "content": f"Q{i}"}],
                                  preferred_model=default_model.name, preferred=f"Good {i}",
                                  non_preferred_model=default_model.name, non_preferred=f"Bad {i}")
    page = client.get("/feedback/").content.decode()
    assert f'id="preference-count">{settings.DATASET_MIN_EXAMPLES}<' in page and "Good 3" in page
    response = client.post("/feedback/preference-export", form(client, {}))
    file = File.objects.get(organization=org_a.organization)
    assert response.status_code == 302 and response["Location"] == f"/datasets/{file.id}/"
    assert file.format == "preference" and file.status == "processed"
    dataset = client.get(f"/datasets/{file.id}/").content.decode()
    assert "non-preferred" in dataset and "Good 0" in dataset and "Bad 0" in dataset
    refused = client.post("/feedback/preference-export", form(client, {}))
    assert refused.status_code == 400 and "too_few" not in refused.content.decode()
    assert "0 new comparison(s)" in refused.content.decode()


def test_the_adapters_page_says_what_an_adapter_continued_from(org_a, default_model):
    child = adapter_row(org_a.organization, default_model)
    child.lineage = {"model": "ft:SmolLM2-135M-Instruct:alpha:parent:abc"}
    child.save()
    html = browser(org_a.owner).get("/adapters/").content.decode()
    assert "continued from <code>ft:SmolLM2-135M-Instruct:alpha:parent:abc</code>" in html
