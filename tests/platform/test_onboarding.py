"""Onboarding a team: the operator's command, invitations (links: nobody joins without accepting,
and only the link's holder can), sign-up when it is on, one account per email address, the
remembered organization, sign-in lockout, and the page policy."""

from __future__ import annotations

import hashlib
import io
from datetime import timedelta
from urllib.parse import urlsplit

import pytest
from django.core.management import CommandError, call_command
from django.test import Client
from django.utils import timezone

from tests.conftest import add_member, bearer, key_for, make_tenant, make_user
from tests.frontend.conftest import browser, form
from tuneplex.audit.models import AuditEvent
from tuneplex.core.scopes import Role
from tuneplex.tenancy.models import Invitation, Membership, Organization, User

pytestmark = pytest.mark.django_db


def invite(tenant, invitee: str, role: str = "member", key: str | None = None):
    return bearer(key or tenant.owner_key).post("/v1/organization/invitations",
                                                {"invitee": invitee, "role": role}, format="json")


def link_path(created) -> str:
    """The path of the invitation link in a creation answer."""
    return urlsplit(created.json()["url"]).path


def open_link(client: Client, created) -> str:
    """Open the link in this browser: it keeps the token and lands on the invitation's page."""
    opened = client.get(link_path(created))
    assert opened.status_code == 302, opened.status_code
    return opened.url


def respond(user: User, created, answer: str):
    client = browser(user)
    page = open_link(client, created)
    client.get(page)  # the page sets the CSRF cookie
    return client.post(page, form(client, {"answer": answer}))


def test_an_invitation_makes_nobody_a_member_until_they_accept_its_link(org_a):
    invitee = make_user("carol")
    created = invite(org_a, "carol", role="admin")
    assert created.status_code == 201, created.content
    body = created.json()
    assert body["status"] == "pending" and body["role"] == "admin" and body["invitee"] == "carol"
    assert body["url"].startswith("http://testserver/invite/")
    assert created["Cache-Control"] == "no-store"
    assert not Membership.objects.filter(user=invitee).exists()

    client = browser(invitee)
    page = open_link(client, created)
    assert page == f"/invitations/{body['id']}/"  # the token leaves the address bar
    shown = client.get(page)  # opening it answers nothing
    assert shown.status_code == 200 and org_a.organization.name in shown.content.decode()
    assert not Membership.objects.filter(user=invitee).exists()
    assert client.post(page, form(client, {"answer": "accept"})).status_code == 302
    membership = Membership.objects.get(user=invitee, organization=org_a.organization)
    assert membership.role == "admin"
    listed = bearer(org_a.owner_key).get("/v1/organization/invitations").json()["data"]
    assert listed[0]["status"] == "accepted" and listed[0]["responded_at"]
    assert "url" not in listed[0]  # the link is in the creation answer only
    actions = set(AuditEvent.objects.filter(organization=org_a.organization)
                  .values_list("action", flat=True))
    assert {"invitation.create", "invitation.accepted"} <= actions


def test_inviting_tells_the_admin_nothing_about_who_exists(org_a):
    make_user("dave")
    User.objects.filter(username="dave").update(email="dave@x.example")
    real, unknown = invite(org_a, "dave"), invite(org_a, "nobody-by-that-name")
    by_email = invite(org_a, "Someone@Example.COM")
    assert real.status_code == unknown.status_code == by_email.status_code == 201
    assert set(real.json()) == set(unknown.json())
    assert "email" not in real.json() and by_email.json()["invitee"] == "someone@example.com"


def test_a_matching_username_or_address_claims_nothing_only_the_link_does(org_a):
    """Sign-up stores addresses unverified: whoever registered the invitee's address (or name)
    first must not get the invitation. The person given the link does, whatever their account."""
    mallory = User.objects.create_user("erin", email="Erin@Example.com", password="x" * 16)
    by_address = invite(org_a, "erin@example.com")
    by_name = invite(org_a, "erin")
    squatter = browser(mallory)
    assert org_a.organization.name not in squatter.get("/invitations/").content.decode()
    for created in (by_address, by_name):
        invitation_id = created.json()["id"]
        for guess in (f"/invitations/{invitation_id}/respond", f"/invitations/{invitation_id}/"):
            answer = squatter.post(guess, form(squatter, {"answer": "accept"}))
            assert answer.status_code == 404, guess
    assert not Membership.objects.filter(user=mallory).exists()

    erin = make_user("the-real-erin")  # given the link, she accepts it under her own account
    assert respond(erin, by_address, "accept").status_code == 302
    assert Membership.objects.filter(user=erin, organization=org_a.organization).exists()


def test_a_link_is_signed_hashed_single_use_and_expires(org_a):
    created = invite(org_a, "frank")
    token = link_path(created).split("/")[2]
    secret, signature = token.rsplit(":", 1)
    invitation = Invitation.objects.get(id=created.json()["id"])
    assert invitation.token_hash == hashlib.sha256(secret.encode()).hexdigest()
    stored = Invitation.objects.filter(id=invitation.id).values().first()
    assert not any(secret in str(value) for value in stored.values())  # only the hash is kept
    frank, grace = make_user("frank"), make_user("grace")
    for forged in (f"{secret}:{'A' * len(signature)}", f"{secret[:-1]}x:{signature}", "nothing"):
        assert browser(frank).get(f"/invite/{forged}/").status_code == 404, forged

    assert respond(frank, created, "accept").status_code == 302
    client = browser(grace)
    opened = client.get(link_path(created))  # used up: it still shows what became of it
    used = client.get(opened.url)
    assert used.status_code == 410 and "accepted" in used.content.decode()
    assert client.post(opened.url, form(client, {"answer": "accept"})).status_code == 410
    assert not Membership.objects.filter(user=grace).exists()

    declined = invite(org_a, "henry")
    assert respond(grace, declined, "decline").status_code == 200
    assert respond(grace, declined, "accept").status_code == 410
    assert Invitation.objects.get(id=declined.json()["id"]).status == "declined"

    expired = invite(org_a, "ivan")
    Invitation.objects.filter(id=expired.json()["id"]).update(
        expires_at=timezone.now() - timedelta(seconds=1))
    assert respond(grace, expired, "accept").status_code == 410
    revoked = invite(org_a, "judy")
    assert bearer(org_a.owner_key).post(
        f"/v1/organization/invitations/{revoked.json()['id']}/revoke").json()["status"] == "revoked"
    assert respond(grace, revoked, "accept").status_code == 410
    assert not Membership.objects.filter(user=grace).exists()
    assert bearer(org_a.owner_key).get("/v1/organization/invitations").json()["data"][1][
        "status"] == "expired"


def test_a_link_opened_signed_out_asks_to_sign_in_and_comes_back(org_a, settings):
    settings.SIGNUP_ENABLED = True
    created = invite(org_a, "kim@example.com")
    client = Client()
    page = open_link(client, created)
    html = client.get(page).content.decode()
    assert org_a.organization.name in html and f"/login/?next={page}" in html
    assert client.post(page, {"answer": "accept"}).url == page  # sign in first
    made = client.post(f"/signup/?next={page}", {
        "username": "kim", "email": "kim@example.com", "password": "a-long-unusual-passphrase",
        "organization": "Kim's own", "next": page})
    assert made.status_code == 302 and made.url == page
    assert client.post(page, {"answer": "accept"}).status_code == 302
    assert Membership.objects.filter(user__username="kim", organization=org_a.organization).exists()
    assert client.get("/signup/?next=https://elsewhere.example/").url == "/"  # never off-site


def test_an_existing_member_cannot_use_up_a_link(org_a):
    created = invite(org_a, "lee")
    refused = respond(org_a.owner, created, "accept")
    assert refused.status_code == 409 and "already a member" in refused.content.decode()
    assert respond(make_user("lee"), created, "accept").status_code == 302


def test_invitation_rules(org_a):
    admin = add_member(org_a, Role.ADMIN)
    admin_key = key_for(org_a, admin, ["read", "admin"])
    as_owner = invite(org_a, "henry", role="owner", key=admin_key)
    assert as_owner.status_code == 403 and as_owner.json()["error"]["param"] == "role"
    assert invite(org_a, "henry").status_code == 201
    twice = invite(org_a, "henry")
    assert twice.status_code == 409 and twice.json()["error"]["code"] == "invitation_exists"
    member = invite(org_a, org_a.owner.username)
    assert member.status_code == 409 and member.json()["error"]["code"] == "already_member"
    blank = invite(org_a, "   ")
    assert blank.status_code == 400 and blank.json()["error"]["param"] == "invitee"
    for broken in ("a@b@c", "x@acme.example\nBcc: all@acme.example"):
        refused = invite(org_a, broken)  # an address is mailed to: it must be one
        assert refused.status_code == 400 and refused.json()["error"]["code"] == "invalid_invitee"
    viewer_key = key_for(org_a, add_member(org_a, Role.VIEWER), ["read"])
    assert invite(org_a, "ivan", key=viewer_key).status_code == 403
    assert bearer(viewer_key).get("/v1/organization/invitations").status_code == 403


def test_the_selected_organization_is_remembered_and_never_changes_silently(db):
    victim = make_user("victim")
    home = make_tenant("Zeta")
    Membership.objects.create(organization=home.organization, user=victim, role=Role.MEMBER)
    attacker = make_tenant("Aardvark")  # sorts first by name
    created = invite(attacker, "victim")

    client = browser(victim)
    assert home.organization.name in client.get("/").content.decode()
    assert respond(victim, created, "accept").status_code == 302
    fresh = browser(victim)  # a new session: still the organization they work in
    page = fresh.get("/datasets/").content.decode()
    assert f'value="{home.organization.id}" selected' in page
    fresh.post("/organizations/switch/", form(fresh, {"organization": attacker.organization.id}))
    assert User.objects.get(pk=victim.pk).selected_organization_id == attacker.organization.id
    again = browser(victim)
    assert f'value="{attacker.organization.id}" selected' in again.get("/datasets/").content.decode()


def test_the_operator_creates_an_organization_with_its_first_owner(db):
    out = io.StringIO()
    call_command("create_organization", "Acme Research", "--owner", "alice",
                 "--email", "Alice@Acme.example", stdout=out)
    printed = out.getvalue()
    organization = Organization.objects.get(name="Acme Research")
    alice = User.objects.get(username="alice")
    assert alice.email == "alice@acme.example"
    assert Membership.objects.get(user=alice, organization=organization).role == Role.OWNER
    password = next(line.split()[1] for line in printed.splitlines() if line.startswith("password:"))
    client = Client()
    assert client.post("/login/", {"username": "alice", "password": password}).status_code == 302
    with pytest.raises(CommandError, match="exists"):
        call_command("create_organization", "Other", "--owner", "alice", stdout=io.StringIO())
    call_command("create_organization", "Other", "--owner", "alice", "--existing-owner",
                 stdout=io.StringIO())
    assert alice.memberships.count() == 2


def test_the_operator_command_refuses_a_weak_password(db, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("12345678\n"))
    with pytest.raises(CommandError, match="too short|too common|numeric"):
        call_command("create_organization", "Weak", "--owner", "weak", "--password-stdin",
                     stdout=io.StringIO())
    assert not User.objects.filter(username="weak").exists()
    assert not Organization.objects.filter(name="Weak").exists()


def test_sign_up_is_off_by_default_and_creates_an_organization_when_on(db, settings):
    client = Client()
    assert client.get("/signup/").status_code == 404
    settings.SIGNUP_ENABLED = True
    weak = client.post("/signup/", {"username": "newbie", "email": "n@x.example",
                                    "password": "password", "organization": "Newbie Co"})
    assert weak.status_code == 400 and "too short" in weak.content.decode()
    assert not User.objects.filter(username="newbie").exists()
    made = client.post("/signup/", {"username": "newbie", "email": "n@x.example",
                                    "password": "a-long-unusual-passphrase", "organization": "Newbie Co"})
    assert made.status_code == 302
    user = User.objects.get(username="newbie")
    membership = Membership.objects.get(user=user)
    assert membership.role == Role.OWNER and membership.organization.name == "Newbie Co"
    assert "Newbie Co" in client.get("/").content.decode()


def test_repeated_failed_sign_ins_lock_the_account_and_are_logged(db, settings):
    from axes.models import AccessAttempt, AccessFailureLog

    settings.AXES_FAILURE_LIMIT = 3
    User.objects.create_user("target", password="the-right-password-1")
    client = Client()
    for _ in range(2):
        assert client.post("/login/", {"username": "target", "password": "wrong"}).status_code == 200
    locked = client.post("/login/", {"username": "target", "password": "wrong"})
    assert locked.status_code == 429 and "Too many failed sign-ins" in locked.content.decode()
    refused = client.post("/login/", {"username": "target", "password": "the-right-password-1"})
    assert refused.status_code == 429  # even the right password, while locked
    assert AccessFailureLog.objects.filter(username="target").count() >= 3
    assert AccessAttempt.objects.get(username="target").failures_since_start >= 3
    other = Client(REMOTE_ADDR="10.9.9.9")  # another address is not locked out by this one
    assert other.post("/login/", {"username": "target",
                                  "password": "the-right-password-1"}).status_code == 302


def test_pages_carry_a_content_security_policy(org_a):
    page = browser(org_a.owner).get("/")
    policy = page["Content-Security-Policy"]
    assert "script-src 'self'" in policy and "unsafe-inline" not in policy
    assert "frame-ancestors 'none'" in policy
    docs = Client().get("/v1/docs")
    assert docs.status_code == 200 and "worker-src" in docs["Content-Security-Policy"]


def test_settings_and_invitations_take_json_types_as_they_are(org_a):
    """Before, auto_deploy 0 turned auto-deploy off and an invitee 0 invited "0"."""
    client = bearer(org_a.owner_key)
    refused = client.patch("/v1/organization", {"auto_deploy": 0}, format="json")
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "auto_deploy"
    assert client.get("/v1/organization").json()["auto_deploy"] is True
    invited = client.post("/v1/organization/invitations", {"invitee": 0}, format="json")
    assert invited.status_code == 400 and invited.json()["error"]["code"] == "invalid_type"
    assert client.patch("/v1/organization", {"auto_deploy": False}, format="json").json()[
        "auto_deploy"] is False
