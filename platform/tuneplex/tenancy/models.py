from django.contrib.auth.models import AbstractUser
from django.db import models

from tuneplex.core.ids import id_field_length, new_id
from tuneplex.core.scopes import ROLE_SCOPES, Role


class User(AbstractUser):
    """A person. Belongs to organizations through :class:`Membership`."""

    # The organization the dashboard acts in: chosen by the user (the switcher), remembered
    # across sessions, and never changed by anyone else.
    selected_organization = models.ForeignKey("Organization", null=True, blank=True,
                                              on_delete=models.SET_NULL, related_name="+")
    # The OpenID Connect subject (``sub``) this account signs in as; set only for single sign-on.
    oidc_subject = models.CharField(max_length=255, null=True, blank=True, unique=True)


def _org_id() -> str:
    return new_id("org-")


def _membership_id() -> str:
    return new_id("mem-")


def _invitation_id() -> str:
    return new_id("inv-")


class Organization(models.Model):
    """The tenant. Every row holding tenant data points at one."""

    id = models.CharField(primary_key=True, max_length=id_field_length("org-"), default=_org_id,
                          editable=False)
    name = models.CharField(max_length=200)
    slug = models.SlugField(max_length=64, unique=True)
    storage_quota_bytes = models.BigIntegerField(
        null=True, blank=True, help_text="Stored dataset bytes allowed; blank: TUNEPLEX_ORG_STORAGE_QUOTA.")
    auto_deploy = models.BooleanField(
        default=True, help_text="Deploy each adapter to the serving pool when its job succeeds.")
    created_at = models.DateTimeField(auto_now_add=True)

    @property
    def storage_quota(self) -> int:
        from django.conf import settings

        return self.storage_quota_bytes if self.storage_quota_bytes is not None else settings.ORG_STORAGE_QUOTA

    def __str__(self) -> str:
        return self.name


class Membership(models.Model):
    id = models.CharField(primary_key=True, max_length=id_field_length("mem-"),
                          default=_membership_id, editable=False)
    organization = models.ForeignKey(Organization, on_delete=models.CASCADE,
                                     related_name="memberships")
    user = models.ForeignKey(User, on_delete=models.CASCADE, related_name="memberships")
    role = models.CharField(max_length=16, choices=Role.choices, default=Role.MEMBER)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["organization", "user"], name="one_membership_per_org"),
        ]

    @property
    def scopes(self) -> frozenset[str]:
        return ROLE_SCOPES[self.role]


class Invitation(models.Model):
    """An offer of membership. Nobody becomes a member of an organization without accepting.

    ``invitee`` is a username or an email address, as the admin typed it; the invitation is shown
    to the signed-in user with that username or email. Creating one tells the admin nothing about
    whether such a user exists.
    """

    class Status(models.TextChoices):
        PENDING = "pending"
        ACCEPTED = "accepted"
        DECLINED = "declined"
        REVOKED = "revoked"
        EXPIRED = "expired"  # never stored: a pending invitation past expires_at

    id = models.CharField(primary_key=True, max_length=id_field_length("inv-"),
                          default=_invitation_id, editable=False)
    organization = models.ForeignKey(Organization, on_delete=models.CASCADE,
                                     related_name="invitations")
    invitee = models.CharField(max_length=254, help_text="A username or an email address.")
    role = models.CharField(max_length=16, choices=Role.choices, default=Role.MEMBER)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PENDING)
    invited_by = models.ForeignKey(User, null=True, blank=True, on_delete=models.SET_NULL,
                                   related_name="+")
    accepted_by = models.ForeignKey(User, null=True, blank=True, on_delete=models.SET_NULL,
                                    related_name="+")
    expires_at = models.DateTimeField()
    responded_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        indexes = [models.Index(fields=["invitee", "status"]),
                   models.Index(fields=["organization", "-created_at"])]

    @property
    def effective_status(self) -> str:
        from django.utils import timezone

        if self.status == self.Status.PENDING and self.expires_at <= timezone.now():
            return self.Status.EXPIRED
        return self.status
