"""Sign-in throttling: three budgets (a username from one address, a username from any address,
an address for any usernames), failed single sign-ons counted per browser, the client address
taken from the proxy only when uvicorn trusts it, and the OpenID provider reached over https."""

from __future__ import annotations

import json
import re

import httpx
import pytest
from axes.models import AccessAttempt
from django.contrib.auth import authenticate
from django.contrib.sessions.backends.db import SessionStore
from django.test import Client, RequestFactory
from tuneplex.tenancy.models import User

from tests.conftest import GatewayProcess
from tests.platform.test_settings import _load_settings

pytestmark = pytest.mark.django_db

PASSWORD = "the-right-password-1"


@pytest.fixture
def limits(settings):
    """Small budgets: 3 for a username from one address, 6 from any, 10 for one address."""
    settings.AXES_FAILURE_LIMIT = 3
    settings.LOGIN_USERNAME_FAILURE_LIMIT = 6
    settings.LOGIN_ADDRESS_FAILURE_LIMIT = 10


def sign_in(address: str, username: str, password: str) -> int:
    return Client(REMOTE_ADDR=address).post(
        "/login/", {"username": username, "password": password}).status_code


def test_one_username_is_locked_from_every_address_past_its_own_limit(limits):
    User.objects.create_user("target", password=PASSWORD)
    for address, times in (("10.0.0.1", 2), ("10.0.0.2", 2), ("10.0.0.3", 1)):
        for _ in range(times):  # never 3 from one address: no pair is locked
            assert sign_in(address, "target", "wrong") == 200
    assert sign_in("10.0.0.9", "target", PASSWORD) == 302  # 5 failures: still open
    assert sign_in("10.0.0.3", "target", "wrong") == 429  # the 6th, from any address, locks it
    assert sign_in("10.0.0.10", "target", PASSWORD) == 429  # even from a fresh address
    User.objects.create_user("bystander", password=PASSWORD)
    assert sign_in("10.0.0.1", "bystander", PASSWORD) == 302  # other users are not affected


def test_one_address_is_locked_for_every_username_past_its_limit(limits):
    User.objects.create_user("mine", password=PASSWORD)
    User.objects.create_user("victim", password=PASSWORD)
    for i in range(9):  # one failure per username: no username is near its limits
        assert sign_in("10.1.1.1", f"guess-{i}", "wrong") == 200
    # The attacker's own successful sign-in does not reset the address's budget.
    assert sign_in("10.1.1.1", "mine", PASSWORD) == 302
    assert sign_in("10.1.1.1", "guess-9", "wrong") == 429  # the 10th failure from the address
    assert sign_in("10.1.1.1", "victim", PASSWORD) == 429
    assert sign_in("10.1.1.2", "victim", PASSWORD) == 302  # the same user from elsewhere


def _oidc_callback(session_key: str):
    """What a failed single sign-on looks like to Django: authenticate() with the OpenID
    backend's credentials, no username, and no backend that accepts them."""
    request = RequestFactory().get("/oidc/callback/", REMOTE_ADDR="10.2.2.2")
    request.session = SessionStore(session_key)
    authenticate(request, nonce="n", code_verifier="v")
    return request


def test_failed_single_sign_ons_are_counted_per_browser_not_per_address(limits):
    first, second = SessionStore(), SessionStore()
    first.create()
    second.create()
    for _ in range(3):
        attempt = _oidc_callback(first.session_key)
    assert attempt.axes_locked_out  # one browser that keeps failing is locked
    assert not _oidc_callback(second.session_key).axes_locked_out  # another at that address is not
    names = set(AccessAttempt.objects.values_list("username", flat=True))
    assert len(names) == 2 and all(name.startswith("sso:") for name in names), names


@pytest.mark.django_db(transaction=True)  # the server's failure rows are emptied afterwards
def test_the_address_is_the_proxys_client_only_when_uvicorn_trusts_the_proxy(
        test_database_url):
    """Through the real server: failures that each claim another address in X-Forwarded-For
    count against the caller's own address when uvicorn does not trust it (FORWARDED_ALLOW_IPS
    names the proxy's address only); the same requests from the trusted proxy count per client."""
    limits = {"TUNEPLEX_LOGIN_FAILURE_LIMIT": "2", "TUNEPLEX_LOGIN_USERNAME_FAILURE_LIMIT": "2",
              "TUNEPLEX_LOGIN_ADDRESS_FAILURE_LIMIT": "3"}

    def failures_until_locked(url: str, run: str) -> list[int]:
        answers = []
        with httpx.Client(base_url=url, timeout=30) as client:
            for i in range(4):
                token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"',
                                  client.get("/login/").text)[1]
                answers.append(client.post("/login/", headers={
                    "X-Forwarded-For": f"203.0.113.{i + 1}"}, data={
                    "username": f"{run}-{i}", "password": "wrong",
                    "csrfmiddlewaretoken": token}).status_code)
        return answers

    for trusted, expected in (("10.255.255.1", [200, 200, 429, 429]),  # all from 127.0.0.1
                              ("127.0.0.1", [200, 200, 200, 200])):  # each its own address
        platform = GatewayProcess(database_url=test_database_url, engine=None,
                                  extra_env={**limits, "FORWARDED_ALLOW_IPS": trusted})
        try:
            assert failures_until_locked(platform.url, trusted) == expected, trusted
        finally:
            platform.stop()


def _oidc_environment(**endpoints: str) -> dict[str, str]:
    return {"TUNEPLEX_OIDC_CLIENT_ID": "tuneplex", "TUNEPLEX_OIDC_CLIENT_SECRET": "s" * 32,
            "TUNEPLEX_OIDC_AUTHORIZATION_URL": "https://idp.example/authorize",
            "TUNEPLEX_OIDC_TOKEN_URL": "https://idp.example/token",
            "TUNEPLEX_OIDC_USERINFO_URL": "https://idp.example/userinfo",
            "TUNEPLEX_OIDC_JWKS_URL": "https://idp.example/jwks", **endpoints}


@pytest.mark.parametrize("variable", ["TUNEPLEX_OIDC_AUTHORIZATION_URL", "TUNEPLEX_OIDC_TOKEN_URL",
                                      "TUNEPLEX_OIDC_USERINFO_URL", "TUNEPLEX_OIDC_JWKS_URL"])
def test_the_identity_provider_is_reached_over_https_only(variable):
    refused = _load_settings(**_oidc_environment(**{variable: "http://idp.example/x"}))
    assert refused.returncode != 0
    assert "ImproperlyConfigured" in refused.stderr
    assert f"{variable} must be an https://" in refused.stderr
    for allowed in ("http://127.0.0.1:9000/x", "http://[::1]:9000/x", "http://localhost/x"):
        loaded = _load_settings(**_oidc_environment(**{variable: allowed}))  # a test provider
        assert loaded.returncode == 0, loaded.stderr
        assert json.loads(loaded.stdout)["db"]
    assert _load_settings(**_oidc_environment()).returncode == 0


@pytest.mark.parametrize("variable,value", [("TUNEPLEX_LOGIN_USERNAME_FAILURE_LIMIT", "4"),
                                            ("TUNEPLEX_LOGIN_ADDRESS_FAILURE_LIMIT", "2")])
def test_the_wider_budgets_are_never_below_the_pair_limit(variable, value):
    result = _load_settings(**{variable: value})  # the pair limit is 5 by default
    assert result.returncode != 0 and variable in result.stderr
