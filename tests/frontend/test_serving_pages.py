"""Dashboard pages for serving: adapters (deploy/undeploy) and the playground, by role."""

from __future__ import annotations

import pytest
from django.test import Client

from tests.conftest import add_member
from tests.fixtures.adapter_rows import adapter_row
from tuneplex.adapters.models import Adapter
from tuneplex.core.scopes import Role

BASE = "SmolLM2-135M-Instruct"


@pytest.fixture
def adapter_of_a(org_a, default_model) -> Adapter:
    return adapter_row(org_a.organization, default_model)


def browser(user) -> Client:
    client = Client(enforce_csrf_checks=True)
    client.force_login(user)
    return client


def csrf(client: Client) -> dict:
    client.get("/adapters/")
    return {"HTTP_X_CSRFTOKEN": client.cookies["csrftoken"].value}


@pytest.mark.django_db
def test_members_see_their_adapters_with_deploy_buttons(org_a, org_b, adapter_of_a):
    page = browser(org_a.owner).get("/adapters/")
    assert page.status_code == 200
    html = page.content.decode()
    assert adapter_of_a.name in html and "not deployed" in html
    assert f'hx-post="/adapters/{adapter_of_a.id}/deploy"' in html
    assert f"/v1/adapters/{adapter_of_a.id}/download" in html
    # Another organization's member sees none of it and cannot act on it.
    other = browser(org_b.owner)
    assert adapter_of_a.name not in other.get("/adapters/").content.decode()
    assert other.post(f"/adapters/{adapter_of_a.id}/deploy", **csrf(other)).status_code == 404


@pytest.mark.django_db
def test_a_deploy_that_fails_shows_why_in_the_row_and_changes_nothing(org_a, adapter_of_a, settings):
    settings.ENGINE_REPLICAS = {}
    client = browser(org_a.owner)
    row = client.post(f"/adapters/{adapter_of_a.id}/deploy", **csrf(client))
    assert row.status_code == 200
    html = row.content.decode()
    assert html.startswith(f'<tr id="adapter-{adapter_of_a.id}"') and 'role="alert"' in html
    assert "No engine replica serves" in html
    adapter_of_a.refresh_from_db()
    assert adapter_of_a.deployed is False
    Adapter.objects.filter(pk=adapter_of_a.pk).update(deployed=True)
    undeployed = client.post(f"/adapters/{adapter_of_a.id}/undeploy", **csrf(client))
    assert undeployed.status_code == 200 and "not deployed" in undeployed.content.decode()
    adapter_of_a.refresh_from_db()
    assert adapter_of_a.deployed is False


@pytest.mark.django_db
def test_viewers_get_no_write_buttons_and_403_when_forging(org_a, adapter_of_a, settings):
    settings.ENGINE_REPLICAS = {BASE: ["http://127.0.0.1:9"]}  # a model is served: the role decides
    viewer = browser(add_member(org_a, Role.VIEWER))
    html = viewer.get("/adapters/").content.decode()
    assert adapter_of_a.name in html and "hx-post" not in html
    assert viewer.post(f"/adapters/{adapter_of_a.id}/deploy", **csrf(viewer)).status_code == 403
    assert viewer.post(f"/adapters/{adapter_of_a.id}/undeploy", **csrf(viewer)).status_code == 403
    playground = viewer.get("/playground/").content.decode()
    assert "cannot run inference" in playground and 'id="playground"' not in playground
    # The owner, on the same page with the same engine, gets the chat form: the viewer's refusal
    # above is its role's.
    assert 'id="playground"' in browser(org_a.owner).get("/playground/").content.decode()
    # Without the CSRF token even the owner is refused.
    assert browser(org_a.owner).post(f"/adapters/{adapter_of_a.id}/deploy").status_code == 403


@pytest.mark.django_db
def test_the_playground_offers_deployed_adapters_and_served_base_models(org_a, adapter_of_a, settings):
    settings.ENGINE_REPLICAS = {BASE: ["http://127.0.0.1:9"]}
    client = browser(org_a.owner)
    html = client.get("/playground/").content.decode()
    assert f'<option value="{BASE}"' in html and adapter_of_a.name not in html
    Adapter.objects.filter(pk=adapter_of_a.pk).update(deployed=True)
    html = client.get(f"/playground/?model={adapter_of_a.name}").content.decode()
    assert f'<option value="{adapter_of_a.name}" selected' in html
    assert 'data-endpoint="/v1/chat/completions"' in html and "playground.js" in html
    assert 'for="prompt"' in html and 'for="model-left"' in html
