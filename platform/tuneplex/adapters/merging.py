"""Merge-and-export, run by a gpu worker: base + adapter → a merged safetensors model in storage."""

from __future__ import annotations

import logging
import shutil
import subprocess
import tempfile
from pathlib import Path

from django.conf import settings
from django.core.files import File as DjangoFile

from tuneplex.adapters.models import Adapter
from tuneplex.files.services import artifact_storage

log = logging.getLogger(__name__)
MERGE_TIMEOUT_SECONDS = 4 * 3600


def merged_prefix(adapter: Adapter) -> str:
    return f"{adapter.blob_prefix}/merged"


def run_merge(adapter_id: str) -> None:
    claimed = Adapter.objects.filter(id=adapter_id, merge_status=Adapter.MergeStatus.QUEUED
                                     ).update(merge_status=Adapter.MergeStatus.RUNNING)
    if not claimed:
        return
    adapter = Adapter.objects.select_related("base_model").get(id=adapter_id)
    storage = artifact_storage()
    work = Path(tempfile.mkdtemp(prefix=f"merge-{adapter.id}-", dir=settings.DATA_DIR))
    try:
        adapter_dir = work / "adapter"
        adapter_dir.mkdir()
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            with storage.open(f"{adapter.blob_prefix}/{name}", "rb") as source, \
                    (adapter_dir / name).open("wb") as target:
                shutil.copyfileobj(source, target, 4 * 2**20)
        result = subprocess.run(
            [str(settings.TRAINER_PYTHON), "-m", "jobs.training.merge", "--base",
             adapter.base_model.directory, "--adapter", str(adapter_dir), "--out", str(work / "merged")],
            cwd=settings.REPO_DIR, capture_output=True, text=True, timeout=MERGE_TIMEOUT_SECONDS,
            env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(work)})
        if result.returncode != 0:
            raise RuntimeError((result.stderr.strip().splitlines() or ["merge failed"])[-1])
        prefix = merged_prefix(adapter)
        for path in sorted((work / "merged").iterdir()):
            name = f"{prefix}/{path.name}"
            if storage.exists(name):
                storage.delete(name)
            with path.open("rb") as handle:
                storage.save(name, DjangoFile(handle))
        Adapter.objects.filter(id=adapter_id).update(merge_status=Adapter.MergeStatus.SUCCEEDED)
    except Exception as exc:  # noqa: BLE001 - recorded on the adapter for the user
        log.exception("merge of %s failed", adapter_id)
        Adapter.objects.filter(id=adapter_id).update(merge_status=Adapter.MergeStatus.FAILED,
                                                     merge_error=f"{exc}"[:1000])
    finally:
        shutil.rmtree(work, ignore_errors=True)
