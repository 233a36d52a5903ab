"""Exports: an adapter's model in a format other tools run (safetensors, GGUF, Ollama, ONNX).

The row, not the broker, is the source of truth. An export of a format that needs the merged
model (``needs_merge``) waits queued while the adapter's merge runs on a GPU worker; the
conversion itself runs on a worker of the ``exports`` queue (CPU), claimed queued → running
exactly once. Its artifact is one blob in artifact storage, counted in the organization's
storage quota once it has succeeded.
"""

from django.conf import settings
from django.db import models

from tuneplex.core.ids import id_field_length, new_id


def _export_id() -> str:
    return new_id("export-")


class Export(models.Model):
    class Status(models.TextChoices):
        QUEUED = "queued"  # waiting for the adapter's merge, or for an exports worker
        RUNNING = "running"
        SUCCEEDED = "succeeded"
        FAILED = "failed"

    IN_FLIGHT = (Status.QUEUED, Status.RUNNING)
    # One export of an adapter in a format and quantization is enough: a request for another
    # while one is in flight or has succeeded gets that one (a failed one does not count).
    LIVE = (Status.QUEUED, Status.RUNNING, Status.SUCCEEDED)

    id = models.CharField(primary_key=True, max_length=id_field_length("export-"),
                          default=_export_id, editable=False)
    organization = models.ForeignKey("tenancy.Organization", on_delete=models.CASCADE,
                                     related_name="exports")
    adapter = models.ForeignKey("adapters.Adapter", on_delete=models.CASCADE,
                                related_name="exports")
    format = models.CharField(max_length=16, help_text="jobs.export.formats.FORMATS")
    quantization = models.CharField(max_length=16, blank=True, default="", help_text=(
        "Resolved: the format's default when none was asked; empty for a format without one."))
    needs_merge = models.BooleanField(help_text="The format exports the merged model: the "
                                                "adapter's merge runs first.")
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.QUEUED,
                              db_index=True)
    progress = models.FloatField(default=0.0, help_text="0 to 1.")
    progress_message = models.CharField(max_length=300, blank=True, default="")
    blob_name = models.CharField(max_length=300, blank=True, default="")
    filename = models.CharField(max_length=200, blank=True, default="",
                                help_text="The artifact's file name (the download's).")
    bytes = models.BigIntegerField(default=0, help_text="Counted in the storage quota.")
    sha256 = models.CharField(max_length=64, blank=True, default="")
    # Not "check": Model.check() is Django's system check.
    check_result = models.JSONField(null=True, blank=True, help_text=(
        "The check's result: {passed, kind, ...figures}; kept when the check failed."))
    error = models.TextField(blank=True, default="", help_text="code: message, when it failed.")
    enqueued_at = models.DateTimeField(null=True, blank=True,
                                       help_text="When its message was last sent to a worker.")
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True,
                                   on_delete=models.SET_NULL, related_name="+")
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    progress_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        indexes = [models.Index(fields=["organization", "-created_at"]),
                   models.Index(fields=["adapter", "-created_at"])]
        constraints = [models.UniqueConstraint(
            fields=["adapter", "format", "quantization"],
            condition=models.Q(status__in=["queued", "running", "succeeded"]),
            name="exports_one_live_per_kind")]
