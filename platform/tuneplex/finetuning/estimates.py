"""The pre-flight time estimate: how many steps and tokens a job will train, and for how long.

Speed comes from the organization's own finished jobs on the same base model, adapter method and
training method when there are any (the median tokens/s their trainers reported), else from
TUNEPLEX_TRAINING_GFLOPS at about 4 x parameters FLOPs a token (LoRA: forward plus the backward
pass through the frozen weights); DPO adds the reference model's forward pass, 2 x parameters.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from django.conf import settings

from jobs.training.config import TrainingConfig, resolve_auto
from tuneplex.basemodels.models import BaseModel
from tuneplex.files.models import File
from tuneplex.finetuning.models import FineTuningJob, JobEvent
from tuneplex.tenancy.models import Organization

RECENT_JOBS = 3
BYTES_PER_TOKEN = 3  # JSON chat text, when the file's statistics are not ready yet
FLOPS_PER_TOKEN = {"supervised": 4, "dpo": 6}  # x parameters


@dataclass(frozen=True)
class TimeEstimate:
    examples: int
    epochs: int
    batch_size: int
    steps: int
    tokens: int  # tokens the trainer will process, all epochs
    tokens_per_second: float
    seconds: float
    speed_basis: str  # "measured": this organization's recent jobs; "assumed": the setting
    tokens_basis: str  # "statistics": tokenized; "file size": statistics not ready


def measured_speed(*, organization: Organization, base_model: BaseModel, method: str,
                   method_type: str = "supervised") -> float | None:
    """Median tokens/s the organization's last few succeeded jobs on this model reported."""
    jobs = list(FineTuningJob.objects.filter(
        organization=organization, base_model=base_model, method=method, method_type=method_type,
        status=FineTuningJob.Status.SUCCEEDED).order_by("-finished_at").values_list("id", flat=True)
        [:RECENT_JOBS])
    speeds = [data.get("tokens_per_second") for data in
              JobEvent.objects.filter(job_id__in=jobs, type="metrics").values_list("data", flat=True)]
    speeds = [s for s in speeds if isinstance(s, (int, float)) and s > 0]
    return float(statistics.median(speeds)) if speeds else None


def assumed_speed(base_model: BaseModel, method_type: str = "supervised") -> float:
    flops = FLOPS_PER_TOKEN.get(method_type, FLOPS_PER_TOKEN["supervised"])
    return settings.TRAINING_GFLOPS * 1e9 / (flops * max(base_model.parameter_count, 1))


def time_estimate(*, organization: Organization, config: TrainingConfig, base_model: BaseModel,
                  train: File) -> TimeEstimate:
    stats = train.statistics or {}
    ready = train.statistics_status == File.StatisticsStatus.READY and "total_tokens" in stats
    examples = int(stats["examples"] if ready else (train.validation or {}).get("examples", 0))
    tokens_per_epoch = int(stats["total_tokens"] if ready else train.bytes // BYTES_PER_TOKEN)
    kept = 1.0 - (config.validation_split if config.validation_file is None else 0.0)
    n_train = max(1, int(examples * kept))
    resolved = resolve_auto(config, n_train)
    steps_per_epoch = math.ceil(n_train / (resolved.batch_size * resolved.gradient_accumulation_steps))
    steps = steps_per_epoch * resolved.epochs
    fraction = 1.0
    if resolved.max_steps is not None and resolved.max_steps < steps:
        fraction, steps = resolved.max_steps / steps, resolved.max_steps
    tokens = int(tokens_per_epoch * kept * resolved.epochs * fraction)
    speed = measured_speed(organization=organization, base_model=base_model, method=config.method,
                           method_type=config.objective)
    basis = "measured"
    if speed is None:
        speed, basis = assumed_speed(base_model, config.objective), "assumed"
    return TimeEstimate(examples=n_train, epochs=resolved.epochs, batch_size=resolved.batch_size,
                        steps=steps, tokens=tokens, tokens_per_second=round(speed, 1),
                        seconds=round(tokens / speed, 1), speed_basis=basis,
                        tokens_basis="statistics" if ready else "file size")
