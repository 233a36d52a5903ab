import pytest
from django.test import Client


def test_healthz_answers_without_a_database():
    response = Client().get("/healthz")
    assert response.status_code == 200 and response.json() == {"status": "ok"}


@pytest.mark.django_db
def test_readyz_checks_database_broker_and_storage():
    response = Client().get("/readyz")
    assert response.status_code == 200, response.content
    assert response.json()["checks"] == {"database": "ok", "broker": "ok", "storage": "ok"}


@pytest.mark.django_db
def test_readyz_names_the_failing_dependency(settings):
    from jobs.celery import app

    previous = app.conf.broker_url
    app.conf.broker_url = "redis://127.0.0.1:1/0"
    try:
        response = Client().get("/readyz")
    finally:
        app.conf.broker_url = previous
    assert response.status_code == 503
    body = response.json()
    assert body["failed"] == ["broker"] and body["checks"]["database"] == "ok"


@pytest.mark.django_db
def test_readyz_says_degraded_with_the_reason_when_no_replica_serves_a_base_model(settings):
    settings.ENGINE_REPLICAS = {"SmolLM2-135M-Instruct": ["http://127.0.0.1:9"]}  # nothing listens
    response = Client().get("/readyz")
    assert response.status_code == 200  # the dashboard, API and training still work
    body = response.json()
    assert body["status"] == "degraded" and body["degraded"] == ["serving"] and body["failed"] == []
    assert body["checks"]["serving"].startswith("error: no healthy replica for SmolLM2-135M-Instruct")


@pytest.mark.django_db
def test_readyz_detail_is_for_this_machine_and_admins_only(settings, org_a):
    from django.test import Client

    from tests.conftest import add_member, key_for
    from tuneplex.core.scopes import Role

    settings.STORAGES = {**settings.STORAGES, "artifacts": {
        "BACKEND": "django.core.files.storage.FileSystemStorage",
        "OPTIONS": {"location": "/proc/version/not-a-dir"}}}
    remote = Client(REMOTE_ADDR="203.0.113.9")
    response = remote.get("/readyz")
    assert response.status_code == 503 and response.json() == {"status": "unavailable"}
    proxied = Client().get("/readyz", HTTP_X_FORWARDED_FOR="203.0.113.9")
    assert proxied.json() == {"status": "unavailable"}
    member_key = key_for(org_a, add_member(org_a, Role.MEMBER), ["read"])
    assert remote.get("/readyz", HTTP_AUTHORIZATION=f"Bearer {member_key}").json() == {
        "status": "unavailable"}
    admin = remote.get("/readyz", HTTP_AUTHORIZATION=f"Bearer {org_a.owner_key}").json()
    assert admin["failed"] == ["storage"] and "storage" in admin["checks"]
    assert Client().get("/readyz").json()["failed"] == ["storage"]  # on this machine
