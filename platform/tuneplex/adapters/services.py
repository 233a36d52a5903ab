"""Writes for adapters: store a finished job's adapter, queue a merge."""

from __future__ import annotations

import json
from pathlib import Path

from django.core.files import File as DjangoFile
from django.db import transaction

from jobs.training.layout import ADAPTER_FILES
from tuneplex.adapters.models import Adapter
from tuneplex.audit.services import audit_record
from tuneplex.core.actors import Principal
from tuneplex.core.errors import Conflict
from tuneplex.files.services import artifact_storage


def adapter_name(*, base_model: str, org_slug: str, suffix: str, job_id: str) -> str:
    """OpenAI's shape: ft:<base>:<org>:<suffix>:<id>. Generated, never chosen by a tenant."""
    return f"ft:{base_model}:{org_slug}:{suffix}:{job_id.removeprefix('ftjob-')}"


def adapter_create_from_job(*, job, adapter_dir: Path, sha256: str) -> Adapter:
    """Copy adapter_config.json + adapter_model.safetensors into artifact storage; record them."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    adapter = Adapter(organization=job.organization, job=job, base_model=job.base_model,
                      name=adapter_name(base_model=job.base_model.name, org_slug=job.organization.slug,
                                        suffix=job.suffix, job_id=job.id),
                      sha256=sha256, rank=int(config["r"]), bytes=0)
    adapter.blob_prefix = f"orgs/{job.organization_id}/adapters/{adapter.id}"
    storage = artifact_storage()
    saved: list[str] = []
    try:
        for name in (*ADAPTER_FILES, "training_config.json"):
            source = adapter_dir / name
            if not source.exists():
                continue
            with source.open("rb") as handle:
                saved.append(storage.save(f"{adapter.blob_prefix}/{name}", DjangoFile(handle)))
            adapter.bytes += source.stat().st_size
        adapter.save(force_insert=True)
    except BaseException:
        for name in saved:
            storage.delete(name)
        raise
    return adapter


def adapter_request_merge(*, organization, actor: Principal, adapter: Adapter) -> Adapter:
    with transaction.atomic():
        adapter = Adapter.objects.select_for_update().get(pk=adapter.pk, organization=organization)
        if adapter.merge_status in (Adapter.MergeStatus.QUEUED, Adapter.MergeStatus.RUNNING):
            raise Conflict("A merge of this adapter is already in progress.", code="merge_in_progress")
        adapter.merge_status = Adapter.MergeStatus.QUEUED
        adapter.merge_error = ""
        adapter.save(update_fields=["merge_status", "merge_error"])
        audit_record(actor=actor, action="adapter.merge", obj=adapter)
        transaction.on_commit(lambda: _enqueue_merge(adapter.id))
    return adapter


def _enqueue_merge(adapter_id: str) -> None:
    from jobs.tasks import merge_adapter

    merge_adapter.delay(adapter_id)
