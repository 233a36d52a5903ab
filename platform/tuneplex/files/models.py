from django.conf import settings
from django.db import models

from tuneplex.core.ids import id_field_length, new_id


def _file_id() -> str:
    return new_id("file-")


class File(models.Model):
    """An uploaded dataset (OpenAI's file object). The blob lives in artifact storage."""

    class Purpose(models.TextChoices):
        FINE_TUNE = "fine-tune"
        EVALS = "evals"  # an eval run's items: one {"item": {...}, "sample"?: {...}} a line

    class Status(models.TextChoices):
        UPLOADED = "uploaded"  # stored, not yet validated (never visible for long)
        PROCESSED = "processed"  # valid: usable by jobs
        ERROR = "error"  # kept with its report; no job may use it

    class StatisticsStatus(models.TextChoices):
        NONE = "none"
        PENDING = "pending"
        RUNNING = "running"
        READY = "ready"
        FAILED = "failed"

    id = models.CharField(primary_key=True, max_length=id_field_length("file-"), default=_file_id,
                          editable=False)
    organization = models.ForeignKey("tenancy.Organization", on_delete=models.CASCADE,
                                     related_name="files")
    filename = models.CharField(max_length=255)
    purpose = models.CharField(max_length=32, choices=Purpose.choices)
    bytes = models.BigIntegerField()
    sha256 = models.CharField(max_length=64)
    blob_name = models.CharField(max_length=300, unique=True)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.UPLOADED)
    format = models.CharField(max_length=32, blank=True, default="")
    validation = models.JSONField(default=dict, blank=True)
    statistics_status = models.CharField(max_length=16, choices=StatisticsStatus.choices,
                                         default=StatisticsStatus.NONE)
    statistics = models.JSONField(default=dict, blank=True)
    statistics_claimed_at = models.DateTimeField(null=True, blank=True)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True,
                                   on_delete=models.SET_NULL, related_name="+")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        indexes = [models.Index(fields=["organization", "-created_at"])]
