"""Before emails become unique and invitations travel as links (0007):

- Single sign-on accounts lose the address they got from the provider, which was taken without
  ``email_verified``; it comes back at their next sign-in if the provider verified it.
- Accounts sharing an email address (compared case-insensitively) keep it on one account only:
  the earliest active one (else the earliest); the others' addresses are cleared, never their
  accounts. Sign-up stored addresses unverified, so a later duplicate is the suspect one.
- Pending invitations made before links could be accepted by whoever held the invitee's
  username or email; they are revoked (recorded in each organization's audit log), and admins
  invite those people again to send them a link.

Both say what they did on the migrate command's output.
"""

from django.db import migrations
from django.db.models import Count
from django.db.models.functions import Lower
from django.utils import timezone


def clear_unverified_sso_emails(apps, schema_editor):
    User = apps.get_model("tenancy", "User")
    cleared = User.objects.filter(oidc_subject__isnull=False).exclude(email="").update(email="")
    if cleared:
        print(f"\n  tenancy: cleared the email address of {cleared} single sign-on account(s) (it "
              "came from the provider unverified); it returns at their next sign-in when the "
              "provider says it verified it", flush=True)


def clear_duplicate_emails(apps, schema_editor):
    User = apps.get_model("tenancy", "User")
    shared = (User.objects.exclude(email="").annotate(address=Lower("email"))
              .values("address").annotate(accounts=Count("id")).filter(accounts__gt=1))
    for row in shared:
        holders = list(User.objects.annotate(address=Lower("email"))
                       .filter(address=row["address"])
                       .order_by("-is_active", "date_joined", "id"))
        keeper, others = holders[0], holders[1:]
        User.objects.filter(pk__in=[user.pk for user in others]).update(email="")
        print(f"\n  tenancy: {row['address']} was on {len(holders)} accounts; kept on "
              f"{keeper.username!r}, cleared on {', '.join(repr(u.username) for u in others)}",
              flush=True)


def revoke_invitations_without_links(apps, schema_editor):
    Invitation = apps.get_model("tenancy", "Invitation")
    AuditEvent = apps.get_model("audit", "AuditEvent")
    now = timezone.now()
    pending = list(Invitation.objects.filter(status="pending", expires_at__gt=now))
    for invitation in pending:
        AuditEvent.objects.create(
            organization_id=invitation.organization_id, actor_label="migration",
            action="invitation.revoke", object_type="tenancy.invitation",
            object_id=invitation.pk,
            metadata={"invitee": invitation.invitee,
                      "reason": "made before invitation links; invite again to send a link"})
    Invitation.objects.filter(pk__in=[i.pk for i in pending]).update(status="revoked",
                                                                       responded_at=now)
    if pending:
        print(f"\n  tenancy: revoked {len(pending)} pending invitation(s) made before invitation "
              "links (anyone with the invitee's username or email could accept them); invite "
              "those people again to send them a link", flush=True)


class Migration(migrations.Migration):

    dependencies = [
        ("tenancy", "0005_oidc_subject"),
        ("audit", "0002_initial"),
    ]

    operations = [
        migrations.RunPython(clear_unverified_sso_emails, migrations.RunPython.noop),
        migrations.RunPython(clear_duplicate_emails, migrations.RunPython.noop),
        migrations.RunPython(revoke_invitations_without_links, migrations.RunPython.noop),
    ]
