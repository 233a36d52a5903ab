"""Onboarding a team: the operator's command, invitations (nobody joins without accepting),
sign-up when it is on, the remembered organization, sign-in lockout, and the page policy."""

from __future__ import annotations

import io
from datetime import timedelta

import pytest
from django.core.management import CommandError, call_command
from django.test import Client
from django.utils import timezone

from tests.conftest import add_member, bearer, key_for, make_tenant, make_user
from tests.frontend.conftest import browser, form
from tuneplex.audit.models import AuditEvent
from tuneplex.core.scopes import Role
from tuneplex.tenancy.models import Invitation, Membership, Organization, User
from tuneplex.tenancy.selectors import invitations_for_user

pytestmark = pytest.mark.django_db


def invite(tenant, invitee: str, role: str = "member", key: str | None = None):
    return bearer(key or tenant.owner_key).post("/v1/organization/invitations",
                                                {"invitee": invitee, "role": role}, format="json")


def respond(user: User, invitation_id: str, answer: str):
    client = browser(user)
    client.get("/invitations/")  # the page sets the CSRF cookie
    return client.post(f"/invitations/{invitation_id}/respond", form(client, {"answer": answer}))


def test_an_invitation_makes_nobody_a_member_until_they_accept(org_a):
    invitee = make_user("carol")
    created = invite(org_a, "carol", role="admin")
    assert created.status_code == 201, created.content
    body = created.json()
    assert body["status"] == "pending" and body["role"] == "admin" and body["invitee"] == "carol"
    assert not Membership.objects.filter(user=invitee).exists()
    assert [i.id for i in invitations_for_user(user=invitee)] == [body["id"]]

    assert respond(invitee, body["id"], "accept").status_code == 302
    membership = Membership.objects.get(user=invitee, organization=org_a.organization)
    assert membership.role == "admin"
    listed = bearer(org_a.owner_key).get("/v1/organization/invitations").json()["data"]
    assert listed[0]["status"] == "accepted" and listed[0]["responded_at"]
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


def test_an_invitation_by_email_reaches_the_user_with_that_address(org_a):
    erin = User.objects.create_user("erin", email="Erin@Example.com", password="x" * 16)
    invitation_id = invite(org_a, "erin@example.com").json()["id"]
    assert [i.id for i in invitations_for_user(user=erin)] == [invitation_id]
    assert respond(erin, invitation_id, "decline").status_code == 302
    assert not Membership.objects.filter(user=erin).exists()
    assert Invitation.objects.get(id=invitation_id).status == "declined"


def test_revoked_expired_and_foreign_invitations_cannot_be_accepted(org_a):
    frank, grace = make_user("frank"), make_user("grace")
    revoked = invite(org_a, "frank").json()["id"]
    assert bearer(org_a.owner_key).post(
        f"/v1/organization/invitations/{revoked}/revoke").json()["status"] == "revoked"
    expired = invite(org_a, "grace").json()["id"]
    Invitation.objects.filter(id=expired).update(expires_at=timezone.now() - timedelta(seconds=1))
    assert respond(frank, revoked, "accept").status_code == 404
    assert respond(grace, expired, "accept").status_code == 404
    assert respond(frank, expired, "accept").status_code == 404  # addressed to grace
    assert not Membership.objects.filter(user__in=[frank, grace]).exists()
    assert bearer(org_a.owner_key).get("/v1/organization/invitations").json()["data"][0][
        "status"] == "expired"


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
    viewer_key = key_for(org_a, add_member(org_a, Role.VIEWER), ["read"])
    assert invite(org_a, "ivan", key=viewer_key).status_code == 403
    assert bearer(viewer_key).get("/v1/organization/invitations").status_code == 403


def test_the_selected_organization_is_remembered_and_never_changes_silently(db):
    victim = make_user("victim")
    home = make_tenant("Zeta")
    Membership.objects.create(organization=home.organization, user=victim, role=Role.MEMBER)
    attacker = make_tenant("Aardvark")  # sorts first by name
    invitation_id = invite(attacker, "victim").json()["id"]

    client = browser(victim)
    assert home.organization.name in client.get("/").content.decode()
    assert respond(victim, invitation_id, "accept").status_code == 302
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
