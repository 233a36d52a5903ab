"""One account per email address (sign-up, the operator's command, the database, the migration
that cleared existing duplicates), and invitation links mailed through a real SMTP server."""

from __future__ import annotations

import io
import logging
import re
from datetime import timedelta
from email import message_from_bytes
from urllib.parse import urlsplit

import pytest
from aiosmtpd.controller import Controller
from django.core.management import CommandError, call_command
from django.db import IntegrityError, connection, transaction
from django.db.migrations.executor import MigrationExecutor
from django.test import Client
from django.utils import timezone
from tuneplex.core.errors import Conflict
from tuneplex.tenancy import services
from tuneplex.tenancy.models import Membership, User

from tests.conftest import bearer, free_port, make_user
from tests.frontend.conftest import browser, form

pytestmark = pytest.mark.django_db


def test_the_database_keeps_one_account_per_address_in_any_letter_case():
    User.objects.create_user("first", email="Shared@Acme.example")
    with pytest.raises(IntegrityError), transaction.atomic():
        User.objects.create_user("second", email="shared@acme.EXAMPLE")
    User.objects.create_user("no-address-1")
    User.objects.create_user("no-address-2")  # blank is no address: any number of accounts


def test_sign_up_refuses_a_taken_address_at_its_field(settings):
    settings.SIGNUP_ENABLED = True
    User.objects.create_user("owner", email="owner@acme.example")
    taken = Client().post("/signup/", {"username": "newbie", "email": "Owner@ACME.example",
                                       "password": "a-long-unusual-passphrase",
                                       "organization": "Newbie Co"})
    html = taken.content.decode()
    assert taken.status_code == 400
    assert re.search(r'id="id_email"[^>]*>\s*<p class="error" role="alert">An account with this '
                     r"email address exists already.</p>", html), html
    assert not User.objects.filter(username="newbie").exists()


def test_a_sign_up_that_loses_the_race_for_an_address_is_a_409_not_a_500(monkeypatch):
    User.objects.create_user("owner", email="owner@acme.example")
    checks = iter([False, True])  # free when checked, taken when written
    monkeypatch.setattr(services, "email_in_use", lambda email: next(checks))
    with pytest.raises(Conflict) as refused:
        services.user_create(username="late", email="owner@acme.example", password="x" * 16)
    assert (refused.value.code, refused.value.param, refused.value.status) == (
        "email_taken", "email", 409)
    assert not User.objects.filter(username="late").exists()


def test_the_operator_command_refuses_a_taken_address(db):
    User.objects.create_user("alice", email="alice@acme.example")
    with pytest.raises(CommandError, match="An account with this email address exists already"):
        call_command("create_organization", "Other", "--owner", "alice2", "--email",
                     "ALICE@acme.example", stdout=io.StringIO())
    assert not User.objects.filter(username="alice2").exists()


@pytest.mark.django_db(transaction=True)
def test_the_migration_keeps_a_shared_address_on_one_account_and_says_so(capsys):
    before = [("tenancy", "0005_oidc_subject")]
    after = [("tenancy", "0007_emails_and_invitation_links")]
    executor = MigrationExecutor(connection)
    executor.migrate(before)
    old = executor.loader.project_state(before).apps
    OldUser = old.get_model("tenancy", "User")
    Organization, Invitation = (old.get_model("tenancy", name)
                                for name in ("Organization", "Invitation"))
    now = timezone.now()
    for name, email, joined, active in [("early-but-gone", "Pat@x.example", 0, False),
                                        ("pat", "pat@x.example", 1, True),
                                        ("squatter", "PAT@X.EXAMPLE", 2, True),
                                        ("solo", "solo@x.example", 3, True),
                                        ("blank", "", 4, True)]:
        OldUser.objects.create(username=name, email=email, is_active=active,
                               date_joined=now + timedelta(minutes=joined))
    OldUser.objects.create(username="from-sso", email="boss@x.example", oidc_subject="42",
                           date_joined=now - timedelta(days=1))  # unverified, and first
    organization = Organization.objects.create(name="Acme", slug="acme")
    for invitee, status in [("pat", "pending"), ("old", "accepted")]:
        Invitation.objects.create(organization=organization, invitee=invitee, status=status,
                                  expires_at=now + timedelta(days=3))
    capsys.readouterr()

    try:
        MigrationExecutor(connection).migrate(after)
    finally:
        # Forward to the newest migrations again, whatever this test saw: later tests (and the
        # apps' later migrations, 0008 and on) need today's tables.
        latest = MigrationExecutor(connection)
        latest.loader.build_graph()
        latest.migrate(latest.loader.graph.leaf_nodes())
    said = capsys.readouterr().out
    emails = dict(User.objects.values_list("username", "email"))
    assert emails == {"early-but-gone": "", "pat": "pat@x.example", "squatter": "",
                      "solo": "solo@x.example", "blank": "", "from-sso": ""}
    assert "cleared the email address of 1 single sign-on account(s)" in said
    assert ("pat@x.example was on 3 accounts; kept on 'pat', cleared on 'squatter', "
            "'early-but-gone'") in said
    assert "revoked 1 pending invitation(s) made before invitation links" in said
    from tuneplex.tenancy.models import Invitation as Current

    assert dict(Current.objects.values_list("invitee", "status")) == {"pat": "revoked",
                                                                      "old": "accepted"}
    from tuneplex.audit.models import AuditEvent

    assert AuditEvent.objects.get(action="invitation.revoke").actor_label == "migration"


# --- invitation links by email ---------------------------------------------------------------


class Inbox:
    """aiosmtpd's handler: keeps every message the server accepts."""

    def __init__(self):
        self.messages = []

    async def handle_DATA(self, server, session, envelope):
        self.messages.append(envelope)
        return "250 OK"


@pytest.fixture
def smtp(settings):
    """A real SMTP server on 127.0.0.1, and the platform's email settings pointed at it."""
    inbox, port = Inbox(), free_port()
    controller = Controller(inbox, hostname="127.0.0.1", port=port)
    controller.start()
    settings.EMAIL_BACKEND = "django.core.mail.backends.smtp.EmailBackend"
    settings.EMAIL_ENABLED, settings.EMAIL_HOST, settings.EMAIL_PORT = True, "127.0.0.1", port
    settings.EMAIL_USE_TLS = settings.EMAIL_USE_SSL = False
    settings.DEFAULT_FROM_EMAIL = "tuneplex@acme.example"
    yield inbox
    controller.stop()


def test_an_invitation_to_an_address_is_mailed_with_its_link(org_a, smtp, settings,
                                                              django_capture_on_commit_callbacks):
    settings.PUBLIC_URL = "https://tuneplex.acme.example"
    with django_capture_on_commit_callbacks(execute=True):
        by_address = bearer(org_a.owner_key).post("/v1/organization/invitations", {
            "invitee": "Newcomer@Acme.example", "role": "viewer"}, format="json")
        by_name = bearer(org_a.owner_key).post("/v1/organization/invitations", {
            "invitee": "someone", "role": "viewer"}, format="json")
    assert by_address.status_code == by_name.status_code == 201
    url = by_address.json()["url"]
    assert url.startswith("https://tuneplex.acme.example/invite/")
    assert len(smtp.messages) == 1  # a username has no address to mail
    mail = smtp.messages[0]
    assert mail.rcpt_tos == ["newcomer@acme.example"] and mail.mail_from == "tuneplex@acme.example"
    body = message_from_bytes(mail.content).get_payload(decode=True).decode()
    assert url in body and org_a.organization.name in body and "viewer" in body

    newcomer = make_user("newcomer")
    client = browser(newcomer)
    page = client.get(urlsplit(url).path).url  # the mailed link works like the shown one
    client.get(page)
    assert client.post(page, form(client, {"answer": "accept"})).status_code == 302
    assert Membership.objects.get(user=newcomer).role == "viewer"


def test_a_mail_server_that_is_down_leaves_the_link_with_the_admin(org_a, settings, caplog,
                                                                   django_capture_on_commit_callbacks):
    settings.EMAIL_BACKEND = "django.core.mail.backends.smtp.EmailBackend"
    settings.EMAIL_ENABLED, settings.EMAIL_HOST = True, "127.0.0.1"
    settings.EMAIL_PORT, settings.EMAIL_USE_TLS = free_port(), False  # nothing listens there
    with caplog.at_level(logging.WARNING), django_capture_on_commit_callbacks(execute=True):
        created = bearer(org_a.owner_key).post("/v1/organization/invitations", {
            "invitee": "x@acme.example"}, format="json")
    assert created.status_code == 201 and created.json()["url"]
    assert "mailing it failed (ConnectionRefusedError" in caplog.text
    assert created.json()["url"].split("/invite/")[1] not in caplog.text  # no token in the log


def test_the_schema_documents_the_link_in_the_creation_answer(org_a):
    schema = bearer(org_a.owner_key).get("/v1/openapi.json").json()
    created = schema["paths"]["/v1/organization/invitations"]["post"]["responses"]["201"]
    reference = created["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[1]
    properties = schema["components"]["schemas"][reference]["properties"]
    assert properties["url"]["type"] == "string" and "once" in properties["url"]["description"]
    assert reference != "InvitationOutput" and "url" not in schema["components"]["schemas"][
        "InvitationOutput"]["properties"]
