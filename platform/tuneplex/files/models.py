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
        BATCH = "batch"  # a batch's requests: one {custom_id, method, url, body} a line
        BATCH_OUTPUT = "batch_output"  # a batch's output or error file (written by its worker)

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


def _upload_id() -> str:
    return new_id("upload_")


def _part_id() -> str:
    return new_id("part_")


class Upload(models.Model):
    """OpenAI's Upload: a file sent in parts, assembled into a :class:`File` when completed.

    ``status`` is what was last written; a pending upload past ``expires_at`` (the database's
    clock) is expired whether or not the cleanup has marked it yet.
    """

    class Status(models.TextChoices):
        PENDING = "pending"
        COMPLETED = "completed"
        CANCELLED = "cancelled"
        EXPIRED = "expired"

    id = models.CharField(primary_key=True, max_length=id_field_length("upload_"),
                          default=_upload_id, editable=False)
    organization = models.ForeignKey("tenancy.Organization", on_delete=models.CASCADE,
                                     related_name="uploads")
    filename = models.CharField(max_length=255)
    purpose = models.CharField(max_length=32)  # a File.Purpose a person may upload (checked)
    mime_type = models.CharField(max_length=100)
    bytes = models.BigIntegerField(help_text="The size the client declared; complete checks it.")
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PENDING)
    expires_at = models.DateTimeField()
    file = models.OneToOneField(File, null=True, blank=True, on_delete=models.SET_NULL,
                                related_name="upload")
    # A completion in progress holds the upload (parts, cancel and a second complete wait it
    # out); its attempt number fences its final write. ``assembly_blob`` and ``assembly_id``
    # name what it is writing (the file's blob, and the S3 multipart upload or local scratch
    # file), so that the cleanup can abandon it if the request that started it died.
    completion_attempt = models.PositiveIntegerField(default=0)
    completing_since = models.DateTimeField(null=True, blank=True)
    assembly_blob = models.CharField(max_length=300, blank=True, default="")
    assembly_id = models.CharField(max_length=1024, blank=True, default="")
    parts_deleted_at = models.DateTimeField(null=True, blank=True)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True,
                                   on_delete=models.SET_NULL, related_name="+")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        indexes = [models.Index(fields=["organization", "-created_at"]),
                   models.Index(fields=["status", "parts_deleted_at"])]


class UploadPart(models.Model):
    """One part as it arrived: a part sent again (a retry) is another part with its own id."""

    id = models.CharField(primary_key=True, max_length=id_field_length("part_"),
                          default=_part_id, editable=False)
    upload = models.ForeignKey(Upload, on_delete=models.CASCADE, related_name="parts")
    bytes = models.BigIntegerField()
    blob_name = models.CharField(max_length=300, unique=True)
    created_at = models.DateTimeField(auto_now_add=True)
