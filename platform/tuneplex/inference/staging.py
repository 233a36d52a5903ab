"""Adapters staged for the engine: copied out of artifact storage, checksummed and validated.

The engine reads adapters from TUNEPLEX_SERVING_DIR/adapters/<adapter id>/, a directory the
platform fills from artifact storage (local or S3) with exactly the two adapter files, after
checking their SHA-256 against the one recorded when the job finished. Nothing a tenant names
ever becomes a path: the directory name is the adapter's generated id.

Staging only reads, through the ``serving`` storage: on an engine node, the pool agent's own
read-only credentials (TUNEPLEX_AGENT_S3_*), elsewhere the platform's.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from django.conf import settings
from django.core.files.storage import storages

from jobs.training.layout import ADAPTER_FILES, sha256_of, staged_directory
from serving.adapters import AdapterInfo, AdapterInvalid, validate_adapter
from tuneplex.core.storage import CHUNK, open_stream


def serving_root() -> Path:
    return settings.SERVING_DIR / "adapters"


def staged_path(adapter_id: str) -> Path:
    return serving_root() / adapter_id


def stage_adapter(adapter) -> tuple[Path, AdapterInfo]:
    """The adapter's directory for the engine, staged once and validated every time."""
    from tuneplex.inference.pools import base_shapes

    target = staged_path(adapter.id)
    if not (target / "adapter_model.safetensors").is_file():
        storage = storages["serving"]
        with staged_directory(target) as staging:  # renamed into place only when complete
            for name in ADAPTER_FILES:
                if not storage.exists(f"{adapter.blob_prefix}/{name}"):
                    raise AdapterInvalid(f"The adapter's {name} is missing from artifact storage.",
                                         code="adapter_incomplete")
            for name in ADAPTER_FILES:
                with open_stream(f"{adapter.blob_prefix}/{name}", storage) as source, \
                        (staging / name).open("wb") as copy:
                    shutil.copyfileobj(source, copy, CHUNK)
            if sha256_of(staging) != adapter.sha256:
                raise AdapterInvalid("The adapter's files do not match the checksum recorded when "
                                     "its job finished.", code="adapter_checksum_mismatch")
    try:
        info = validate_adapter(target, root=serving_root(), max_rank=settings.ENGINE_MAX_LORA_RANK,
                                base_shapes=base_shapes(adapter.base_model.directory))
    except AdapterInvalid:
        unstage_adapter(adapter.id)
        raise
    return target, info


def unstage_adapter(adapter_id: str) -> None:
    shutil.rmtree(staged_path(adapter_id), ignore_errors=True)


def ensure_staged(adapter) -> Path:
    """The staged directory, staging it here if this machine does not have it yet (a deployed
    adapter staged by a worker on another machine)."""
    path = staged_path(adapter.id)
    if (path / "adapter_model.safetensors").is_file():
        return path
    return stage_adapter(adapter)[0]
