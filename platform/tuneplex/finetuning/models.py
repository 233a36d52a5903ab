from datetime import timedelta

from django.conf import settings
from django.db import models

from tuneplex.core.ids import id_field_length, new_id


def _job_id() -> str:
    return new_id("ftjob-")


def _event_id() -> str:
    return new_id("ftevent-")


def _checkpoint_id() -> str:
    return new_id("ftckpt-")


class FineTuningJob(models.Model):
    """A fine-tuning job. This row, not the broker, is the source of truth for its state."""

    class Status(models.TextChoices):
        VALIDATING_FILES = "validating_files"
        QUEUED = "queued"
        RUNNING = "running"
        PAUSED = "paused"
        SUCCEEDED = "succeeded"
        FAILED = "failed"
        CANCELLED = "cancelled"

    # Unfinished: a paused job keeps its files and the checkpoint it resumes from.
    ACTIVE = (Status.VALIDATING_FILES, Status.QUEUED, Status.RUNNING, Status.PAUSED)
    FINISHED = (Status.SUCCEEDED, Status.FAILED, Status.CANCELLED)
    PAUSING = "pausing"  # OpenAI's status of a job asked to pause that has not stopped yet

    id = models.CharField(primary_key=True, max_length=id_field_length("ftjob-"), default=_job_id,
                          editable=False)
    organization = models.ForeignKey("tenancy.Organization", on_delete=models.CASCADE,
                                     related_name="finetuning_jobs")
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True,
                                   on_delete=models.SET_NULL, related_name="+")
    base_model = models.ForeignKey("basemodels.BaseModel", on_delete=models.PROTECT,
                                   related_name="+")
    # File ids, kept even after a finished job's files are deleted (as OpenAI does).
    training_file = models.CharField(max_length=64)
    validation_file = models.CharField(max_length=64, blank=True, default="")
    method = models.CharField(max_length=16, default="lora")
    method_type = models.CharField(max_length=16, default="supervised",
                                   help_text="OpenAI's method type: supervised or dpo.")
    # Continued training: the adapter (or a job's checkpoint) whose weights this job starts from.
    parent_adapter = models.ForeignKey("adapters.Adapter", null=True, blank=True,
                                       on_delete=models.SET_NULL, related_name="continued_by")
    parent_checkpoint = models.ForeignKey("JobCheckpoint", null=True, blank=True,
                                          on_delete=models.SET_NULL, related_name="+")
    lineage = models.JSONField(default=dict, blank=True, help_text=(
        "Where the starting weights came from, kept when the parent is deleted: model (as "
        "requested), adapter, checkpoint, and the datasets of every generation, oldest first."))
    hyperparameters = models.JSONField(default=dict, help_text="As requested.")
    config = models.JSONField(default=dict, help_text="The trainer settings the job runs with.")
    suffix = models.CharField(max_length=64, blank=True, default="")
    seed = models.IntegerField()
    # GPUs the job trains on (one trainer process each, under torchrun): what the scheduler counts.
    gpus = models.PositiveSmallIntegerField(default=1)
    metadata = models.JSONField(null=True, blank=True)
    integrations = models.JSONField(default=list, blank=True, help_text=(
        "Experiment tracking, in OpenAI's shape: [{type: wandb, wandb: {project, name, entity, "
        "tags}}, {type: mlflow, mlflow: {experiment_name, run_name, tags}}], checked and filled "
        "in (finetuning/integrations.py)."))
    status = models.CharField(max_length=20, choices=Status.choices,
                              default=Status.VALIDATING_FILES, db_index=True)
    error = models.JSONField(null=True, blank=True)
    estimated_memory_bytes = models.BigIntegerField(null=True, blank=True)
    fine_tuned_model = models.CharField(max_length=300, null=True, blank=True)
    trained_tokens = models.BigIntegerField(null=True, blank=True)
    step = models.IntegerField(default=0)
    total_steps = models.IntegerField(null=True, blank=True)
    eta_seconds = models.FloatField(null=True, blank=True)
    # Scheduling and worker liveness.
    dispatched_at = models.DateTimeField(null=True, blank=True)
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    worker = models.CharField(max_length=200, blank=True, default="")
    # The fencing token: each claim increments it, and a worker's writes (heartbeats, metrics,
    # checkpoints, success) count only while it still holds the latest attempt.
    attempts = models.PositiveIntegerField(default=0)
    cancel_requested = models.BooleanField(default=False)
    # Pause and resume: a running job's worker sees the flag at its heartbeat and has the trainer
    # checkpoint and stop (a job validating its files pauses once they are checked).
    pause_requested = models.BooleanField(default=False)
    paused_at = models.DateTimeField(null=True, blank=True)
    paused_for = models.DurationField(default=timedelta, help_text=(
        "Time spent paused before the latest resume: not counted in the runtime limit."))
    attempts_at_resume = models.PositiveIntegerField(default=0, help_text=(
        "Claims before the latest resume: only later ones count against "
        "TUNEPLEX_JOB_MAX_ATTEMPTS (a pause is no lost worker)."))
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        indexes = [models.Index(fields=["organization", "-created_at"]),
                   models.Index(fields=["status", "dispatched_at"])]

    @property
    def api_status(self) -> str:
        """The status as the API and the dashboard show it: OpenAI's "pausing" while a pause
        waits for the trainer's checkpoint (or for the files' validation)."""
        if (self.pause_requested and not self.cancel_requested
                and self.status in (self.Status.VALIDATING_FILES, self.Status.RUNNING)):
            return self.PAUSING
        return self.status


class JobEvent(models.Model):
    id = models.CharField(primary_key=True, max_length=id_field_length("ftevent-"),
                          default=_event_id, editable=False)
    job = models.ForeignKey(FineTuningJob, on_delete=models.CASCADE, related_name="events")
    level = models.CharField(max_length=8, default="info")
    type = models.CharField(max_length=16, default="message")  # message | metrics
    message = models.TextField()
    data = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)


class JobCheckpoint(models.Model):
    id = models.CharField(primary_key=True, max_length=id_field_length("ftckpt-"),
                          default=_checkpoint_id, editable=False)
    job = models.ForeignKey(FineTuningJob, on_delete=models.CASCADE, related_name="checkpoints")
    step = models.IntegerField()
    attempt = models.PositiveIntegerField(default=0, help_text="The claim that saved it.")
    metrics = models.JSONField(default=dict)
    blob_prefix = models.CharField(max_length=300, default="",
                                   help_text="Its files in artifact storage: <prefix>/<name>.")
    bytes = models.BigIntegerField(default=0, help_text="Counted in the storage quota.")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["job", "step"], name="one_checkpoint_per_step")]


class GpuWorker(models.Model):
    """A running Celery worker of the ``gpu`` queue, written by the worker itself
    (services.gpu_workers): registered when it is ready, its heartbeat renewed every
    TUNEPLEX_GPU_WORKER_HEARTBEAT_SECONDS (the database's clock), deleted when it stops. Unless
    TUNEPLEX_GPU_SLOTS is set, the scheduler's GPU slots are the GPUs of the workers that beat
    within their last MISSED_BEATS beats (selectors.gpu_capacity)."""

    MISSED_BEATS = 3  # a worker silent this many beats is not counted, and is swept

    name = models.CharField(primary_key=True, max_length=255,
                            help_text="Its Celery hostname (name@host), unique in the install.")
    node = models.CharField(max_length=255, help_text="The host it runs on.")
    gpus = models.PositiveIntegerField(help_text="The GPUs it sees (CUDA_VISIBLE_DEVICES, else "
                                                 "TUNEPLEX_JOB_MAX_GPUS).")
    started_at = models.DateTimeField()
    heartbeat_at = models.DateTimeField(db_index=True)
