from django.conf import settings
from django.db import models


class AuditEvent(models.Model):
    """One write: who (user or API key), did what, to which object, when. Append-only."""

    organization = models.ForeignKey("tenancy.Organization", on_delete=models.CASCADE,
                                     related_name="audit_events")
    actor_user = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True,
                                   on_delete=models.SET_NULL, related_name="+")
    actor_api_key = models.ForeignKey("apikeys.ApiKey", null=True, blank=True,
                                      on_delete=models.SET_NULL, related_name="+")
    # Kept as text too, so the trail still reads after a user or key is deleted.
    actor_label = models.CharField(max_length=200)
    action = models.CharField(max_length=64)
    object_type = models.CharField(max_length=64)
    object_id = models.CharField(max_length=64)
    metadata = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)

    class Meta:
        indexes = [models.Index(fields=["organization", "-created_at"])]
