"""A fine-tuning request checked in full before anything is stored: the request's
hyperparameters mapped onto a validated TrainingConfig, the files, the base model (or the adapter
or checkpoint it continues from), the platform's GPUs and the memory estimate. Writes nothing:
:mod:`.lifecycle` stores what this returns, and the dashboard's pre-flight check shows it."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

from django.conf import settings

from jobs.training.config import ALL_LINEAR, ConfigError, TrainingConfig
from jobs.training.memory import MemoryEstimate, ModelShape, advice, estimate, shards, weight_bytes
from tuneplex.basemodels.inspect import linear_module_names
from tuneplex.basemodels.models import BaseModel
from tuneplex.core.errors import ApiError
from tuneplex.files.models import File
from tuneplex.finetuning.integrations import integrations_check
from tuneplex.finetuning.lineage import Parent, inherit_settings, is_fine_tuned_name, parent_resolve
from tuneplex.finetuning.selectors import gpu_capacity
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


def _check_servable(config: TrainingConfig) -> None:
    """Refuse, before it trains, an adapter the serving pool could not load. The trainer makes
    LoRA on the decoder's linear modules only (``_check_target_modules``; no embeddings, head or
    vocabulary change), which vLLM applies; what is left is the rank, which vLLM caps per engine
    (``--max-lora-rank``). With inference off, nothing is served and nothing is checked."""
    if settings.ENGINE_MODE == "off" or config.lora_rank <= settings.ENGINE_MAX_LORA_RANK:
        return
    raise ApiError(f"lora_rank {config.lora_rank} is above the largest rank the serving pool loads "
                   f"({settings.ENGINE_MAX_LORA_RANK}, TUNEPLEX_ENGINE_MAX_LORA_RANK): the adapter "
                   f"could not be served. Use a rank of at most {settings.ENGINE_MAX_LORA_RANK}, or "
                   f"ask the operator to raise the engines' maximum.",
                   code="adapter_not_servable", param="hyperparameters.lora_rank")


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
    # With GPU slots from membership and no GPU worker registered yet (the fleet starting, or
    # scaled to zero), the job is accepted and waits queued until one joins (its events say so).
    capacity = gpu_capacity()
    if config.gpus > capacity and settings.GPU_SLOTS is not None:
        raise _hyperparameter_error(
            "gpus", f"this platform has {capacity} GPU(s) in all (TUNEPLEX_GPU_SLOTS)")
    if config.gpus > capacity > 0:
        raise _hyperparameter_error(
            "gpus", f"the GPU workers registered now have {capacity} GPU(s) in all "
                    "(TUNEPLEX_GPU_SLOTS is unset: GPU workers register themselves)")


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


def usable_training_file(organization: Organization, file_id: Any, param: str,
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
    integrations: list[dict[str, Any]] = dataclasses.field(default_factory=list)


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
             method_type: str = "supervised", integrations: Any = None) -> JobPlan:
    """Validate a job request as job_create would (raises ApiError with code and param).

    ``model`` is a base model, or one of the organization's adapters or job checkpoints to
    continue training from (:mod:`tuneplex.finetuning.lineage`)."""
    if method_type not in METHOD_TYPES:
        raise ApiError(f"method.type must be one of {', '.join(METHOD_TYPES)}.",
                       code="unsupported_method", param="method.type")
    parent = parent_resolve(organization=organization, model=model) if is_fine_tuned_name(model) else None
    base_model = _base_model(parent.job.base_model.name if parent else model)
    train = usable_training_file(organization, training_file, "training_file", method_type)
    validation = (usable_training_file(organization, validation_file, "validation_file",
                                       method_type) if validation_file else None)
    if suffix is not None and not SUFFIX_PATTERN.match(suffix):
        raise ApiError("suffix must be 1-40 characters of lowercase letters, digits and '-'.",
                       code="invalid_suffix", param="suffix")
    checked_integrations = integrations_check(integrations, organization=organization)
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
    _check_servable(config)
    if parent is not None and config.objective == "dpo":
        _check_unsharded(config, base_model)
    peak = memory_estimate(config, base_model,
                           longest_example=longest_example_tokens(train, config.max_seq_len))
    if peak.total > settings.TRAINING_MEMORY:
        raise ApiError(advice(peak, available=settings.TRAINING_MEMORY,
                              micro_batch=config.batch_size or 8, seq_len=config.max_seq_len,
                              gradient_checkpointing=config.gradient_checkpointing,
                              method=config.method, gpus=config.gpus,
                              max_gpus=min(settings.JOB_MAX_GPUS,
                                           gpu_capacity() or settings.JOB_MAX_GPUS)),
                       code="insufficient_memory", param="hyperparameters.batch_size")
    return JobPlan(base_model=base_model, train=train, validation=validation, config=config,
                   memory=peak, method_type=method_type, parent=parent,
                   integrations=checked_integrations)
