"""Batches in the shape of OpenAI's Batch API: a file of requests answered in the background
through the serving pool, within a completion window, into an output file and an error file.

The batch row, not the broker, is the source of truth for a batch's state; each request line that
was sent has a row of its own (unique per batch and line), written before the request goes to
the engine, so that a batch resumed on another worker never sends a line twice.
"""

from django.conf import settings
from django.db import models

from tuneplex.core.ids import id_field_length, new_id


def _batch_id() -> str:
    return new_id("batch_")


def _request_id() -> str:
    return new_id("batch_req_")


class Batch(models.Model):
    class Status(models.TextChoices):
        VALIDATING = "validating"  # queued, or a worker checks its lines
        FAILED = "failed"  # lines that cannot be run (nothing ran), or no engine answered
        IN_PROGRESS = "in_progress"
        FINALIZING = "finalizing"  # its output and error files are being written
        COMPLETED = "completed"
        EXPIRED = "expired"  # its completion window ended first: the rest is in the error file
        CANCELLING = "cancelling"
        CANCELLED = "cancelled"

    ACTIVE = (Status.VALIDATING, Status.IN_PROGRESS, Status.FINALIZING, Status.CANCELLING)

    class Endpoint(models.TextChoices):
        CHAT = "/v1/chat/completions"
        COMPLETIONS = "/v1/completions"

    id = models.CharField(primary_key=True, max_length=id_field_length("batch_"),
                          default=_batch_id, editable=False)
    organization = models.ForeignKey("tenancy.Organization", on_delete=models.CASCADE,
                                     related_name="batches")
    input_file_id = models.CharField(max_length=64, help_text=(
        "The file of purpose batch it was made from (its lines are copied into requests_blob "
        "while validating: the file may be deleted afterwards)."))
    endpoint = models.CharField(max_length=32, choices=Endpoint.choices)
    completion_window = models.CharField(max_length=8, default="24h")
    metadata = models.JSONField(default=dict, blank=True)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.VALIDATING,
                              db_index=True)
    errors = models.JSONField(null=True, blank=True, help_text=(
        "OpenAI's errors.data: [{code, message, param, line}], the lines that failed validation "
        "(or why the batch failed)."))
    model = models.CharField(max_length=300, blank=True, default="", help_text=(
        "The model its requests name, when they all name one."))
    models_used = models.JSONField(default=list, blank=True, help_text=(
        "Every model its requests name (the engines it makes room on)."))
    requests_blob = models.CharField(max_length=300, blank=True, default="", help_text=(
        "Its validated requests in artifact storage, one {line, custom_id, body} a line, in the "
        "file's order; deleted when the batch ends."))
    requests_total = models.PositiveIntegerField(default=0)
    requests_completed = models.PositiveIntegerField(default=0)
    requests_failed = models.PositiveIntegerField(default=0)
    input_tokens = models.BigIntegerField(default=0)
    output_tokens = models.BigIntegerField(default=0)
    outcome = models.CharField(max_length=16, blank=True, default="", help_text=(
        "The status it ends in, set when its files start being written (a worker that resumes "
        "the writing ends it so)."))
    output_file = models.ForeignKey("files.File", null=True, blank=True, on_delete=models.SET_NULL,
                                    related_name="+")
    error_file = models.ForeignKey("files.File", null=True, blank=True, on_delete=models.SET_NULL,
                                   related_name="+")
    expires_at = models.DateTimeField(help_text="Its completion window's end (the database's clock).")
    # Liveness and fencing, as an eval run's: each claim increments attempts, and a worker's
    # writes count only while it holds the latest attempt (claimed, and still active).
    attempts = models.PositiveIntegerField(default=0)
    claimed = models.BooleanField(default=False)
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    enqueued_at = models.DateTimeField(null=True, blank=True)
    waiting_for = models.CharField(max_length=200, blank=True, default="")
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True,
                                   on_delete=models.SET_NULL, related_name="+")
    created_at = models.DateTimeField(auto_now_add=True)
    in_progress_at = models.DateTimeField(null=True, blank=True)
    finalizing_at = models.DateTimeField(null=True, blank=True)
    completed_at = models.DateTimeField(null=True, blank=True)
    failed_at = models.DateTimeField(null=True, blank=True)
    expired_at = models.DateTimeField(null=True, blank=True)
    cancelling_at = models.DateTimeField(null=True, blank=True)
    cancelled_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        indexes = [models.Index(fields=["organization", "-created_at"]),
                   models.Index(fields=["status", "claimed"])]


class BatchRequest(models.Model):
    """A line that was sent (or is being sent): written in flight before the request leaves, and
    answered when it comes back. A line with no row was never sent."""

    class State(models.TextChoices):
        IN_FLIGHT = "in_flight"
        SUCCEEDED = "succeeded"  # answered 200: a line of the output file
        FAILED = "failed"  # answered with an error status: a line of the error file
        # In flight when its worker died: it may have been answered (and counted), so it is
        # never sent again; the error file tells the user to resend it.
        INTERRUPTED = "interrupted"
        STOPPED = "stopped"  # broken off by the batch's cancel, its expiry or its failure

    id = models.CharField(primary_key=True, max_length=id_field_length("batch_req_"),
                          default=_request_id, editable=False, help_text="The output line's id.")
    batch = models.ForeignKey(Batch, on_delete=models.CASCADE, related_name="requests")
    line = models.PositiveIntegerField(help_text="The line's number in the input file (1-based).")
    state = models.CharField(max_length=16, choices=State.choices, default=State.IN_FLIGHT)
    attempt = models.PositiveIntegerField(help_text="The attempt that sent it.")
    request_id = models.CharField(max_length=64, help_text="The output line's response.request_id.")
    status_code = models.PositiveSmallIntegerField(null=True, blank=True)
    response = models.JSONField(null=True, blank=True, help_text="The answer's JSON body.")
    prompt_tokens = models.PositiveIntegerField(default=0)
    completion_tokens = models.PositiveIntegerField(default=0)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["batch", "line"],
                                               name="batches_one_request_per_line")]
