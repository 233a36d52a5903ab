"""Writes for adapters: store a finished job's adapter, queue a merge."""

from __future__ import annotations

import json
from pathlib import Path

from django.db import transaction
from django.utils import timezone

from jobs.training.layout import ADAPTER_ARTIFACT_FILES
from tuneplex.adapters.models import Adapter
from tuneplex.audit.services import audit_record
from tuneplex.core import queue
from tuneplex.core.actors import Principal
from tuneplex.core.errors import Conflict
from tuneplex.core.storage import upload_directory
from tuneplex.core.storage_layout import adapter_prefix
from tuneplex.files.selectors import storage_quota_check


def adapter_name(*, base_model: str, org_slug: str, suffix: str, job_id: str) -> str:
    """OpenAI's shape: ft:<base>:<org>:<suffix>:<id>. Generated, never chosen by a tenant."""
    return f"ft:{base_model}:{org_slug}:{suffix}:{job_id.removeprefix('ftjob-')}"


def adapter_prepare(*, job, adapter_dir: Path, sha256: str) -> Adapter:
    """Upload a finished job's adapter files to artifact storage; the returned Adapter is not
    saved yet (the caller saves it in the transaction that marks the job succeeded, and deletes
    ``blob_prefix`` if that does not commit)."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    adapter = Adapter(organization=job.organization, job=job, base_model=job.base_model,
                      name=adapter_name(base_model=job.base_model.name, org_slug=job.organization.slug,
                                        suffix=job.suffix, job_id=job.id),
                      sha256=sha256, rank=int(config["r"]), bytes=0,
                      parent_id=job.parent_adapter_id, lineage=job.lineage or {})
    adapter.blob_prefix = adapter_prefix(job.organization_id, adapter.id)
    adapter.bytes = upload_directory(adapter_dir, adapter.blob_prefix, ADAPTER_ARTIFACT_FILES)
    return adapter


def adapter_request_merge(*, organization, actor: Principal, adapter: Adapter) -> Adapter:
    storage_quota_check(organization, 0, what="a merged model", param=None)
    with transaction.atomic(durable=True):
        adapter = Adapter.objects.select_for_update().get(pk=adapter.pk, organization=organization)
        if adapter.merge_status in (Adapter.MergeStatus.QUEUED, Adapter.MergeStatus.RUNNING):
            raise Conflict("A merge of this adapter is already in progress.", code="merge_in_progress")
        adapter.merge_status = Adapter.MergeStatus.QUEUED
        adapter.merge_error = ""
        adapter.merge_dispatched_at = None
        adapter.merge_requested_at = timezone.now()
        adapter.save(update_fields=["merge_status", "merge_error", "merge_dispatched_at",
                                    "merge_requested_at"])
        audit_record(actor=actor, action="adapter.merge", obj=adapter)
        # GPU work: the scheduler sends it to the gpu queue when a slot is free.
        transaction.on_commit(lambda: queue.enqueue(queue.DISPATCH_JOBS))
    return adapter
