from django.conf import settings
from django.db import models
from django.utils import timezone

from tuneplex.core.ids import id_field_length, new_id


def _key_id() -> str:
    return new_id("key-")


class ApiKey(models.Model):
    """An organization's API key. Only a SHA-256 of the secret is stored.

    The secret is 40 random base62 characters (about 238 bits), so a fast hash is the right
    tool: there is nothing to brute-force, and lookup by hash needs no per-row comparison.
    """

    id = models.CharField(primary_key=True, max_length=id_field_length("key-"), default=_key_id,
                          editable=False)
    organization = models.ForeignKey("tenancy.Organization", on_delete=models.CASCADE,
                                     related_name="api_keys")
    name = models.CharField(max_length=200)
    prefix = models.CharField(max_length=16, help_text="The first characters, shown in lists.")
    hashed_key = models.CharField(max_length=64, unique=True)
    scopes = models.JSONField(default=list)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True,
                                   on_delete=models.SET_NULL, related_name="api_keys")
    created_at = models.DateTimeField(auto_now_add=True)
    expires_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)
    last_used_at = models.DateTimeField(null=True, blank=True)

    @property
    def is_active(self) -> bool:
        if self.revoked_at is not None:
            return False
        return self.expires_at is None or self.expires_at > timezone.now()
