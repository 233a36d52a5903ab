"""Writes for fine-tuning jobs: create (validate everything up front), cancel, and the state
changes a worker reports. Scheduling lives in :mod:`tuneplex.finetuning.scheduler`."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from jobs.training.config import ALL_LINEAR, ConfigError, TrainingConfig
from jobs.training.memory import GIB, MemoryEstimate, ModelShape, advice, estimate
from tuneplex.audit.services import audit_record
from tuneplex.basemodels.inspect import linear_module_names
from tuneplex.basemodels.models import BaseModel
from tuneplex.core.actors import Principal
from tuneplex.core.errors import ApiError, Conflict
from tuneplex.files.models import File
from tuneplex.finetuning.models import FineTuningJob, JobCheckpoint, JobEvent
from tuneplex.tenancy.models import Organization

SUFFIX_PATTERN = re.compile(r"^[a-z0-9][a-z0-9-]{0,39}$")
BASE_LEARNING_RATE = 2e-4  # what learning_rate_multiplier multiplies
# Request names (OpenAI's and ours) → TrainingConfig fields.
OPENAI_NAMES = {"n_epochs": "epochs", "batch_size": "batch_size"}
PATH_FIELDS = {"base_model_dir", "train_file", "validation_file", "output_dir", "resume_from"}
TUNABLE = sorted({f.name for f in dataclasses.fields(TrainingConfig)} - PATH_FIELDS - {"device"})


# --- create --------------------------------------------------------------------------------------


def _hyperparameter_error(param: str, message: str) -> ApiError:
    return ApiError(message, code="invalid_hyperparameter", param=f"hyperparameters.{param}")


def training_config_from_request(*, base_model: BaseModel, hyperparameters: dict[str, Any]
                                 ) -> TrainingConfig:
    """Map the request's hyperparameters onto a validated TrainingConfig (paths filled later)."""
    values: dict[str, Any] = {}
    for key, value in hyperparameters.items():
        name = OPENAI_NAMES.get(key, key)
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
        values[name] = None if value == "auto" else value
    values.setdefault("max_seq_len", base_model.max_sequence_length)
    if isinstance(values["max_seq_len"], int) and values["max_seq_len"] > base_model.max_sequence_length:
        raise _hyperparameter_error("max_seq_len", f"at most {base_model.max_sequence_length} "
                                                   f"for {base_model.name}")
    try:
        return TrainingConfig(base_model_dir=base_model.directory, train_file="-", output_dir="-",
                              device=settings.TRAINING_DEVICE, **values)
    except ConfigError as exc:
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
    """Peak memory of a micro-batch of the longest examples (padding-free packing: their sum)."""
    shape = ModelShape.from_directory(Path(base_model.directory), base_model.parameter_count)
    targets = None if config.target_modules == ALL_LINEAR else set(config.target_modules)
    on_gpu = settings.TRAINING_DEVICE == "cuda"
    return estimate(shape, method=config.method, rank=config.lora_rank, targets=targets,
                    micro_batch=config.batch_size or 8,
                    seq_len=longest_example or config.max_seq_len,
                    gradient_checkpointing=config.gradient_checkpointing,
                    bf16=on_gpu if config.bf16 is None else config.bf16, on_gpu=on_gpu)


def _training_file(organization: Organization, file_id: Any, param: str) -> File:
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


def job_plan(*, organization: Organization, model: str, training_file: str,
             validation_file: str | None = None, hyperparameters: dict | None = None,
             suffix: str | None = None, seed: int | None = None) -> JobPlan:
    """Validate a job request as job_create would (raises ApiError with code and param)."""
    base_model = BaseModel.objects.filter(name=model).first()
    if base_model is None or not base_model.enabled:
        state = "is disabled" if base_model is not None else "does not exist"
        raise ApiError(f"Base model {model!r} {state}; GET /v1/base_models lists those available.",
                       code="model_not_available", param="model")
    train = _training_file(organization, training_file, "training_file")
    validation = (_training_file(organization, validation_file, "validation_file")
                  if validation_file else None)
    if suffix is not None and not SUFFIX_PATTERN.match(suffix):
        raise ApiError("suffix must be 1-40 characters of lowercase letters, digits and '-'.",
                       code="invalid_suffix", param="suffix")
    requested = dict(hyperparameters or {})
    if seed is not None:
        requested["seed"] = seed
    _check_qlora_possible(requested)
    config = training_config_from_request(base_model=base_model, hyperparameters=requested)
    if validation is not None:
        config = config.replace(validation_file="-")
    _check_method(config, base_model)
    _check_target_modules(config, base_model)
    peak = memory_estimate(config, base_model,
                           longest_example=longest_example_tokens(train, config.max_seq_len))
    if peak.total > settings.TRAINING_MEMORY:
        raise ApiError(advice(peak, available=settings.TRAINING_MEMORY,
                              micro_batch=config.batch_size or 8, seq_len=config.max_seq_len,
                              gradient_checkpointing=config.gradient_checkpointing,
                              method=config.method),
                       code="insufficient_memory", param="hyperparameters.batch_size")
    return JobPlan(base_model=base_model, train=train, validation=validation, config=config,
                   memory=peak)


def job_create(*, organization: Organization, actor: Principal, model: str, training_file: str,
               validation_file: str | None = None, hyperparameters: dict | None = None,
               suffix: str | None = None, seed: int | None = None,
               metadata: dict | None = None) -> FineTuningJob:
    plan = job_plan(organization=organization, model=model, training_file=training_file,
                    validation_file=validation_file, hyperparameters=hyperparameters,
                    suffix=suffix, seed=seed)
    base_model, train, validation, config, peak = (plan.base_model, plan.train, plan.validation,
                                                   plan.config, plan.memory)
    stored = {k: v for k, v in dataclasses.asdict(config).items() if k not in PATH_FIELDS}
    with transaction.atomic():
        job = FineTuningJob.objects.create(
            organization=organization, base_model=base_model, training_file=train.id,
            validation_file=validation.id if validation else "", method=config.method,
            hyperparameters=hyperparameters or {}, config=stored, suffix=suffix or "",
            seed=config.seed, metadata=metadata, estimated_memory_bytes=peak.total,
            created_by=actor.user if actor.api_key is None else actor.api_key.created_by)
        job_event(job, f"Created fine-tuning job {job.id}. Estimated peak memory "
                       f"{peak.total / GIB:.2f} GiB.", data={"memory_estimate": peak.as_dict()})
        audit_record(actor=actor, action="finetuning_job.create", obj=job,
                     metadata={"model": model, "training_file": train.id})
        transaction.on_commit(lambda: _enqueue_validation(job.id))
    return job


def _enqueue_validation(job_id: str) -> None:
    from jobs.tasks import validate_job_files

    validate_job_files.delay(job_id)


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
        _training_file(job.organization, job.training_file, "training_file")
        if job.validation_file:
            _training_file(job.organization, job.validation_file, "validation_file")
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
    from jobs.tasks import dispatch_jobs

    dispatch_jobs.delay()


def job_fail(*, job: FineTuningJob, code: str, message: str, param: str | None = None) -> None:
    with transaction.atomic():
        job = FineTuningJob.objects.select_for_update().get(pk=job.pk)
        if job.status in FineTuningJob.FINISHED:
            return
        _finish(job, FineTuningJob.Status.FAILED,
                error={"code": code, "message": message, "param": param})
        job_event(job, f"Job failed: {message}", level="error")


def job_mark_cancelled(*, job: FineTuningJob) -> None:
    with transaction.atomic():
        job = FineTuningJob.objects.select_for_update().get(pk=job.pk)
        if job.status not in FineTuningJob.FINISHED:
            _finish(job, FineTuningJob.Status.CANCELLED)
            job_event(job, "Job cancelled; training stopped.")


def job_record_metrics(*, job: FineTuningJob, metrics: dict[str, Any]) -> None:
    parts = [f"Step {metrics['step']}/{metrics['total_steps']}: training loss={metrics['train_loss']:.4f}"]
    if "eval_loss" in metrics:
        parts.append(f"eval loss={metrics['eval_loss']:.4f}")
    job_event(job, ", ".join(parts), type="metrics", data=metrics)
    FineTuningJob.objects.filter(pk=job.pk).update(
        step=metrics["step"], total_steps=metrics["total_steps"], eta_seconds=metrics.get("eta_seconds"),
        trained_tokens=metrics.get("trained_tokens"), heartbeat_at=timezone.now())


def job_record_checkpoint(*, job: FineTuningJob, step: int, path: str, metrics: dict) -> None:
    JobCheckpoint.objects.update_or_create(job=job, step=step,
                                           defaults={"path": path, "metrics": metrics})
    job_event(job, f"Checkpoint saved at step {step}.", data={"step": step})


def job_succeed(*, job: FineTuningJob, adapter_dir: Path, result: dict[str, Any]) -> None:
    from tuneplex.adapters.services import adapter_create_from_job
    from tuneplex.inference.services import adapter_auto_deploy

    with transaction.atomic():
        job = FineTuningJob.objects.select_for_update().select_related(
            "organization", "base_model").get(pk=job.pk)
        if job.status != FineTuningJob.Status.RUNNING:
            return
        adapter = adapter_create_from_job(job=job, adapter_dir=adapter_dir, sha256=result["sha256"])
        # Deployed in the same commit as the success, so the adapter answers as soon as the job
        # reads succeeded.
        not_deployed = adapter_auto_deploy(adapter)
        _finish(job, FineTuningJob.Status.SUCCEEDED, fine_tuned_model=adapter.name,
                trained_tokens=result.get("trained_tokens"), step=result.get("steps", job.step))
        job_event(job, f"Job succeeded: adapter {adapter.name} is ready.",
                  data={"adapter_id": adapter.id, "sha256": adapter.sha256})
        if not_deployed is None:
            job_event(job, f"Adapter deployed: use model '{adapter.name}' on /v1/chat/completions.")
        elif adapter.organization.auto_deploy:
            job_event(job, f"Adapter not deployed automatically: {not_deployed}", level="warning")
