from django.contrib.auth.models import AbstractUser
from django.db import models
from django.db.models.functions import Lower

from tuneplex.core.ids import id_field_length, new_id
from tuneplex.core.scopes import ROLE_SCOPES, Role


class User(AbstractUser):
    """A person. Belongs to organizations through :class:`Membership`.

    An email address belongs to one account at most (compared case-insensitively); blank is
    allowed for any number of accounts (single sign-on without a verified address).
    """

    # The organization the dashboard acts in: chosen by the user (the switcher), remembered
    # across sessions, and never changed by anyone else.
    selected_organization = models.ForeignKey("Organization", null=True, blank=True,
                                              on_delete=models.SET_NULL, related_name="+")
    # The OpenID Connect subject (``sub``) this account signs in as; set only for single sign-on.
    oidc_subject = models.CharField(max_length=255, null=True, blank=True, unique=True)

    class Meta(AbstractUser.Meta):
        constraints = [
            models.UniqueConstraint(
                Lower("email"), condition=~models.Q(email=""), name="one_account_per_email",
                violation_error_code="email_taken",
                violation_error_message="An account with this email address exists already."),
        ]


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
    # Sealed with tenancy.secrets (never the key itself); read only by a GPU worker starting an
    # online W&B run. The API and the pages say only whether it is set.
    wandb_api_key_sealed = models.TextField(blank=True, default="", editable=False)
    wandb_api_key_updated_at = models.DateTimeField(null=True, blank=True, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)

    @property
    def has_wandb_api_key(self) -> bool:
        return bool(self.wandb_api_key_sealed)

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

    The invitation travels as a link holding a random token (tenancy/links.py): the token is the
    proof, only its hash is stored, and it can be used once, before ``expires_at``. ``invitee`` is
    whom the admin meant it for (a username or an email address, as typed, mailed to when it is an
    address); it grants nothing by itself. Creating one tells the admin nothing about whether such
    a user exists.
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
    # SHA-256 of the link's token. Null only for invitations made before links (all revoked).
    token_hash = models.CharField(max_length=64, unique=True, null=True, editable=False)
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
