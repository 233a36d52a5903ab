"""The adapter page's Export panel: export in a format, the list with status, progress and the
check's result, polling while one is in flight, download and delete; by role and organization."""

from __future__ import annotations

import pytest
from django.test import Client

from tests.conftest import add_member
from tests.exports.conftest import stored_adapter
from tuneplex.audit.models import AuditEvent
from tuneplex.core.scopes import Role
from tuneplex.exports.models import Export

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def no_messages(monkeypatch):
    from tuneplex.core import queue

    monkeypatch.setattr(queue, "enqueue", lambda *args: None)


@pytest.fixture
def adapter(org_a, tmp_path):
    from tuneplex.basemodels.models import BaseModel

    base = BaseModel.objects.create(name="pages-model", directory="/models/x", parameter_count=1,
                                    max_sequence_length=16, has_chat_template=True)
    return stored_adapter(org_a, base, tmp_path)


def browser(user) -> Client:
    client = Client(enforce_csrf_checks=True)
    client.force_login(user)
    return client


def csrf(client: Client, adapter) -> dict:
    client.get(f"/adapters/{adapter.id}/")
    return {"HTTP_X_CSRFTOKEN": client.cookies["csrftoken"].value}


def test_an_export_is_started_from_the_panel_and_polled_until_it_ends(org_a, adapter):
    client = browser(org_a.owner)
    page = client.get(f"/adapters/{adapter.id}/").content.decode()
    assert '<option value="gguf:q8_0">gguf · q8_0</option>' in page
    assert '<option value="safetensors:">safetensors</option>' in page
    assert "No exports yet." in page and f"/adapters/{adapter.id}/exports/new" in page
    panel = client.post(f"/adapters/{adapter.id}/exports/new", {"kind": "onnx:int8"},
                        **csrf(client, adapter))
    assert panel.status_code == 200
    export = Export.objects.get()
    assert (export.format, export.quantization, export.status) == ("onnx", "int8", "queued")
    html = panel.content.decode()
    assert html.startswith('<section id="exports"') and f'id="export-{export.id}"' in html
    assert 'hx-trigger="every 2s"' in html and "(waiting for the merge)" in html
    # Running: its progress; done: the check, the size and the download, and polling stops.
    Export.objects.filter(pk=export.pk).update(status="running", progress=0.5,
                                               progress_message="Converting")
    polled = client.get(f"/adapters/{adapter.id}/exports")
    assert polled.status_code == 200 and 'value="0.5"' in polled.content.decode()
    assert "50.0% Converting" in polled.content.decode()
    Export.objects.filter(pk=export.pk).update(
        status="succeeded", progress=1.0, bytes=2048, sha256="ab" * 32,
        check_result={"passed": True, "kind": "logits", "max_abs_diff": 0.001})
    done = client.get(f"/adapters/{adapter.id}/exports")
    assert done.status_code == 286  # htmx stops polling
    html = done.content.decode()
    assert "hx-trigger" not in html and "passed" in html and "max_abs_diff 0.001" in html
    assert f'href="/v1/adapters/{adapter.id}/exports/{export.id}/content"' in html
    assert "2.0\xa0KB" in html
    deleted = client.post(f"/adapters/{adapter.id}/exports/{export.id}/delete",
                          **csrf(client, adapter))
    assert deleted.status_code == 200 and "No exports yet." in deleted.content.decode()
    assert not Export.objects.exists()
    assert AuditEvent.objects.filter(action="export.delete", object_id=export.id).exists()


def test_a_failed_check_shows_its_figures(org_a, adapter):
    Export.objects.create(organization=org_a.organization, adapter=adapter, format="gguf",
                          quantization="q4_0", needs_merge=True, status="failed",
                          error="check_failed: 3 of 64 greedy tokens differ",
                          check_result={"passed": False, "kind": "greedy_tokens",
                                        "matching_tokens": 61, "tokens": 64})
    html = browser(org_a.owner).get(f"/adapters/{adapter.id}/").content.decode()
    assert "check_failed: 3 of 64 greedy tokens differ" in html
    assert '<span class="badge bad">failed</span>' in html
    assert "matching_tokens 61" in html and "hx-trigger" not in html


def test_a_refused_export_says_why_in_the_panel(org_a, adapter):
    client = browser(org_a.owner)
    panel = client.post(f"/adapters/{adapter.id}/exports/new", {"kind": "safetensors:q8_0"},
                        **csrf(client, adapter))
    assert panel.status_code == 200 and 'role="alert"' in panel.content.decode()
    assert "not a quantization of safetensors" in panel.content.decode()
    assert not Export.objects.exists()


def test_viewers_see_exports_but_no_buttons_and_others_see_nothing(org_a, org_b, adapter):
    export = Export.objects.create(organization=org_a.organization, adapter=adapter,
                                   format="gguf-lora", quantization="f16", needs_merge=False,
                                   status="succeeded")
    viewer = browser(add_member(org_a, Role.VIEWER))
    html = viewer.get(f"/adapters/{adapter.id}/").content.decode()
    assert f'id="export-{export.id}"' in html and "/exports/new" not in html
    assert "/delete" not in html
    assert viewer.post(f"/adapters/{adapter.id}/exports/new", {"kind": "onnx:fp32"},
                       **csrf(viewer, adapter)).status_code == 403
    other = browser(org_b.owner)
    assert other.get(f"/adapters/{adapter.id}/").status_code == 404
    assert other.get(f"/adapters/{adapter.id}/exports").status_code == 404
    token = {"HTTP_X_CSRFTOKEN": (other.get("/adapters/"), other.cookies["csrftoken"].value)[1]}
    assert other.post(f"/adapters/{adapter.id}/exports/{export.id}/delete",
                      **token).status_code == 404
    assert Export.objects.filter(pk=export.pk).exists()
