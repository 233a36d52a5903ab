"""Every dashboard page, server side: what each role sees, what it may do, and that another
organization's objects do not exist for it. The browser suite (tests/e2e/test_dashboard.py)
drives the same pages in Chromium."""

from __future__ import annotations

import json
import re

import pytest
from django.utils import timezone
from django.urls import get_resolver

from tests.conftest import add_member, bearer, make_user
from tests.fixtures.adapter_rows import adapter_row
from tests.fixtures.datasets import good_chat, lines_to_bytes
from tests.frontend.conftest import browser, csrf, form
from tuneplex.apikeys.models import ApiKey
from tuneplex.audit.models import AuditEvent
from tuneplex.core.scopes import Role
from tuneplex.feedback.models import Feedback
from tuneplex.files.models import File
from tuneplex.finetuning.models import FineTuningJob
from tuneplex.sweeps.models import Sweep
from tuneplex.tenancy.models import Invitation, Membership
from tuneplex.tenancy.services import invitation_create

pytestmark = pytest.mark.django_db
PAGES = ["/", "/datasets/", "/jobs/", "/adapters/", "/playground/", "/feedback/", "/team/",
         "/api-keys/"]


def upload(tenant, content: bytes, name: str = "train.jsonl") -> File:
    from django.core.files.uploadedfile import SimpleUploadedFile

    response = bearer(tenant.owner_key).post(
        "/v1/files", {"file": SimpleUploadedFile(name, content), "purpose": "fine-tune"},
        format="multipart")
    assert response.status_code == 200, response.content
    return File.objects.get(id=response.json()["id"])


def a_job(tenant, base_model, **fields) -> FineTuningJob:
    defaults = {"training_file": "file-x", "seed": 1, "status": FineTuningJob.Status.RUNNING}
    return FineTuningJob.objects.create(organization=tenant.organization, base_model=base_model,
                                        **(defaults | fields))


@pytest.fixture
def objects_of_b(org_b, default_model):
    """One of each object a dashboard route takes an id of, all in organization B."""
    file = upload(org_b, good_chat())
    job = a_job(org_b, default_model, training_file=file.id)
    return {"dataset": file.id, "job": job.id,
            "adapter": adapter_row(org_b.organization, default_model).id,
            "member": Membership.objects.get(organization=org_b.organization, user=org_b.owner).id,
            "api-key": ApiKey.objects.filter(organization=org_b.organization).first().id,
            "invitation": invitation_create(organization=org_b.organization,
                                            actor=org_b.principal(), invitee="someone-else",
                                            role="admin", base_url="http://b.example").invitation.id,
            "sweep": Sweep.objects.create(
                organization=org_b.organization, model=default_model.name, training_file=file.id,
                search_space={"lora_rank": {"type": "categorical", "choices": [4]}},
                sampler="random", pruner="none", max_trials=1, seed=1).id}


def _id_routes() -> list[tuple[str, str]]:
    """(route name, path pattern) of every dashboard route that takes an object id."""
    routes = []
    for pattern in get_resolver().url_patterns:
        if getattr(pattern, "namespace", None) != "frontend":
            continue
        for sub in pattern.url_patterns:
            if "<oid:id>" in str(sub.pattern):
                routes.append((sub.name, str(sub.pattern)))
    return routes


def test_every_id_route_is_a_404_for_another_organizations_object(org_a, objects_of_b, org_b):
    routes = _id_routes()
    assert len(routes) >= 11
    client = browser(org_a.owner)
    before = {key: value for key, value in objects_of_b.items()}
    for name, pattern in routes:
        kind = next((k for k in sorted(objects_of_b, key=len, reverse=True) if name.startswith(k)),
                    None)
        assert kind is not None, f"route {name} takes an id: add its object to objects_of_b"
        url = "/" + pattern.replace("<oid:id>", objects_of_b[kind])
        for method in ("get", "post"):
            response = getattr(client, method)(url, **csrf(client))
            assert response.status_code in (404, 405), (method, url, response.status_code)
    assert File.objects.filter(id=before["dataset"]).exists()
    assert FineTuningJob.objects.get(id=before["job"]).status == "running"
    assert ApiKey.objects.get(id=before["api-key"]).revoked_at is None
    assert Membership.objects.filter(id=before["member"]).exists()
    assert Invitation.objects.get(id=before["invitation"]).status == "pending"


def test_every_page_renders_for_each_role_and_lists_only_its_own_organization(
        org_a, org_b, objects_of_b, default_model):
    mine = upload(org_a, good_chat(), name="mine.jsonl")
    for role in Role.values:
        user = org_a.owner if role == Role.OWNER else add_member(org_a, role)
        client = browser(user)
        for page in PAGES:
            response = client.get(page)
            assert response.status_code == 200, (role, page)
            html = response.content.decode()
            assert all(value not in html for value in objects_of_b.values()), (role, page)
        assert mine.id in client.get("/datasets/").content.decode()
        audit = client.get("/audit/")
        assert audit.status_code == (200 if role in (Role.OWNER, Role.ADMIN) else 403)


def test_a_viewer_sees_no_write_controls_and_is_refused_when_forging(org_a, default_model):
    file = upload(org_a, good_chat())
    job = a_job(org_a, default_model, training_file=file.id)
    viewer = browser(add_member(org_a, Role.VIEWER))
    for page in ["/datasets/", f"/datasets/{file.id}/", "/jobs/", f"/jobs/{job.id}/", "/team/",
                 "/api-keys/", "/feedback/"]:
        html = viewer.get(page).content.decode()
        assert "hx-post" not in html, page
        assert not re.search(r'<form method="post" action="/(?!logout|organizations)', html), page
        assert 'id="upload"' not in html and "New job" not in html and "Create key" not in html
    assert viewer.get("/jobs/new").status_code == 403
    forged = [(f"/datasets/{file.id}/delete", {}), ("/jobs/new", {"training_file": file.id}),
              ("/jobs/new/check", {}), (f"/jobs/{job.id}/cancel", {}),
              (f"/jobs/{job.id}/pause", {}), (f"/jobs/{job.id}/resume", {}),
              ("/api-keys/", {"name": "x", "scopes": ["read"]}), ("/feedback/export", {}),
              ("/team/invitations", {"invitee": "someone", "role": "admin"})]
    for url, data in forged:
        assert viewer.post(url, form(viewer, data)).status_code == 403, url
    refused = viewer.post("/v1/feedback", json.dumps({"rating": 1}),
                          content_type="application/json", **csrf(viewer))
    assert refused.status_code == 403
    assert File.objects.filter(id=file.id).exists()
    assert FineTuningJob.objects.get(id=job.id).cancel_requested is False
    assert FineTuningJob.objects.get(id=job.id).pause_requested is False
    assert FineTuningJob.objects.filter(organization=org_a.organization).count() == 1
    assert ApiKey.objects.filter(organization=org_a.organization).count() == 1
    # Without the CSRF token even the owner is refused.
    assert browser(org_a.owner).post(f"/datasets/{file.id}/delete").status_code == 403


def test_a_bad_upload_shows_each_problem_with_its_line(org_a):
    bad = lines_to_bytes(['{"messages": [{"role": "user", "content": "hi"}]}', "not json",
                          '{"messages": [{"role": "wizard", "content": "x"}, '
                          '{"role": "assistant", "content": "y"}]}'])
    file = upload(org_a, bad, name="broken.jsonl")
    assert file.status == "error"
    html = browser(org_a.owner).get(f"/datasets/{file.id}/").content.decode()
    assert "not usable" in html and "Fine-tune on this dataset" not in html
    rows = re.findall(r"<tr><td>(\d+)</td><td><code>(\w+)</code>", html)
    codes = {code: int(line) for line, code in rows}
    assert codes.get("invalid_json") == 2 and 1 in codes.values() and 3 in codes.values(), rows
    listing = browser(org_a.owner).get("/datasets/").content.decode()
    assert "broken.jsonl" in listing and "problem" in listing


def test_a_dataset_page_previews_the_first_examples_and_polls_for_statistics(org_a):
    file = upload(org_a, good_chat(14))
    client = browser(org_a.owner)
    html = client.get(f"/datasets/{file.id}/").content.decode()
    assert "Question 0?" in html and "Answer 4." in html and "Question 5?" not in html
    assert f'hx-get="/datasets/{file.id}/statistics"' in html  # pending: polls
    File.objects.filter(pk=file.pk).update(statistics_status="ready", statistics={
        "examples": 14, "total_tokens": 700, "trained_tokens": 90, "model": "m",
        "token_length": {"min": 40, "mean": 50, "p50": 50, "p95": 55, "max": 60,
                         "histogram": [{"min": 32, "max": 63, "count": 14}]},
        "max_sequence_length": 2048, "examples_over_max_length": 0, "duplicates": 0,
        "role_counts": {"assistant": 14, "user": 14}})
    done = client.get(f"/datasets/{file.id}/statistics")
    assert done.status_code == 286  # htmx stops polling
    html = done.content.decode()
    assert 'id="length-histogram"' in html and '"count": 14' in html and "hx-trigger" not in html


def _check(client, data):
    return client.post("/jobs/new/check", form(client, data)).content.decode()


def test_the_new_job_form_checks_fields_inline_and_estimates_before_submitting(org_a, default_model):
    file = upload(org_a, good_chat(40))
    client = browser(org_a.owner)
    page = client.get(f"/jobs/new?file={file.id}").content.decode()
    assert f'<option value="{file.id}" selected' in page and 'hx-post="/jobs/new/check"' in page
    base = {"model": default_model.name, "training_file": file.id, "preset": "balanced",
            "method": "lora"}
    fine = _check(client, base)
    assert 'id="estimate-memory"' in fine and 'id="estimate-time"' in fine
    assert "40 examples" in fine and "Ready to start" in fine
    bad_rank = _check(client, base | {"lora_rank": "0"})
    assert ('id="error-lora_rank" hx-swap-oob="true">must be between 1 and 256 (got 0)</p>'
            in bad_rank), bad_rank
    assert "lora_rank: must be between 1 and 256" in bad_rank  # the summary names the field
    assert 'id="estimate-memory"' not in bad_rank
    not_a_number = _check(client, base | {"n_epochs": "three"})
    assert 'id="error-n_epochs" hx-swap-oob="true">Enter a whole number.</p>' in not_a_number
    qlora = _check(client, base | {"method": "qlora"})
    assert re.search(r'id="error-method" hx-swap-oob="true">QLoRA needs CUDA', qlora)

    refused = client.post("/jobs/new", form(client, base | {"learning_rate": "5"}))
    assert refused.status_code == 400 and FineTuningJob.objects.count() == 0
    assert 'id="error-learning_rate">' in refused.content.decode()
    assert 'value="5"' in refused.content.decode()  # what was typed is kept
    created = client.post("/jobs/new", form(client, base | {"preset": "quick", "suffix": "demo"}))
    job = FineTuningJob.objects.get(organization=org_a.organization)
    assert created.status_code == 302 and created["Location"] == f"/jobs/{job.id}/"
    assert job.config["epochs"] == 1 and job.config["lora_rank"] == 8 and job.suffix == "demo"
    assert AuditEvent.objects.filter(action="finetuning_job.create", object_id=job.id).exists()


def test_the_job_page_polls_until_the_job_has_finished(org_a, default_model):
    job = a_job(org_a, default_model, step=3, total_steps=10, eta_seconds=75)
    job.events.create(type="metrics", message="m", data={"step": 1, "train_loss": 2.5})
    job.events.create(type="metrics", message="m", data={"step": 2, "train_loss": 2.0, "eval_loss": 2.2})
    client = browser(org_a.owner)
    html = client.get(f"/jobs/{job.id}/").content.decode()
    assert 'hx-trigger="every 2s"' in html and "ETA 1 min 15 s" in html and "30%" in html
    assert '"train_loss": [2.5, 2.0]' in html and '"eval_loss": [null, 2.2]' in html
    assert client.get(f"/jobs/{job.id}/progress").status_code == 200
    assert "/tensorboard" not in html  # the curves are stored when an attempt ends
    FineTuningJob.objects.filter(pk=job.pk).update(status="succeeded", step=10,
                                                   started_at=timezone.now())
    finished = client.get(f"/jobs/{job.id}/progress")
    assert finished.status_code == 286 and "hx-trigger" not in finished.content.decode()
    assert "Cancel job" not in finished.content.decode()
    assert f'href="/v1/fine_tuning/jobs/{job.id}/tensorboard"' in finished.content.decode()


def test_cancelling_from_the_job_page(org_a, default_model):
    queued = a_job(org_a, default_model, status="queued")
    client = browser(org_a.owner)
    assert "Cancel job" in client.get(f"/jobs/{queued.id}/").content.decode()
    response = client.post(f"/jobs/{queued.id}/cancel", **csrf(client))
    assert response.status_code == 200 and "cancelled" in response.content.decode()
    assert FineTuningJob.objects.get(pk=queued.pk).status == "cancelled"
    again = client.post(f"/jobs/{queued.id}/cancel", **csrf(client))
    assert again.status_code == 200 and "already cancelled" in again.content.decode()


def test_pausing_and_resuming_from_the_job_page(org_a, default_model):
    running = a_job(org_a, default_model, attempts=1, worker="w1")
    client = browser(org_a.owner)
    html = client.get(f"/jobs/{running.id}/").content.decode()
    assert 'id="pause-job"' in html and 'id="resume-job"' not in html
    pausing = client.post(f"/jobs/{running.id}/pause", **csrf(client)).content.decode()
    assert ">pausing<" in pausing and 'id="pause-job"' not in pausing  # asked once
    assert FineTuningJob.objects.get(pk=running.pk).pause_requested
    FineTuningJob.objects.filter(pk=running.pk).update(status="paused", pause_requested=False)
    paused = client.get(f"/jobs/{running.id}/progress").content.decode()
    assert 'id="resume-job"' in paused and 'id="job-paused"' in paused
    resumed = client.post(f"/jobs/{running.id}/resume", **csrf(client)).content.decode()
    assert ">queued<" in resumed and 'id="pause-job"' in resumed
    assert FineTuningJob.objects.get(pk=running.pk).status == "queued"
    again = client.post(f"/jobs/{running.id}/resume", **csrf(client))
    assert again.status_code == 200 and "Only a paused job can be resumed" in again.content.decode()


def test_an_api_key_is_shown_once_and_revocation_takes_effect(org_a, member_of_a):
    client = browser(member_of_a)
    created = client.post("/api-keys/", form(client, {"name": "ci", "scopes": ["read", "train"]}))
    html = created.content.decode()
    key = re.search(r'id="new-key" readonly value="(tpx_\w+)"', html).group(1)
    assert created["Cache-Control"] == "no-store"
    assert bearer(key).get("/v1/organization").status_code == 200
    assert key not in client.get("/api-keys/").content.decode()
    api_key = ApiKey.objects.get(name="ci")
    assert api_key.scopes == ["read", "train"] and api_key.hashed_key != key
    # A member cannot revoke the owner's key (no button, 403 when forged), but their own.
    owners = ApiKey.objects.get(organization=org_a.organization, created_by=org_a.owner)
    assert client.post(f"/api-keys/{owners.id}/revoke", **csrf(client)).status_code == 403
    revoked = client.post(f"/api-keys/{api_key.id}/revoke", **csrf(client))
    assert revoked.status_code == 200 and "revoked" in revoked.content.decode()
    assert bearer(key).get("/v1/organization").status_code == 401
    # Bad input is shown at its field, and nothing is created.
    for data, where in [({"name": "", "scopes": ["read"]}, "key-name-error"),
                        ({"name": "x", "scopes": []}, "scopes"),
                        ({"name": "x", "scopes": ["admin"]}, "scopes"),
                        ({"name": "x", "scopes": ["read"], "expires_in_days": "-3"}, "key-expiry-error")]:
        response = client.post("/api-keys/", form(client, data))
        assert 400 <= response.status_code < 500, data
    assert ApiKey.objects.filter(organization=org_a.organization).count() == 2


def test_admins_manage_members_but_only_owners_make_owners(org_a):
    admin = add_member(org_a, Role.ADMIN)
    newcomer = make_user("newcomer")
    client = browser(admin)
    invited = client.post("/team/invitations", form(client, {"invitee": "newcomer", "role": "member"}))
    html = invited.content.decode()
    assert invited.status_code == 200 and "Invitation for newcomer created" in html
    assert invited["Cache-Control"] == "no-store"  # the link is shown once
    link = re.search(r'id="invitation-url" readonly value="http://testserver(/invite/[^"]+)"', html)[1]
    assert not Membership.objects.filter(organization=org_a.organization, user=newcomer).exists()
    invitee = browser(newcomer)
    assert invitee.get("/").url == "/invitations/"  # no organization yet: how to join one
    page = invitee.get(link).url
    assert org_a.organization.name in invitee.get(page).content.decode()
    answered = invitee.post(page, form(invitee, {"answer": "accept"}))
    assert answered.status_code == 302
    membership = Membership.objects.get(organization=org_a.organization, user=newcomer)
    assert membership.role == "member"
    row = client.post(f"/team/{membership.id}/role", form(client, {"role": "viewer"}))
    assert row.status_code == 200 and Membership.objects.get(pk=membership.pk).role == "viewer"
    row = client.post(f"/team/{membership.id}/role", form(client, {"role": "owner"}))
    assert "Only an owner" in row.content.decode()
    assert Membership.objects.get(pk=membership.pk).role == "viewer"
    again = client.post("/team/invitations", form(client, {"invitee": "newcomer", "role": "member"}))
    assert again.status_code == 409 and "already a member" in again.content.decode()
    owner_row = Membership.objects.get(organization=org_a.organization, user=org_a.owner)
    assert client.post(f"/team/{owner_row.id}/remove", **csrf(client)).status_code == 200
    assert Membership.objects.filter(pk=owner_row.pk).exists()  # admins cannot remove owners
    assert client.post(f"/team/{membership.id}/remove", **csrf(client)).status_code == 200
    assert not Membership.objects.filter(pk=membership.pk).exists()


def _exchange(i: int) -> list[dict]:
    return [{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": f"Answer {i}."}]


def test_feedback_is_recorded_checked_and_exported_as_a_dataset(org_a, default_model, settings):
    client = browser(org_a.owner)

    def rate(body):
        return client.post("/v1/feedback", json.dumps(body), content_type="application/json",
                           **csrf(client))

    for body, code, param in [
            ({"model": default_model.name, "messages": _exchange(0), "rating": 2}, "invalid_rating", "rating"),
            ({"model": default_model.name, "messages": _exchange(0)[:1], "rating": 1}, "invalid_messages", "messages[0]"),
            ({"model": default_model.name, "messages": [{"role": "x", "content": "y"}], "rating": 1},
             "invalid_messages", "messages[0].role"),
            ({"model": "ft:someone-else", "messages": _exchange(0), "rating": 1}, "model_not_found", "model")]:
        response = rate(body)
        assert response.status_code == 400, body
        assert response.json()["error"]["code"] == code and response.json()["error"]["param"] == param
    assert client.post("/v1/feedback", "[1", content_type="application/json",
                       **csrf(client)).status_code == 400
    assert client.post("/v1/feedback", json.dumps({"rating": 1}),  # the session needs its token
                       content_type="application/json").status_code == 403
    assert not Feedback.objects.exists()

    for i in range(settings.DATASET_MIN_EXAMPLES - 1):
        assert rate({"model": default_model.name, "messages": _exchange(i), "rating": 1}).status_code == 200
    assert rate({"model": default_model.name, "messages": _exchange(99), "rating": -1}).status_code == 200
    too_few = client.post("/feedback/export", form(client, {}))
    assert too_few.status_code == 400 and "needs at least" in too_few.content.decode()
    assert not File.objects.filter(organization=org_a.organization).exists()
    rate({"model": default_model.name, "messages": _exchange(50), "rating": 1})
    exported = client.post("/feedback/export", form(client, {}))
    file = File.objects.get(organization=org_a.organization)
    assert exported.status_code == 302 and exported["Location"] == f"/datasets/{file.id}/"
    assert file.status == "processed" and file.validation["examples"] == settings.DATASET_MIN_EXAMPLES
    assert Feedback.objects.filter(exported_to=file.id).count() == settings.DATASET_MIN_EXAMPLES
    assert Feedback.objects.get(rating=-1).exported_to == ""  # thumbs-down is never trained on
    html = client.get("/feedback/").content.decode()
    assert file.id in html and 'id="exportable-count">0<' in html
