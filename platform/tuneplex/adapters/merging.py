"""Merge-and-export, run by a gpu worker: base + adapter → a merged safetensors model in storage.

A merge is GPU work: ``adapter_request_merge`` marks it queued and the scheduler dispatches it into
a free GPU slot like a job (``tuneplex.finetuning.scheduler``); the sweep fails a merge that has
been running past TUNEPLEX_MERGE_DEADLINE_SECONDS (its worker died).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from pathlib import Path

from django.conf import settings
from django.db.models.functions import Now

from jobs.training.layout import ADAPTER_FILES
from tuneplex.adapters.models import Adapter
from tuneplex.core import metrics, queue
from tuneplex.core.storage import delete_prefix, download_directory, upload_directory
from tuneplex.core.storage_layout import merged_prefix
from tuneplex.core.redact import client_message
from tuneplex.core.trainer_env import last_error_line, run_trainer_module

log = logging.getLogger(__name__)
Merge = Adapter.MergeStatus


def merge_claim(adapter_id: str) -> Adapter | None:
    """queued (and dispatched) → running, exactly once: a redelivered message gets None."""
    claimed = Adapter.objects.filter(id=adapter_id, merge_status=Merge.QUEUED,
                                     merge_dispatched_at__isnull=False
                                     ).update(merge_status=Merge.RUNNING, merge_started_at=Now())
    return Adapter.objects.select_related("base_model").get(id=adapter_id) if claimed else None


def run_merge(adapter_id: str) -> None:
    adapter = merge_claim(adapter_id)
    if adapter is None:
        log.info("merge of %s not claimable (already taken or not queued)", adapter_id)
        return
    work = Path(tempfile.mkdtemp(prefix=f"merge-{adapter.id}-", dir=settings.DATA_DIR))
    size = 0
    started = time.monotonic()
    status, error = Merge.FAILED, "The merge failed."
    metrics.GPU_WORK.inc()
    try:
        size = _merge(adapter, work)
        status, error = Merge.SUCCEEDED, ""
    except Exception as exc:  # noqa: BLE001 - recorded on the adapter for the user
        log.exception("merge of %s failed", adapter_id)
        status, error = Merge.FAILED, f"The merge failed: {client_message(str(exc))}"
    finally:
        shutil.rmtree(work, ignore_errors=True)
        metrics.GPU_WORK.dec()
        metrics.MERGE_DURATION.labels(str(status)).observe(time.monotonic() - started)
    Adapter.objects.filter(id=adapter_id, merge_status=Merge.RUNNING).update(
        merge_status=status, merge_error=error, merged_bytes=size)
    queue.enqueue(queue.DISPATCH_JOBS)  # its GPU slot is free again
    queue.enqueue(queue.EXPORTS_AFTER_MERGE, adapter_id)  # exports that waited for it


def _merge(adapter: Adapter, work: Path) -> int:
    """Merge and upload; returns the bytes stored."""
    adapter_dir = work / "adapter"
    adapter_dir.mkdir()
    download_directory(adapter.blob_prefix, ADAPTER_FILES, adapter_dir)
    result = run_trainer_module("jobs.training.merge", "--base", adapter.base_model.directory,
                                "--adapter", str(adapter_dir), "--out", str(work / "merged"),
                                timeout=settings.MERGE_DEADLINE_SECONDS, home=work)
    if result.returncode != 0:
        raise RuntimeError(last_error_line(result))
    prefix = merged_prefix(adapter.blob_prefix)
    delete_prefix(prefix)
    merged = work / "merged"
    return upload_directory(merged, prefix,
                            sorted(p.name for p in merged.iterdir() if p.is_file()))
