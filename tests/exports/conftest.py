from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import pytest

from tests.fixtures.adapter_rows import adapter_from_dir
from tuneplex.adapters.models import Adapter
from tuneplex.core import queue
from tuneplex.core.storage import artifact_storage
from tuneplex.core.storage_layout import merged_prefix
from tuneplex.exports.executor import ExportRun

ADAPTER_CONFIG = json.dumps({"r": 8, "lora_alpha": 16})
MERGED = {"config.json": b'{"model_type": "llama"}', "model.safetensors": b"\0" * 4096,
          "tokenizer.json": b"{}"}


@pytest.fixture
def base_model(db):
    from tuneplex.basemodels.models import BaseModel

    return BaseModel.objects.get_or_create(name="exports-model", defaults=dict(
        directory="/models/exports-model", parameter_count=1, max_sequence_length=16,
        has_chat_template=True))[0]


def stored_adapter(tenant, base_model, tmp_path: Path) -> Adapter:
    """An adapter row with its files in artifact storage (stand-in weights)."""
    folder = Path(tempfile.mkdtemp(prefix="adapter-", dir=tmp_path))
    (folder / "adapter_config.json").write_text(ADAPTER_CONFIG)
    (folder / "adapter_model.safetensors").write_bytes(b"\1" * 1000)
    return adapter_from_dir(tenant.organization, folder, suffix="x", base_model=base_model)


def merged(adapter: Adapter) -> Adapter:
    """The adapter with a merged model in storage, as a succeeded merge leaves it."""
    from django.core.files.base import ContentFile

    for name, data in MERGED.items():
        artifact_storage().save(f"{merged_prefix(adapter.blob_prefix)}/{name}", ContentFile(data))
    Adapter.objects.filter(pk=adapter.pk).update(merge_status=Adapter.MergeStatus.SUCCEEDED,
                                                 merged_bytes=sum(map(len, MERGED.values())))
    adapter.refresh_from_db()
    return adapter


@pytest.fixture
def adapter_of_a(org_a, base_model, tmp_path) -> Adapter:
    return stored_adapter(org_a, base_model, tmp_path)


@pytest.fixture
def sent(monkeypatch) -> list[tuple]:
    """The Celery messages the platform sends (task name and arguments), instead of sending."""
    messages: list[tuple] = []
    monkeypatch.setattr(queue, "enqueue", lambda name, *args: messages.append((name, *args)))
    return messages


@pytest.fixture
def stand_in(monkeypatch):
    """Run tests/exports/stand_in_exporter.py instead of the trainer's ``python -m jobs.export``
    (the same arguments): ``stand_in("ok")`` and so on."""

    def use(behaviour: str) -> None:
        real = ExportRun.command

        def command(self, adapter_dir, merged_dir, out):
            arguments = real(self, adapter_dir, merged_dir, out)
            assert arguments[1:3] == ["-m", "jobs.export"], arguments
            return [sys.executable, "-m", "tests.exports.stand_in_exporter", behaviour,
                    *arguments[3:]]
        monkeypatch.setattr(ExportRun, "command", command)
    return use
