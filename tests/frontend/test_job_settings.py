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
                                      "Advanced hyperparameters", "Other settings"]
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
    other = [[label for label, _ in page[4][1]] for page in shown]
    assert set(other[1]) < set(other[0])
    assert other[1] == [label for label in other[0] if label in other[1]]  # same relative order
