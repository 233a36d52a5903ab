"""An export on its worker, with a stand-in for the trainer's exporter (the same arguments and
protocol, tests/exports/stand_in_exporter.py): claimed once, its inputs staged, its progress in
the row (at most once a second), its artifact stored with its sha256 and counted in the quota;
a failed check, a crash, the quota, a deletion mid-run and a dead worker end it cleanly."""

from __future__ import annotations

import hashlib
import json
import time
from datetime import timedelta

import pytest
from django.db.models.functions import Now

from tests.exports.conftest import ADAPTER_CONFIG, MERGED, merged, stored_adapter
from tests.exports.stand_in_exporter import FIGURES
from tuneplex.adapters import merging
from tuneplex.adapters.models import Adapter
from tuneplex.core import queue
from tuneplex.core.storage import artifact_storage, list_prefix
from tuneplex.core.storage_layout import export_prefix
from tuneplex.exports import executor, services
from tuneplex.exports.executor import run_export
from tuneplex.exports.models import Export
from tuneplex.exports.worker_writes import exports_after_merge, exports_sweep
from tuneplex.files.selectors import storage_used

pytestmark = pytest.mark.django_db


def request(tenant, adapter, format: str, quantization: str | None = None) -> Export:
    export, created = services.export_create(organization=tenant.organization,
                                             actor=tenant.principal(), adapter=adapter,
                                             format=format, quantization=quantization)
    assert created
    return export


def stored(export: Export) -> list[str]:
    return list_prefix(export_prefix(export.organization_id, export.id))


@pytest.fixture
def progress_written(monkeypatch) -> list[tuple[float, str]]:
    """Every progress write the worker makes (fraction, message), made as it makes them."""
    written: list[tuple[float, str]] = []
    real = executor.export_progress

    def export_progress(*, export_id, fraction, message):
        written.append((round(fraction, 4), message))
        return real(export_id=export_id, fraction=fraction, message=message)
    monkeypatch.setattr(executor, "export_progress", export_progress)
    return written


def test_an_export_runs_once_and_its_artifact_is_stored_downloaded_and_counted(
        org_a, adapter_of_a, sent, stand_in, django_capture_on_commit_callbacks):
    stand_in("ok")
    merged(adapter_of_a)
    export = request(org_a, adapter_of_a, "safetensors")
    used = storage_used(organization=org_a.organization)
    assert run_export(export.id) == "succeeded"
    export.refresh_from_db()
    assert (export.status, export.progress, export.error) == ("succeeded", 1.0, "")
    assert export.check_result == {"passed": True, "kind": "stand-in", "figure": 1}
    assert export.filename == f"{adapter_of_a.id}-safetensors.tar" and export.finished_at
    assert stored(export) == [export.blob_name]
    with artifact_storage().open(export.blob_name) as handle:
        data = handle.read()
    assert len(data) == export.bytes and hashlib.sha256(data).hexdigest() == export.sha256
    # What the exporter was given: the base model, the adapter's files, the merged model.
    seen = json.loads(data)
    argv = dict(zip(seen["argv"][::2], seen["argv"][1::2]))
    assert argv["--format"] == "safetensors" and "--quantization" not in argv
    assert argv["--base"] == "/models/exports-model"
    assert argv["--name"] == f"{adapter_of_a.id}-safetensors"
    assert seen["adapter"] == {"adapter_config.json": len(ADAPTER_CONFIG),
                               "adapter_model.safetensors": 1000}
    assert seen["merged"] == {name: len(data) for name, data in MERGED.items()}
    assert storage_used(organization=org_a.organization) == used + export.bytes
    # A redelivered message changes nothing: the claim is fenced.
    assert run_export(export.id) == "not claimed"
    assert Export.objects.get(id=export.id).sha256 == export.sha256
    # Deleted: the artifact is gone and the quota has its bytes back.
    with django_capture_on_commit_callbacks(execute=True):
        services.export_delete(organization=org_a.organization, actor=org_a.principal(),
                               export=export)
    assert not artifact_storage().exists(export.blob_name)
    assert storage_used(organization=org_a.organization) == used


def test_a_format_of_the_adapter_gets_the_adapter_and_no_merged_model(org_a, adapter_of_a, sent,
                                                                      stand_in):
    stand_in("ok")
    export = request(org_a, adapter_of_a, "gguf-lora")
    assert run_export(export.id) == "succeeded"
    export.refresh_from_db()
    with artifact_storage().open(export.blob_name) as handle:
        seen = json.loads(handle.read())
    argv = dict(zip(seen["argv"][::2], seen["argv"][1::2]))
    assert argv["--quantization"] == "f16" and "--merged" not in argv
    assert seen["merged"] is None and set(seen["adapter"]) == {"adapter_config.json",
                                                                "adapter_model.safetensors"}


def test_an_export_waiting_for_its_merge_is_not_claimed(org_a, adapter_of_a, sent, stand_in):
    stand_in("ok")
    export = request(org_a, adapter_of_a, "gguf", "q8_0")
    assert Adapter.objects.get(pk=adapter_of_a.pk).merge_status == "queued"
    assert run_export(export.id) == "not claimed"  # a message sent too early
    assert Export.objects.get(id=export.id).status == "queued"
    merged(adapter_of_a)
    assert run_export(export.id) == "succeeded"


def test_progress_lands_in_the_row_step_by_step(org_a, adapter_of_a, sent, stand_in,
                                                 progress_written, monkeypatch):
    monkeypatch.setattr(executor, "PROGRESS_SECONDS", 0)
    stand_in("ok")
    merged(adapter_of_a)
    export = request(org_a, adapter_of_a, "onnx", "int8")
    assert run_export(export.id) == "succeeded"
    messages = [message for _, message in progress_written]
    assert messages[:2] == ["Fetching the adapter", "Fetching the merged model"]
    # The exporter's own line, placed in the conversion's share of the whole (0.05 to 0.9).
    assert (round(0.05 + 0.85 * 0.5, 4), "halfway") in progress_written
    assert messages[-1] == "Storing the export"
    fractions = [fraction for fraction, _ in progress_written]
    assert fractions == sorted(fractions) and fractions[-1] <= 1.0


def test_progress_is_written_at_most_about_once_a_second(org_a, adapter_of_a, sent, stand_in,
                                                          progress_written):
    stand_in("burst")  # 501 progress lines at once
    merged(adapter_of_a)
    export = request(org_a, adapter_of_a, "safetensors")
    started = time.monotonic()
    assert run_export(export.id) == "succeeded"
    elapsed = time.monotonic() - started
    forced = 3  # each step's first write: fetching, converting, storing
    assert len(progress_written) <= forced + elapsed / executor.PROGRESS_SECONDS + 1, (
        len(progress_written), elapsed)


def test_a_failed_check_fails_the_export_and_keeps_its_figures(org_a, adapter_of_a, sent,
                                                                stand_in):
    stand_in("check_failed")
    merged(adapter_of_a)
    export = request(org_a, adapter_of_a, "gguf", "q4_0")
    assert run_export(export.id) == "failed"
    export.refresh_from_db()
    assert export.status == "failed"
    assert export.error == "check_failed: logits differ by 0.31 (> 0.05)"
    assert export.check_result == FIGURES and export.bytes == 0 and stored(export) == []
    assert export.finished_at is not None


def test_a_crash_fails_the_export_with_its_last_words(org_a, adapter_of_a, sent, stand_in):
    stand_in("crash")
    export = request(org_a, adapter_of_a, "gguf-lora")
    assert run_export(export.id) == "failed"
    export.refresh_from_db()
    assert export.error == "export_error: RuntimeError: the converter broke"
    assert export.check_result is None


def test_an_artifact_named_outside_the_output_folder_is_refused(org_a, adapter_of_a, sent,
                                                                 stand_in):
    stand_in("stray")
    export = request(org_a, adapter_of_a, "gguf-lora")
    assert run_export(export.id) == "failed"
    export.refresh_from_db()
    assert export.error == "export_error: the exporter named no artifact in its output folder."
    assert stored(export) == []


@pytest.mark.parametrize("checked_before_upload", [True, False])
def test_an_artifact_the_quota_has_no_room_for_fails_and_leaves_nothing(
        org_a, adapter_of_a, sent, stand_in, monkeypatch, checked_before_upload):
    stand_in("ok")
    export = request(org_a, adapter_of_a, "gguf-lora")
    org_a.organization.storage_quota_bytes = storage_used(organization=org_a.organization) + 10
    org_a.organization.save()
    if not checked_before_upload:  # the last word: under the organization's lock
        monkeypatch.setattr(executor, "storage_quota_check", lambda *a, **kw: None)
    assert run_export(export.id) in ("failed", "not recorded")
    export.refresh_from_db()
    assert export.status == "failed" and export.error.startswith("storage_quota_exceeded: ")
    assert stored(export) == [] and export.bytes == 0


def test_an_export_deleted_while_it_runs_stops_and_leaves_nothing(org_a, adapter_of_a, sent,
                                                                  stand_in, monkeypatch):
    monkeypatch.setattr(executor, "PROGRESS_SECONDS", 0)
    stand_in("ok")
    export = request(org_a, adapter_of_a, "gguf-lora")
    real = executor.export_progress

    storing: list[float] = []

    def export_progress(*, export_id, fraction, message):
        if message == "Storing the export":
            storing.append(fraction)
            if len(storing) == 2:  # its artifact half written: its owner deletes it now
                Export.objects.filter(id=export_id).delete()
        return real(export_id=export_id, fraction=fraction, message=message)
    monkeypatch.setattr(executor, "export_progress", export_progress)
    assert run_export(export.id) == "abandoned"
    assert len(storing) == 2 and stored(export) == []  # the scratch of the upload too


def test_the_sweep_fails_an_export_whose_worker_died_and_resends_lost_ones(
        org_a, adapter_of_a, sent, settings, base_model, tmp_path):
    settings.EXPORT_DEADLINE_SECONDS = 600
    dead = request(org_a, adapter_of_a, "gguf-lora")
    Export.objects.filter(id=dead.id).update(status="running", started_at=Now())
    assert exports_sweep()["exports_failed"] == []  # within its deadline
    Export.objects.filter(id=dead.id).update(started_at=Now() - timedelta(seconds=661))
    assert exports_sweep()["exports_failed"] == [dead.id]
    dead.refresh_from_db()
    assert dead.status == "failed" and dead.error.startswith("export_stalled: ")
    # A queued export whose message was never sent is sent; one waiting for a merge is not.
    waiting_adapter = stored_adapter(org_a, base_model, tmp_path)
    waiting = request(org_a, waiting_adapter, "onnx")
    lost = request(org_a, adapter_of_a, "gguf-lora")
    sent.clear()
    assert exports_sweep()["exports_sent"] == [lost.id]
    assert sent == [(queue.EXPORT_RUN, lost.id)]
    assert Export.objects.get(id=waiting.id).status == "queued"
    assert exports_sweep()["exports_sent"] == []  # sent a moment ago: not again yet


@pytest.mark.parametrize("merge_works", [True, False])
def test_a_merge_that_ends_tells_its_exports(org_a, adapter_of_a, sent, monkeypatch, merge_works):
    def merge(adapter, work):
        if not merge_works:
            raise RuntimeError("out of memory")
        return 123
    monkeypatch.setattr(merging, "_merge", merge)
    export = request(org_a, adapter_of_a, "gguf", "q8_0")
    Adapter.objects.filter(pk=adapter_of_a.pk).update(merge_dispatched_at=Now())
    sent.clear()
    merging.run_merge(adapter_of_a.id)
    assert (queue.EXPORTS_AFTER_MERGE, adapter_of_a.id) in sent
    exports_after_merge(adapter_of_a.id)  # what that message runs
    export.refresh_from_db()
    if merge_works:
        assert export.status == "queued" and (queue.EXPORT_RUN, export.id) in sent
    else:
        assert export.status == "failed"
        assert export.error == "merge_failed: The merge failed: out of memory"
