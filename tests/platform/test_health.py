import pytest
from django.test import Client

from tuneplex.operations import health


@pytest.fixture(autouse=True)
def fresh_readiness(settings):
    """Each test starts with no result kept and no calls counted (both live in the process)."""
    health.last_result.forget()
    health.calls_per_address.forget()
    yield
    health.last_result.forget()
    health.calls_per_address.forget()


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


@pytest.fixture
def broken_storage(settings):
    settings.STORAGES = {**settings.STORAGES, "artifacts": {
        "BACKEND": "django.core.files.storage.FileSystemStorage",
        "OPTIONS": {"location": "/proc/version/not-a-dir"}}}


@pytest.mark.django_db
def test_readyz_detail_is_for_operators_only(settings, org_a, broken_storage):
    from tests.conftest import add_member, key_for
    from tuneplex.core.scopes import Role

    settings.METRICS_TOKEN = "t" * 32
    remote = Client(REMOTE_ADDR="203.0.113.9")
    response = remote.get("/readyz")
    assert response.status_code == 503 and response.json() == {"status": "unavailable"}
    proxied = Client().get("/readyz", HTTP_X_FORWARDED_FOR="203.0.113.9")
    assert proxied.json() == {"status": "unavailable"}
    member_key = key_for(org_a, add_member(org_a, Role.MEMBER), ["read"])
    assert remote.get("/readyz", HTTP_AUTHORIZATION=f"Bearer {member_key}").json() == {
        "status": "unavailable"}
    # An organization's admin runs a tenant, not the platform: no internals.
    assert remote.get("/readyz", HTTP_AUTHORIZATION=f"Bearer {org_a.owner_key}").json() == {
        "status": "unavailable"}
    admin = Client(REMOTE_ADDR="203.0.113.9")
    admin.force_login(org_a.owner)
    assert admin.get("/readyz").json() == {"status": "unavailable"}
    # Operators: this machine, the metrics token, a staff user.
    assert Client().get("/readyz").json()["failed"] == ["storage"]
    token = remote.get("/readyz", HTTP_AUTHORIZATION=f"Bearer {settings.METRICS_TOKEN}").json()
    assert token["failed"] == ["storage"] and "/proc/version" in token["checks"]["storage"]
    org_a.owner.is_staff = True
    org_a.owner.save()
    assert admin.get("/readyz").json()["failed"] == ["storage"]


def _counted_checks(monkeypatch) -> dict[str, int]:
    runs = {name: 0 for name in health.CHECKS}
    for name, check in list(health.CHECKS.items()):
        def counted(check=check, name=name):
            runs[name] += 1
            check()
        monkeypatch.setitem(health.CHECKS, name, counted)
    return runs


@pytest.mark.django_db
def test_readyz_runs_its_checks_once_per_cache_period(settings, monkeypatch):
    settings.READYZ_CACHE_SECONDS = 5
    now = [1000.0]
    monkeypatch.setattr(health, "clock", lambda: now[0])
    runs = _counted_checks(monkeypatch)
    for _ in range(5):
        assert Client().get("/readyz").json()["status"] == "ok"
    assert runs == {"database": 1, "broker": 1, "storage": 1}
    now[0] += 4.9
    Client().get("/readyz")
    assert runs["database"] == 1
    now[0] += 0.2  # the result is now older than 5 s: the next call checks again
    Client().get("/readyz")
    assert runs == {"database": 2, "broker": 2, "storage": 2}


@pytest.mark.django_db
def test_a_failure_is_seen_within_the_cache_period(settings, monkeypatch):
    settings.READYZ_CACHE_SECONDS = 5
    now = [1000.0]
    monkeypatch.setattr(health, "clock", lambda: now[0])
    assert Client().get("/readyz").status_code == 200
    settings.STORAGES = {**settings.STORAGES, "artifacts": {
        "BACKEND": "django.core.files.storage.FileSystemStorage",
        "OPTIONS": {"location": "/proc/version/not-a-dir"}}}
    assert Client().get("/readyz").status_code == 200  # the kept result
    now[0] += 5
    assert Client().get("/readyz").status_code == 503


@pytest.mark.django_db
def test_readyz_limits_each_address(settings, monkeypatch):
    settings.READYZ_RATE_LIMIT = 3
    now = [1000.0]
    monkeypatch.setattr(health, "clock", lambda: now[0])
    first = Client(REMOTE_ADDR="203.0.113.9")
    assert [first.get("/readyz").status_code for _ in range(3)] == [200] * 3
    now[0] += 20
    refused = first.get("/readyz")
    assert refused.status_code == 429 and refused["Retry-After"] == "40"
    body = refused.json()
    assert body["error"]["code"] == "rate_limit_exceeded" and body["request_id"] == refused[
        "X-Request-Id"]
    assert Client(REMOTE_ADDR="203.0.113.10").get("/readyz").status_code == 200  # another address
    now[0] += 40  # a new minute
    assert first.get("/readyz").status_code == 200


def test_the_address_table_is_bounded():
    table = health._CallsPerAddress(size=3)
    for index in range(10):
        assert table.refused_for(f"10.0.0.{index}", 1) is None
    assert len(table._windows) == 3
    assert table.refused_for("10.0.0.9", 1) is not None  # the most recent are remembered


def test_readyz_settings_are_read_from_the_environment():
    import os
    import subprocess
    import sys

    code = ("import django; django.setup(); from django.conf import settings; "
            "print(settings.READYZ_CACHE_SECONDS, settings.READYZ_RATE_LIMIT)")
    environ = dict(os.environ, DJANGO_SETTINGS_MODULE="tuneplex.settings",
                   TUNEPLEX_READYZ_CACHE_SECONDS="2", TUNEPLEX_READYZ_RATE_LIMIT="7")
    shown = subprocess.run([sys.executable, "-c", code], env=environ, capture_output=True,
                           text=True, check=True).stdout.split()
    assert shown == ["2", "7"]


@pytest.mark.e2e
@pytest.mark.django_db(transaction=True)
def test_under_uvicorn_a_burst_runs_the_checks_once_and_each_address_is_limited(test_database_url,
                                                                               tmp_path):
    """20 callers at once while storage is broken: one run of the checks (its failure logged
    once), every caller told 503; past the limit, 429 with Retry-After."""
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    from tests.conftest import GatewayProcess

    a_file = tmp_path / "a-file"
    a_file.write_text("storage cannot be a folder under a file")
    web = GatewayProcess(database_url=test_database_url, engine=None, extra_env={
        "TUNEPLEX_ARTIFACTS_DIR": str(a_file / "artifacts"), "TUNEPLEX_READYZ_CACHE_SECONDS": "60",
        "TUNEPLEX_READYZ_RATE_LIMIT": "30"})
    try:
        with ThreadPoolExecutor(20) as pool:
            burst = list(pool.map(lambda _: httpx.get(f"{web.url}/readyz", timeout=30), range(20)))
        assert [r.status_code for r in burst] == [503] * 20
        assert {r.json()["failed"][0] for r in burst} == {"storage"}  # loopback: an operator
        assert web.log_path.read_text().count("readiness check storage failed") == 1
        more = [httpx.get(f"{web.url}/readyz", timeout=30) for _ in range(11)]
        assert [r.status_code for r in more] == [503] * 10 + [429]
        assert 0 < int(more[-1].headers["Retry-After"]) <= 60
        assert web.log_path.read_text().count("readiness check storage failed") == 1
    finally:
        web.stop()
