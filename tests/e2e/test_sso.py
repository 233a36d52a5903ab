"""Single sign-on against a real OpenID provider: django-oauth-toolkit in a second process (its
own Django project, database and RSA key), the platform under uvicorn, the browser's part played
by an HTTP client that follows the redirects and fills in the provider's sign-in form."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from axes.models import AccessFailureLog

from serving.engine import stop_process_group
from tests.conftest import REPO, GatewayProcess, free_port, make_tenant, make_user, wait_for
from tuneplex.tenancy.models import Membership, User

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

PROVIDER_USERS = [
    {"username": "alice", "password": "alice-password-1", "email": "alice@idp.example",
     "email_verified": True, "groups": ["acme-admins", "unmapped-group"]},
    # An account at the provider whose address the provider never verified: it claims the
    # address of someone the platform knows.
    {"username": "mallory", "password": "mallory-password-1", "email": "victim@acme.example",
     "email_verified": False},
]


@pytest.fixture
def provider(tmp_path):
    """The OpenID provider, started for the test and stopped after it."""
    port, platform_port = free_port(), free_port()
    environ = {**os.environ, "OP_DATA_DIR": str(tmp_path / "op"), "PYTHONPATH": str(REPO),
               "DJANGO_SETTINGS_MODULE": "tests.oidc_provider.settings"}
    created = subprocess.run(
        [sys.executable, "-m", "tests.oidc_provider.bootstrap",
         f"http://127.0.0.1:{platform_port}/oidc/callback/", json.dumps(PROVIDER_USERS)],
        cwd=REPO, env=environ, capture_output=True, text=True, timeout=120)
    assert created.returncode == 0, created.stderr[-3000:]
    client = json.loads(created.stdout.strip().splitlines()[-1])
    log = (tmp_path / "op.log").open("w")
    process = subprocess.Popen([sys.executable, "-m", "django", "runserver", "--noreload",
                                f"127.0.0.1:{port}"], cwd=REPO, env=environ, stdout=log,
                               stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}/o"

    def up() -> bool:
        assert process.poll() is None, (tmp_path / "op.log").read_text()[-3000:]
        try:
            return httpx.get(f"{base}/.well-known/openid-configuration", timeout=2).is_success
        except httpx.HTTPError:
            return False

    try:
        wait_for(up, timeout=60, message="the OpenID provider")
        discovery = httpx.get(f"{base}/.well-known/openid-configuration").json()
        yield {"platform_port": platform_port, "subjects": client["subjects"], "environment": {
            "TUNEPLEX_OIDC_CLIENT_ID": client["client_id"],
            "TUNEPLEX_OIDC_CLIENT_SECRET": client["client_secret"],
            "TUNEPLEX_OIDC_AUTHORIZATION_URL": discovery["authorization_endpoint"],
            "TUNEPLEX_OIDC_TOKEN_URL": discovery["token_endpoint"],
            "TUNEPLEX_OIDC_USERINFO_URL": discovery["userinfo_endpoint"],
            "TUNEPLEX_OIDC_JWKS_URL": discovery["jwks_uri"],
            "TUNEPLEX_OIDC_GROUPS": "acme-admins=acme:admin,other=nowhere:viewer"}}
    finally:
        stop_process_group(process, timeout=10)
        log.close()


def sign_in_through_the_provider(platform_url: str, username: str, password: str) -> httpx.Response:
    with httpx.Client(follow_redirects=True, timeout=30) as browser:
        form = browser.get(f"{platform_url}/oidc/authenticate/")
        assert "/accounts/login/" in str(form.url), form.url  # the provider asks who we are
        return browser.post(form.url, data={
            "username": username, "password": password,
            "csrfmiddlewaretoken": browser.cookies["op_csrftoken"]},
            headers={"Referer": str(form.url)})


def test_single_sign_on_lands_in_the_mapped_organization_with_the_mapped_role(
        provider, test_database_url):
    acme = make_tenant("Acme")
    assert acme.organization.slug == "acme"
    local = make_user("alice")  # a local account with the same name is never taken over
    # ... nor one named like the fallback the provider's account would get next.
    fallback = make_user(f"alice-{provider['subjects']['alice']}")
    platform = GatewayProcess(database_url=test_database_url, engine=None,
                              port=provider["platform_port"], extra_env=provider["environment"])
    try:
        landed = sign_in_through_the_provider(platform.url, "alice", "alice-password-1")
        assert landed.status_code == 200, landed.text[-2000:]
        assert str(landed.url).startswith(platform.url) and "Acme" in landed.text
        signed_in = User.objects.get(oidc_subject__isnull=False)
        assert signed_in.pk not in (local.pk, fallback.pk)
        assert signed_in.username.startswith("alice-")
        assert signed_in.email == "alice@idp.example"  # verified by the provider: kept
        membership = Membership.objects.get(user=signed_in)
        assert (membership.organization_id, membership.role) == (acme.organization.id, "admin")
        assert not Membership.objects.filter(user__in=[local, fallback]).exists()
        # The second sign-in finds the same account (by the provider's subject).
        again = sign_in_through_the_provider(platform.url, "alice", "alice-password-1")
        assert again.status_code == 200 and User.objects.filter(
            oidc_subject__isnull=False).count() == 1
        wrong = sign_in_through_the_provider(platform.url, "alice", "not-her-password")
        assert "/accounts/login/" in str(wrong.url)  # the provider refused: nothing reached us
    finally:
        platform.stop()


def test_an_address_the_provider_did_not_verify_is_not_kept_and_the_person_is_told(
        provider, test_database_url):
    make_tenant("Acme")
    platform = GatewayProcess(database_url=test_database_url, engine=None,
                              port=provider["platform_port"], extra_env=provider["environment"])
    try:
        landed = sign_in_through_the_provider(platform.url, "mallory", "mallory-password-1")
        assert landed.status_code == 200, landed.text[-2000:]
        assert "has not verified your email address victim@acme.example" in landed.text
        mallory = User.objects.get(oidc_subject=provider["subjects"]["mallory"])
        assert mallory.email == ""  # nothing is matched by it
        assert not Membership.objects.filter(user=mallory).exists() and "Acme" not in landed.text
    finally:
        platform.stop()


def test_a_failed_single_sign_on_is_refused_counted_per_browser_not_per_address(
        provider, test_database_url):
    """A code the provider refuses is a failed sign-in (not a 500). Failures count for the
    browser that made them: once it is locked, another browser at the same address still signs
    in (they used to share one empty username per address)."""
    make_tenant("Acme")
    platform = GatewayProcess(database_url=test_database_url, engine=None,
                              port=provider["platform_port"],
                              extra_env={**provider["environment"],
                                         "TUNEPLEX_LOGIN_FAILURE_LIMIT": "2"})
    try:
        with httpx.Client(timeout=30) as attacker:
            answers = []
            for _ in range(3):
                start = attacker.get(f"{platform.url}/oidc/authenticate/")
                state = parse_qs(urlsplit(start.headers["location"]).query)["state"][0]
                answers.append(attacker.get(f"{platform.url}/oidc/callback/",
                                            params={"code": "forged", "state": state}))
            assert [a.status_code for a in answers] == [302, 429, 429], answers  # 2 failures
            assert answers[0].headers["location"] == "/login/?sso=failed"
        failures = list(AccessFailureLog.objects.values_list("username", flat=True))
        assert len(failures) == 3 and len(set(failures)) == 1 and failures[0].startswith("sso:")
        landed = sign_in_through_the_provider(platform.url, "alice", "alice-password-1")
        assert landed.status_code == 200 and "Acme" in landed.text, landed.text[-2000:]
    finally:
        platform.stop()
