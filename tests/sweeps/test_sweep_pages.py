"""The sweeps dashboard, server side: the list, a sweep's page with its trials and their curves,
polling until it ends, cancelling; another organization's sweep does not exist."""

from __future__ import annotations

import json
import re

import pytest
from tuneplex.sweeps import steps
from tuneplex.sweeps.models import Sweep, SweepTrial

from tests.conftest import add_member
from tests.frontend.conftest import browser, csrf
from tests.sweeps.conftest import create_sweep

pytestmark = pytest.mark.django_db


def curves(html: str) -> dict:
    found = re.search(r'<script id="sweep-curves" type="application/json">(.*?)</script>', html, re.DOTALL)
    assert found, "the page carries its curves"
    return json.loads(found[1])


def test_the_sweep_page_shows_its_trials_and_their_curves_until_it_ends(org_a, files_of_a,
                                                                        fake_worker, settings):
    settings.ORG_MAX_CONCURRENT_JOBS = 2
    sweep_id = create_sweep(org_a, files_of_a, max_trials=2, name="rates").json()["id"]
    steps.step_all()
    first, second = SweepTrial.objects.filter(sweep_id=sweep_id).order_by("number")
    for trial, losses in ((first, (1.2, 0.9)), (second, (1.1, 0.7))):
        job = fake_worker.start(trial.job)
        for step, loss in enumerate(losses, start=1):
            fake_worker.evaluate(job, step, loss)
    steps.step_all()
    client = browser(org_a.owner)
    listed = client.get("/sweeps/").content.decode()
    assert f'href="/sweeps/{sweep_id}/"' in listed and "rates" in listed
    html = client.get(f"/sweeps/{sweep_id}/").content.decode()
    assert 'hx-trigger="every 3s"' in html and 'id="cancel-sweep"' in html
    assert "0 of 2 trials ended" in html and "learning_rate" in html
    drawn = curves(html)
    assert [t["points"] for t in drawn["trials"]] == [
        [{"x": 1, "y": 1.2}, {"x": 2, "y": 0.9}], [{"x": 1, "y": 1.1}, {"x": 2, "y": 0.7}]]
    assert drawn["best"] is None and drawn["trials"][0]["label"].startswith("#0 learning_rate=")

    for trial in (first, second):
        trial.job.refresh_from_db()
        fake_worker.succeed(trial.job)
    steps.step_all()
    done = client.get(f"/sweeps/{sweep_id}/progress")
    assert done.status_code == 286  # htmx stops polling
    body = done.content.decode()
    assert "hx-trigger" not in body and "cancel-sweep" not in body
    assert "Best: trial 1, validation loss 0.7000" in body and 'class="best"' in body
    assert curves(body)["best"] == 1


def test_cancelling_from_the_sweep_page(org_a, files_of_a):
    sweep_id = create_sweep(org_a, files_of_a).json()["id"]
    steps.step_all()
    client = browser(org_a.owner)
    response = client.post(f"/sweeps/{sweep_id}/cancel", **csrf(client))
    assert response.status_code == 200 and 'data-status="cancelled"' in response.content.decode()
    assert Sweep.objects.get(id=sweep_id).status == "cancelled"
    assert SweepTrial.objects.get(sweep_id=sweep_id).job.status == "cancelled"
    again = client.post(f"/sweeps/{sweep_id}/cancel", **csrf(client))
    assert "The sweep has already cancelled." in again.content.decode()


def test_a_viewer_sees_no_cancel_button_and_a_forged_cancel_is_refused(org_a, files_of_a):
    sweep_id = create_sweep(org_a, files_of_a).json()["id"]
    viewer = browser(add_member(org_a, "viewer"))
    assert "cancel-sweep" not in viewer.get(f"/sweeps/{sweep_id}/").content.decode()
    assert viewer.post(f"/sweeps/{sweep_id}/cancel", **csrf(viewer)).status_code == 403
    assert Sweep.objects.get(id=sweep_id).status == "running"


def test_another_organizations_sweep_does_not_exist_on_the_dashboard(org_a, org_b, files_of_a):
    sweep_id = create_sweep(org_a, files_of_a).json()["id"]
    client = browser(org_b.owner)
    assert sweep_id not in client.get("/sweeps/").content.decode()
    for path in (f"/sweeps/{sweep_id}/", f"/sweeps/{sweep_id}/progress"):
        assert client.get(path).status_code == 404
    assert client.post(f"/sweeps/{sweep_id}/cancel", **csrf(client)).status_code == 404
    assert Sweep.objects.get(id=sweep_id).status == "running"
