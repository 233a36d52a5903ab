"""Continued training: a job whose ``model`` is one of the organization's own fine-tuned models.

``model`` may name an adapter (``ft:…`` or its id ``adapter-…``) or a checkpoint of a job
(``<adapter name or job id>:ckpt-step-N``, as ``GET …/checkpoints`` lists them, or its id
``ftckpt-…``). The job trains on the same base model, starting from those LoRA weights; rank,
alpha and target modules are the parent's (a request that sets them differently is refused).
Another organization's adapter or checkpoint does not exist here: a 404 ``model_not_found``.

The lineage (the model as requested, the adapter, the checkpoint, and the datasets of every
generation, oldest first) is stored on the job and, on success, on its adapter; it survives the
deletion of the parent.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from tuneplex.adapters.models import Adapter
from tuneplex.core.errors import ApiError
from tuneplex.finetuning.models import FineTuningJob, JobCheckpoint
from tuneplex.tenancy.models import Organization

CHECKPOINT_NAME = re.compile(r"^(?P<owner>.+):ckpt-step-(?P<step>[0-9]{1,9})$")
# LoRA settings a continued job takes from its parent: the weights only fit these.
INHERITED = ("lora_rank", "lora_alpha", "target_modules")


@dataclasses.dataclass(frozen=True)
class Parent:
    """The weights a job continues from: an adapter, or a checkpoint of a job."""

    requested: str
    job: FineTuningJob  # the job that trained them
    adapter: Adapter | None = None
    checkpoint: JobCheckpoint | None = None

    @property
    def blob_prefix(self) -> str:
        return self.checkpoint.blob_prefix if self.checkpoint else self.adapter.blob_prefix

    def settings(self) -> dict[str, Any]:
        return {name: self.job.config[name] for name in INHERITED if name in self.job.config}

    def lineage(self, *, job_id: str, training_file: str, validation_file: str | None,
                method_type: str) -> dict[str, Any]:
        """The new job's lineage: the parent's generations, then this job's own datasets."""
        datasets = list((self.job.lineage or {}).get("datasets") or [_datasets_of(self.job)])
        return {
            "model": self.requested,
            "parent_job_id": self.job.id,
            "adapter": ({"id": self.adapter.id, "name": self.adapter.name}
                        if self.adapter else None),
            "checkpoint": ({"id": self.checkpoint.id, "job_id": self.job.id,
                            "step": self.checkpoint.step} if self.checkpoint else None),
            "datasets": [*datasets, {"job_id": job_id, "training_file": training_file,
                                     "validation_file": validation_file or None,
                                     "method": method_type}],
        }


def _datasets_of(job: FineTuningJob) -> dict[str, Any]:
    return {"job_id": job.id, "training_file": job.training_file,
            "validation_file": job.validation_file or None, "method": job.method_type}


def is_fine_tuned_name(model: str) -> bool:
    return (model.startswith(("ft:", "adapter-", "ftckpt-"))
            or CHECKPOINT_NAME.match(model) is not None)


def _not_found(model: str) -> ApiError:
    return ApiError(f"No such model: {model!r}. Continue training from one of this "
                    "organization's adapters (GET /v1/adapters) or job checkpoints "
                    "(GET /v1/fine_tuning/jobs/{id}/checkpoints).",
                    code="model_not_found", param="model", status=404)


def parent_resolve(*, organization: Organization, model: str) -> Parent:
    """The organization's adapter or checkpoint that ``model`` names; 404 otherwise."""
    match = CHECKPOINT_NAME.match(model)
    if model.startswith("ftckpt-") or match:
        checkpoints = JobCheckpoint.objects.filter(job__organization=organization)
        if match:
            owner = match["owner"]
            owner_filter = ({"job__adapter__name": owner} if owner.startswith("ft:")
                            else {"job_id": owner})
            checkpoint = checkpoints.filter(step=int(match["step"]), **owner_filter).first()
        else:
            checkpoint = checkpoints.filter(id=model).first()
        if checkpoint is None:
            raise _not_found(model)
        job = FineTuningJob.objects.select_related("base_model").get(pk=checkpoint.job_id)
        return Parent(requested=model, job=job, checkpoint=checkpoint)
    adapters = Adapter.objects.filter(organization=organization).select_related(
        "job", "job__base_model")
    adapter = (adapters.filter(id=model) if model.startswith("adapter-")
               else adapters.filter(name=model)).first()
    if adapter is None:
        raise _not_found(model)
    return Parent(requested=model, job=adapter.job, adapter=adapter)


def inherit_settings(parent: Parent, requested: dict[str, Any]) -> dict[str, Any]:
    """The request's hyperparameters with the parent's LoRA shape filled in; a different value
    is a 400 naming the hyperparameter."""
    merged = dict(requested)
    for name, value in parent.settings().items():
        asked = requested.get(name)
        if asked is not None and asked != "auto" and _normal(asked) != _normal(value):
            raise ApiError(f"{name} must be the parent's ({value}) to continue training from "
                           f"{parent.requested}; leave it out to inherit it.",
                           code="invalid_hyperparameter", param=f"hyperparameters.{name}")
        merged[name] = value
    return merged


def _normal(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return sorted(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return value
