"""Writes for fine-tuning jobs: create (validate everything up front), cancel, and the state
changes a worker reports. Scheduling lives in :mod:`tuneplex.finetuning.scheduler`."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db import transaction
from django.db.models.functions import Now
from django.utils import timezone

from jobs.training.config import ALL_LINEAR, ConfigError, TrainingConfig
from jobs.training.memory import (
    GIB,
    MemoryEstimate,
    ModelShape,
    advice,
    estimate,
    shards,
    weight_bytes,
)
from tuneplex.audit.services import audit_record
from tuneplex.basemodels.inspect import linear_module_names
from tuneplex.basemodels.models import BaseModel
from tuneplex.core import queue
from tuneplex.core.actors import Principal
from tuneplex.core.errors import ApiError, Conflict
from tuneplex.core.storage import delete_prefix
from tuneplex.files.models import File
from tuneplex.files.services import storage_quota_check
from tuneplex.finetuning.lineage import Parent, inherit_settings, is_fine_tuned_name, parent_resolve
from tuneplex.finetuning.models import FineTuningJob, JobCheckpoint, JobEvent
from tuneplex.tenancy.models import Organization

SUFFIX_PATTERN = re.compile(r"^[a-z0-9][a-z0-9-]{0,39}$")
BASE_LEARNING_RATE = 2e-4  # what learning_rate_multiplier multiplies
# Request names (OpenAI's and ours) → TrainingConfig fields.
OPENAI_NAMES = {"n_epochs": "epochs", "batch_size": "batch_size", "beta": "dpo_beta"}
PATH_FIELDS = {"base_model_dir", "train_file", "validation_file", "output_dir", "resume_from",
               "init_adapter_dir"}
# Set by the worker, not the tenant: where the data is, the device, and its memory budget.
WORKER_FIELDS = PATH_FIELDS | {"device", "memory_limit_gib"}
# Set by the request's method type, not as a hyperparameter.
METHOD_FIELDS = {"objective"}
TUNABLE = sorted({f.name for f in dataclasses.fields(TrainingConfig)} - WORKER_FIELDS - METHOD_FIELDS)
AUTO_IS_NONE = {f.name: f.default is None for f in dataclasses.fields(TrainingConfig)}
METHOD_TYPES = ("supervised", "dpo")
# The file format each method trains on.
PREFERENCE_FORMAT = "preference"


# --- create --------------------------------------------------------------------------------------


def _hyperparameter_error(param: str, message: str) -> ApiError:
    return ApiError(message, code="invalid_hyperparameter", param=f"hyperparameters.{param}")


def training_config_from_request(*, base_model: BaseModel, hyperparameters: dict[str, Any],
                                 method_type: str = "supervised") -> TrainingConfig:
    """Map the request's hyperparameters onto a validated TrainingConfig (paths filled later)."""
    values: dict[str, Any] = {"objective": method_type}
    for key, value in hyperparameters.items():
        name = OPENAI_NAMES.get(key, key)
        if name == "dpo_beta":
            if method_type != "dpo":
                raise _hyperparameter_error(key, "beta is a hyperparameter of the dpo method")
            if value == "auto" or value is None:
                continue  # the trainer's default
        if key == "learning_rate_multiplier":
            if value == "auto" or value is None:
                continue
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise _hyperparameter_error(key, "must be a positive number or 'auto'")
            if "learning_rate" in hyperparameters:
                raise _hyperparameter_error(key, "give learning_rate or learning_rate_multiplier, "
                                                 "not both")
            values["learning_rate"] = BASE_LEARNING_RATE * value
            continue
        if name not in TUNABLE:
            raise _hyperparameter_error(key, f"unknown hyperparameter {key!r}; known: "
                                             f"{', '.join(['n_epochs', 'learning_rate_multiplier'] + TUNABLE)}")
        # "auto" is None where None means automatic; where "auto" is a value itself (sharding),
        # it stays.
        values[name] = None if value == "auto" and AUTO_IS_NONE.get(name, True) else value
    values.setdefault("max_seq_len", base_model.max_sequence_length)
    if isinstance(values["max_seq_len"], int) and values["max_seq_len"] > base_model.max_sequence_length:
        raise _hyperparameter_error("max_seq_len", f"at most {base_model.max_sequence_length} "
                                                   f"for {base_model.name}")
    try:
        return TrainingConfig(base_model_dir=base_model.directory, train_file="-", output_dir="-",
                              device=settings.TRAINING_DEVICE, **values)
    except ConfigError as exc:
        if exc.param == "dpo_beta":
            raise _hyperparameter_error("beta", exc.message) from None
        raise _hyperparameter_error(exc.param, exc.message) from None
    except TypeError as exc:
        raise ApiError(f"Invalid hyperparameters: {exc}", code="invalid_hyperparameter",
                       param="hyperparameters") from None


def _check_target_modules(config: TrainingConfig, base_model: BaseModel) -> None:
    if config.target_modules == ALL_LINEAR:
        return
    available = linear_module_names(Path(base_model.directory))
    unknown = sorted(set(config.target_modules) - available)
    if unknown:
        raise _hyperparameter_error(
            "target_modules", f"{base_model.name} has no module named {unknown[0]!r}; "
                              f"its linear modules are {', '.join(sorted(available))}")


def _check_method(config: TrainingConfig, base_model: BaseModel) -> None:
    if config.method not in base_model.methods_allowed:
        raise _hyperparameter_error("method", f"{config.method} is not allowed for "
                                              f"{base_model.name} (allowed: "
                                              f"{', '.join(base_model.methods_allowed)})")


def _check_gpus(config: TrainingConfig) -> None:
    if config.gpus > settings.JOB_MAX_GPUS:
        raise _hyperparameter_error(
            "gpus", f"at most {settings.JOB_MAX_GPUS} GPU(s) per job on this platform (the GPUs "
                    "one GPU worker has, TUNEPLEX_JOB_MAX_GPUS)")
    if config.gpus > settings.GPU_SLOTS:
        raise _hyperparameter_error(
            "gpus", f"this platform has {settings.GPU_SLOTS} GPU(s) in all (TUNEPLEX_GPU_SLOTS)")


def _check_unsharded(config: TrainingConfig, base_model: BaseModel) -> None:
    """A DPO job continued from an adapter loads that adapter whole as its reference, which the
    sharded trainer cannot hold yet: refuse it where the job would be sharded."""
    shape = ModelShape.from_directory(Path(base_model.directory), base_model.parameter_count)
    on_gpu = settings.TRAINING_DEVICE == "cuda"
    weights = weight_bytes(shape, method=config.method, on_gpu=on_gpu,
                           bf16=on_gpu if config.bf16 is None else config.bf16)
    if shards(sharding=config.sharding, method=config.method, gpus=config.gpus, weights=weights,
              budget=settings.TRAINING_MEMORY) > 1:
        raise _hyperparameter_error(
            "sharding", "a DPO job continued from an adapter cannot be sharded across GPUs yet "
                        "(its reference adapter is held whole); use sharding 'off' with a model "
                        "that fits one GPU, or start the DPO job from the base model")


def _check_qlora_possible(requested: dict[str, Any]) -> None:
    """Never silently train QLoRA as LoRA: refuse it where there are no CUDA workers."""
    if requested.get("method") == "qlora" and settings.TRAINING_DEVICE != "cuda":
        raise ApiError("QLoRA needs CUDA GPU workers, and this platform trains on the CPU "
                       "(TUNEPLEX_TRAINING_DEVICE=cpu). Use method 'lora'.",
                       code="qlora_unavailable", param="hyperparameters.method")


def longest_example_tokens(file: File, max_seq_len: int) -> int:
    """Tokens in the file's longest example: from its statistics when ready, else a safe bound
    from its longest line (about 3 bytes a token for JSON text, plus the chat template)."""
    stats = file.statistics or {}
    if file.statistics_status == File.StatisticsStatus.READY and "token_length" in stats:
        return min(max_seq_len, int(stats["token_length"]["max"]))
    longest = (file.validation or {}).get("longest_line_bytes") or max_seq_len * 3
    return min(max_seq_len, longest // 3 + 64)


def memory_estimate(config: TrainingConfig, base_model: BaseModel, *,
                    longest_example: int | None = None):
    """Peak memory of one GPU for a micro-batch of the longest examples (padding-free packing:
    their sum), with the model split over the job's GPUs where it will be."""
    shape = ModelShape.from_directory(Path(base_model.directory), base_model.parameter_count)
    targets = None if config.target_modules == ALL_LINEAR else set(config.target_modules)
    on_gpu = settings.TRAINING_DEVICE == "cuda"
    return estimate(shape, method=config.method, rank=config.lora_rank, targets=targets,
                    micro_batch=config.batch_size or 8,
                    seq_len=longest_example or config.max_seq_len,
                    gradient_checkpointing=config.gradient_checkpointing,
                    bf16=on_gpu if config.bf16 is None else config.bf16, on_gpu=on_gpu,
                    available=settings.TRAINING_MEMORY,  # the trainer plans within it too
                    gpus=config.gpus, sharding=config.sharding,
                    dropout=config.lora_dropout > 0)


def _training_file(organization: Organization, file_id: Any, param: str,
                   method_type: str | None = None) -> File:
    file = (File.objects.filter(organization=organization, id=file_id).first()
            if isinstance(file_id, str) else None)
    if file is None:
        raise ApiError(f"No such file: {file_id!r}.", code="file_not_found", param=param)
    if file.status != File.Status.PROCESSED:
        report = file.validation or {}
        raise ApiError(f"File {file.id} failed validation ({report.get('error_count', 0)} "
                       "problem(s)); fix it and upload it again.", code="invalid_file", param=param)
    if file.purpose != File.Purpose.FINE_TUNE:
        raise ApiError(f"File {file.id} has purpose {file.purpose!r}, not 'fine-tune'.",
                       code="invalid_file", param=param)
    if method_type is not None and (file.format == PREFERENCE_FORMAT) != (method_type == "dpo"):
        wanted = ("preference pairs (input, preferred_output, non_preferred_output)"
                  if method_type == "dpo" else "examples (chat, alpaca, prompt_completion or text)")
        raise ApiError(f"File {file.id} holds {file.format} data; a {method_type} job trains on "
                       f"{wanted}.", code="invalid_file", param=param)
    return file


@dataclasses.dataclass(frozen=True)
class JobPlan:
    """A job request checked in full, with its memory estimate: what job_create stores, and what
    the dashboard's pre-flight check shows before anything is submitted."""

    base_model: BaseModel
    train: File
    validation: File | None
    config: TrainingConfig
    memory: MemoryEstimate
    method_type: str = "supervised"
    parent: Parent | None = None


def _base_model(model: str) -> BaseModel:
    base_model = BaseModel.objects.filter(name=model).first()
    if base_model is None or not base_model.enabled:
        state = "is disabled" if base_model is not None else "does not exist"
        raise ApiError(f"Base model {model!r} {state}; GET /v1/base_models lists those available.",
                       code="model_not_available", param="model")
    return base_model


def job_plan(*, organization: Organization, model: str, training_file: str,
             validation_file: str | None = None, hyperparameters: dict | None = None,
             suffix: str | None = None, seed: int | None = None,
             method_type: str = "supervised") -> JobPlan:
    """Validate a job request as job_create would (raises ApiError with code and param).

    ``model`` is a base model, or one of the organization's adapters or job checkpoints to
    continue training from (:mod:`tuneplex.finetuning.lineage`)."""
    if method_type not in METHOD_TYPES:
        raise ApiError(f"method.type must be one of {', '.join(METHOD_TYPES)}.",
                       code="unsupported_method", param="method.type")
    parent = parent_resolve(organization=organization, model=model) if is_fine_tuned_name(model) else None
    base_model = _base_model(parent.job.base_model.name if parent else model)
    train = _training_file(organization, training_file, "training_file", method_type)
    validation = (_training_file(organization, validation_file, "validation_file", method_type)
                  if validation_file else None)
    if suffix is not None and not SUFFIX_PATTERN.match(suffix):
        raise ApiError("suffix must be 1-40 characters of lowercase letters, digits and '-'.",
                       code="invalid_suffix", param="suffix")
    requested = dict(hyperparameters or {})
    if seed is not None:
        requested["seed"] = seed
    if parent is not None:
        requested = inherit_settings(parent, requested)
    _check_qlora_possible(requested)
    config = training_config_from_request(base_model=base_model, hyperparameters=requested,
                                          method_type=method_type)
    if validation is not None:
        config = config.replace(validation_file="-")
    _check_method(config, base_model)
    _check_gpus(config)
    _check_target_modules(config, base_model)
    if parent is not None and config.objective == "dpo":
        _check_unsharded(config, base_model)
    peak = memory_estimate(config, base_model,
                           longest_example=longest_example_tokens(train, config.max_seq_len))
    if peak.total > settings.TRAINING_MEMORY:
        raise ApiError(advice(peak, available=settings.TRAINING_MEMORY,
                              micro_batch=config.batch_size or 8, seq_len=config.max_seq_len,
                              gradient_checkpointing=config.gradient_checkpointing,
                              method=config.method, gpus=config.gpus,
                              max_gpus=min(settings.JOB_MAX_GPUS, settings.GPU_SLOTS)),
                       code="insufficient_memory", param="hyperparameters.batch_size")
    return JobPlan(base_model=base_model, train=train, validation=validation, config=config,
                   memory=peak, method_type=method_type, parent=parent)


def job_create(*, organization: Organization, actor: Principal, model: str, training_file: str,
               validation_file: str | None = None, hyperparameters: dict | None = None,
               suffix: str | None = None, seed: int | None = None,
               metadata: dict | None = None, method_type: str = "supervised") -> FineTuningJob:
    plan = job_plan(organization=organization, model=model, training_file=training_file,
                    validation_file=validation_file, hyperparameters=hyperparameters,
                    suffix=suffix, seed=seed, method_type=method_type)
    base_model, train, validation, config, peak, parent = (
        plan.base_model, plan.train, plan.validation, plan.config, plan.memory, plan.parent)
    stored = {k: v for k, v in dataclasses.asdict(config).items() if k not in WORKER_FIELDS}
    # A job stores checkpoints and an adapter: none may start once the quota is used up.
    storage_quota_check(organization, 0, what="a new job's checkpoints and adapter", param=None)
    job = FineTuningJob(
        organization=organization, base_model=base_model, training_file=train.id,
        validation_file=validation.id if validation else "", method=config.method,
        method_type=method_type, hyperparameters=hyperparameters or {}, config=stored,
        suffix=suffix or "", seed=config.seed, gpus=config.gpus, metadata=metadata,
        estimated_memory_bytes=peak.total,
        created_by=actor.user if actor.api_key is None else actor.api_key.created_by)
    if parent is not None:
        job.parent_adapter, job.parent_checkpoint = parent.adapter, parent.checkpoint
        job.lineage = parent.lineage(job_id=job.id, training_file=train.id,
                                     validation_file=job.validation_file, method_type=method_type)
    with transaction.atomic():
        _check_queue_room(organization)
        job.save(force_insert=True)
        job_event(job, f"Created fine-tuning job {job.id}. Estimated peak memory "
                       f"{peak.total / GIB:.2f} GiB.", data={"memory_estimate": peak.as_dict()})
        if parent is not None:
            job_event(job, f"Continues training from {parent.requested}.",
                      data={"lineage": job.lineage})
        audit_record(actor=actor, action="finetuning_job.create", obj=job,
                     metadata={"model": model, "training_file": train.id,
                               "method": method_type})
        transaction.on_commit(lambda: _enqueue_validation(job.id))
    return job


def _check_queue_room(organization: Organization) -> None:
    """At most TUNEPLEX_ORG_MAX_QUEUED_JOBS jobs of an organization wait (validating or queued):
    the scheduler's work stays bounded, and so does what one organization can pile up. The
    organization's row is locked, so that two creations cannot both take the last place."""
    Organization.objects.select_for_update().filter(pk=organization.pk).first()
    waiting = FineTuningJob.objects.filter(
        organization=organization, status__in=(FineTuningJob.Status.VALIDATING_FILES,
                                               FineTuningJob.Status.QUEUED)).count()
    if waiting >= settings.ORG_MAX_QUEUED_JOBS:
        raise ApiError(f"The organization already has {waiting} jobs waiting to run, its limit "
                       f"(TUNEPLEX_ORG_MAX_QUEUED_JOBS); cancel one or wait for some to start.",
                       code="too_many_queued_jobs", status=429)


def _enqueue_validation(job_id: str) -> None:
    queue.enqueue(queue.VALIDATE_JOB_FILES, job_id)


# --- events --------------------------------------------------------------------------------------


def job_event(job: FineTuningJob, message: str, *, level: str = "info", data: dict | None = None,
              type: str = "message") -> JobEvent:
    level = {"warning": "warn"}.get(level, level)  # OpenAI's levels: info, warn, error
    return JobEvent.objects.create(job=job, level=level, message=message, data=data or {}, type=type)


# --- lifecycle -----------------------------------------------------------------------------------


def job_files_validated(*, job_id: str) -> FineTuningJob | None:
    """validating_files → queued, after re-checking the files still exist and are valid."""
    job = FineTuningJob.objects.filter(id=job_id).select_related("organization").first()
    if job is None or job.status != FineTuningJob.Status.VALIDATING_FILES:
        return None
    try:
        _training_file(job.organization, job.training_file, "training_file", job.method_type)
        if job.validation_file:
            _training_file(job.organization, job.validation_file, "validation_file",
                           job.method_type)
    except ApiError as exc:
        job_fail(job=job, code=exc.code, message=exc.message, param=exc.param)
        return None
    updated = FineTuningJob.objects.filter(id=job_id, status=FineTuningJob.Status.VALIDATING_FILES
                                           ).update(status=FineTuningJob.Status.QUEUED)
    if updated:
        job_event(job, "Files validated; job queued.")
    return job


def job_cancel(*, organization: Organization, actor: Principal, job: FineTuningJob) -> FineTuningJob:
    with transaction.atomic():
        job = FineTuningJob.objects.select_for_update().get(pk=job.pk, organization=organization)
        if job.status in FineTuningJob.FINISHED:
            raise Conflict(f"The job has already {job.status}.", code="job_finished")
        if job.status == FineTuningJob.Status.RUNNING:
            # The worker's heartbeat sees the flag and stops the trainer within seconds.
            job.cancel_requested = True
            job.save(update_fields=["cancel_requested"])
            job_event(job, "Cancellation requested; stopping the trainer.")
        else:
            _finish(job, FineTuningJob.Status.CANCELLED)
            job_event(job, "Job cancelled.")
        audit_record(actor=actor, action="finetuning_job.cancel", obj=job)
    return job


def _finish(job: FineTuningJob, status: str, **fields: Any) -> None:
    job.status = status
    job.finished_at = timezone.now()
    job.eta_seconds = None
    for name, value in fields.items():
        setattr(job, name, value)
    job.save()
    transaction.on_commit(_enqueue_dispatch)


def _enqueue_dispatch() -> None:
    queue.enqueue(queue.DISPATCH_JOBS)


def job_fail(*, job: FineTuningJob, code: str, message: str, param: str | None = None,
             attempt: int | None = None) -> bool:
    """Fail the job unless it has finished; with ``attempt``, only while that claim holds it."""
    with transaction.atomic():
        job = FineTuningJob.objects.select_for_update().get(pk=job.pk)
        if job.status in FineTuningJob.FINISHED or not _still_holds(job, attempt):
            return False
        _finish(job, FineTuningJob.Status.FAILED,
                error={"code": code, "message": message, "param": param})
        job_event(job, f"Job failed: {message}", level="error")
    return True


def job_mark_cancelled(*, job: FineTuningJob, attempt: int | None = None) -> None:
    with transaction.atomic():
        job = FineTuningJob.objects.select_for_update().get(pk=job.pk)
        if job.status not in FineTuningJob.FINISHED and _still_holds(job, attempt):
            _finish(job, FineTuningJob.Status.CANCELLED)
            job_event(job, "Job cancelled; training stopped.")


def _still_holds(job: FineTuningJob, attempt: int | None) -> bool:
    return attempt is None or (job.status == FineTuningJob.Status.RUNNING and job.attempts == attempt)


# --- a worker's writes, fenced by its attempt ----------------------------------------------------


class StaleAttempt(Exception):
    """The worker's claim was superseded: the job was re-queued (and maybe claimed again) or it
    finished. Nothing the old attempt reports may change the job any more."""


def _touch(job_id: str, attempt: int, **fields: Any) -> None:
    """Within the caller's transaction: refresh the heartbeat (the database's clock) and set
    ``fields``, only while ``attempt`` still holds the running job. The UPDATE's row lock keeps
    the reaper from re-queuing the job until the caller's transaction ends."""
    held = FineTuningJob.objects.filter(id=job_id, status=FineTuningJob.Status.RUNNING,
                                        attempts=attempt).update(heartbeat_at=Now(), **fields)
    if not held:
        raise StaleAttempt(f"attempt {attempt} of {job_id} no longer holds the job")


def job_holds(*, job_id: str, attempt: int) -> bool:
    """Heartbeat: True (and the heartbeat recorded) while ``attempt`` still holds the job."""
    try:
        _touch(job_id, attempt)
    except StaleAttempt:
        return False
    return True


def job_report_event(*, job: FineTuningJob, attempt: int, message: str, level: str = "info",
                     data: dict | None = None) -> None:
    with transaction.atomic():
        _touch(job.id, attempt)
        job_event(job, message, level=level, data=data)


def job_record_metrics(*, job: FineTuningJob, attempt: int, metrics: dict[str, Any]) -> None:
    parts = [f"Step {metrics['step']}/{metrics['total_steps']}: training loss={metrics['train_loss']:.4f}"]
    if "eval_loss" in metrics:
        parts.append(f"eval loss={metrics['eval_loss']:.4f}")
    with transaction.atomic():
        _touch(job.id, attempt, step=metrics["step"], total_steps=metrics["total_steps"],
               eta_seconds=metrics.get("eta_seconds"), trained_tokens=metrics.get("trained_tokens"))
        job_event(job, ", ".join(parts), type="metrics", data=metrics)


def checkpoint_prefix(job: FineTuningJob, *, attempt: int, step: int) -> str:
    """Where a checkpoint's files live in artifact storage. The attempt is part of the name, so
    a superseded worker can never overwrite the files of the attempt that replaced it."""
    return f"orgs/{job.organization_id}/jobs/{job.id}/checkpoints/step-{step}-a{attempt}"


def tensorboard_prefix(job: FineTuningJob) -> str:
    """Where a job's TensorBoard event files live in artifact storage (one file per attempt)."""
    return f"orgs/{job.organization_id}/jobs/{job.id}/tensorboard"


def job_record_checkpoint(*, job: FineTuningJob, attempt: int, step: int, blob_prefix: str,
                          metrics: dict, size: int = 0) -> None:
    """Record a checkpoint whose files are already in artifact storage, then drop the ones beyond
    the newest TUNEPLEX_JOB_KEEP_CHECKPOINTS (their rows in this transaction, their files after).
    A checkpoint that an unfinished job continues from is kept until that job has finished."""
    with transaction.atomic():
        _touch(job.id, attempt)
        replaced = list(JobCheckpoint.objects.filter(job=job, step__gte=step)
                        .exclude(blob_prefix=blob_prefix).values_list("blob_prefix", flat=True))
        JobCheckpoint.objects.filter(job=job, step__gte=step).delete()
        JobCheckpoint.objects.create(job=job, step=step, attempt=attempt, blob_prefix=blob_prefix,
                                     metrics=metrics, bytes=size)
        in_use = (FineTuningJob.objects.filter(parent_checkpoint__job=job)
                  .exclude(status__in=FineTuningJob.FINISHED).values("parent_checkpoint"))
        stale = list(JobCheckpoint.objects.filter(job=job).exclude(id__in=in_use).order_by("-step")
                     [settings.JOB_KEEP_CHECKPOINTS:].values_list("id", "blob_prefix"))
        JobCheckpoint.objects.filter(id__in=[checkpoint_id for checkpoint_id, _ in stale]).delete()
        job_event(job, f"Checkpoint saved at step {step}.", data={"step": step})
        dropped = replaced + [prefix for _, prefix in stale]
        transaction.on_commit(lambda: _delete_checkpoint_files(dropped), robust=True)


def _delete_checkpoint_files(prefixes: list[str]) -> None:
    for prefix in prefixes:
        if prefix:
            delete_prefix(prefix)


def job_requeue(*, job: FineTuningJob, attempt: int | None, reason: str) -> str:
    """running → queued (to resume from the newest checkpoint in storage on any node), or failed
    once TUNEPLEX_JOB_MAX_ATTEMPTS claims were spent. ``attempt`` None: whichever attempt holds
    it (the reaper, which has checked the heartbeat against the database's clock).
    Returns "requeued", "failed", or "" when the job was no longer running (as that attempt)."""
    if job.attempts >= settings.JOB_MAX_ATTEMPTS:
        failed = job_fail(job=job, code="worker_lost", attempt=attempt,
                          message=f"{reason} This happened on each of {job.attempts} attempts; "
                                  "giving up.")
        return "failed" if failed else ""
    held = {"attempts": attempt} if attempt is not None else {}
    with transaction.atomic():
        moved = FineTuningJob.objects.filter(
            id=job.id, status=FineTuningJob.Status.RUNNING, **held
        ).update(status=FineTuningJob.Status.QUEUED, dispatched_at=None, worker="", eta_seconds=None)
        if not moved:
            return ""
        newest = job.checkpoints.order_by("-step").first()
        then = (f"the next attempt resumes from the checkpoint at step {newest.step} in storage"
                if newest else "no checkpoint was saved yet, so the next attempt starts over")
        job_event(job, f"{reason} Job re-queued; {then}.", level="warning")
        transaction.on_commit(_enqueue_dispatch)
    return "requeued"


def job_succeed(*, job: FineTuningJob, attempt: int, adapter_dir: Path,
                result: dict[str, Any]) -> bool:
    """Store the adapter, then mark the job succeeded with its Adapter row in one short
    transaction (fenced by ``attempt``); auto-deploy runs after the commit.

    False (and nothing stored) if this attempt no longer holds the job.
    """
    from tuneplex.adapters.services import adapter_prepare

    if not job_holds(job_id=job.id, attempt=attempt):
        return False
    job = FineTuningJob.objects.select_related("organization", "base_model").get(pk=job.pk)
    adapter = adapter_prepare(job=job, adapter_dir=adapter_dir, sha256=result["sha256"])
    try:
        with transaction.atomic():
            _touch(job.id, attempt, status=FineTuningJob.Status.SUCCEEDED, finished_at=Now(),
                   eta_seconds=None, fine_tuned_model=adapter.name,
                   trained_tokens=result.get("trained_tokens"),
                   step=result.get("steps", job.step))
            adapter.save(force_insert=True)
            job_event(job, f"Job succeeded: adapter {adapter.name} is ready.",
                      data={"adapter_id": adapter.id, "sha256": adapter.sha256})
            transaction.on_commit(_enqueue_dispatch)
            transaction.on_commit(lambda: _deploy_after_success(adapter.id), robust=True)
    except BaseException as exc:
        delete_prefix(adapter.blob_prefix)  # nothing half-written: no files without the row
        if isinstance(exc, StaleAttempt):
            return False
        raise
    return True


def _deploy_after_success(adapter_id: str) -> None:
    from tuneplex.adapters.models import Adapter
    from tuneplex.inference.services import adapter_auto_deploy

    adapter = Adapter.objects.select_related("organization", "base_model", "job").get(id=adapter_id)
    not_deployed = adapter_auto_deploy(adapter)
    if not_deployed is None:
        job_event(adapter.job, f"Adapter deployed: use model '{adapter.name}' on "
                               "/v1/chat/completions.")
    elif adapter.organization.auto_deploy:
        job_event(adapter.job, f"Adapter not deployed automatically: {not_deployed}",
                  level="warning")
