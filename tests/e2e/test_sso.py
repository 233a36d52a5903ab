"""Single sign-on against a real OpenID provider: django-oauth-toolkit in a second process (its
own Django project, database and RSA key), the platform under uvicorn, the browser's part played
by an HTTP client that follows the redirects and fills in the provider's sign-in form."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import httpx
import pytest

from serving.engine import stop_process_group
from tests.conftest import REPO, GatewayProcess, free_port, make_tenant, make_user, wait_for
from tuneplex.tenancy.models import Membership, User

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def provider(tmp_path):
    """The OpenID provider, started for the test and stopped after it."""
    port, platform_port = free_port(), free_port()
    environ = {**os.environ, "OP_DATA_DIR": str(tmp_path / "op"), "PYTHONPATH": str(REPO),
               "DJANGO_SETTINGS_MODULE": "tests.oidc_provider.settings"}
    created = subprocess.run(
        [sys.executable, "-m", "tests.oidc_provider.bootstrap",
         f"http://127.0.0.1:{platform_port}/oidc/callback/", "alice", "alice-password-1",
         "acme-admins", "unmapped-group"],
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
        yield {"platform_port": platform_port, "environment": {
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
    platform = GatewayProcess(database_url=test_database_url, engine=None,
                              port=provider["platform_port"], extra_env=provider["environment"])
    try:
        landed = sign_in_through_the_provider(platform.url, "alice", "alice-password-1")
        assert landed.status_code == 200, landed.text[-2000:]
        assert str(landed.url).startswith(platform.url) and "Acme" in landed.text
        signed_in = User.objects.get(oidc_subject__isnull=False)
        assert signed_in.pk != local.pk and signed_in.username.startswith("alice-")
        assert signed_in.email == "alice@idp.example"
        membership = Membership.objects.get(user=signed_in)
        assert (membership.organization_id, membership.role) == (acme.organization.id, "admin")
        assert not Membership.objects.filter(user=local).exists()
        # The second sign-in finds the same account (by the provider's subject).
        again = sign_in_through_the_provider(platform.url, "alice", "alice-password-1")
        assert again.status_code == 200 and User.objects.filter(
            oidc_subject__isnull=False).count() == 1
        wrong = sign_in_through_the_provider(platform.url, "alice", "not-her-password")
        assert "/accounts/login/" in str(wrong.url)  # the provider refused: nothing reached us
    finally:
        platform.stop()
