"""Services that act after their commit (enqueue, dispatch, delete files) open a durable
transaction: inside another transaction they refuse to run, and change nothing."""

from __future__ import annotations

from unittest import mock

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.db import transaction

from tests.conftest import make_tenant
from tests.fixtures.datasets import lines_to_bytes, pirate_lines
from tuneplex.adapters.services import adapter_request_merge
from tuneplex.core import queue
from tuneplex.files.models import File
from tuneplex.files.services import file_create, file_delete
from tuneplex.finetuning import scheduler
from tuneplex.finetuning.models import FineTuningJob
from tuneplex.finetuning.services.lifecycle import (
    job_cancel,
    job_create,
    job_fail,
    job_mark_cancelled,
    job_requeue,
)
from tuneplex.finetuning.services.worker_writes import job_record_checkpoint, job_succeed

# No test-wide transaction: each service's own transaction commits (or refuses) for real.
pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def world(default_model, tmp_path):
    tenant = make_tenant("Durable")
    queued = FineTuningJob.objects.create(organization=tenant.organization,
                                          base_model=default_model, training_file="file-x",
                                          seed=1, status="queued")
    running = FineTuningJob.objects.create(organization=tenant.organization,
                                           base_model=default_model, training_file="file-x",
                                           seed=1, status="running", attempts=1)
    content = lines_to_bytes(pirate_lines(12))
    with mock.patch.object(queue, "enqueue"):
        file = file_create(organization=tenant.organization, actor=tenant.principal(),
                           upload=SimpleUploadedFile("d.jsonl", content), purpose="fine-tune",
                           filename="d.jsonl")
    return tenant, queued, running, file, tmp_path


def calls(world):
    tenant, queued, running, file, tmp_path = world
    actor = tenant.principal()
    return {
        "job_create": lambda: job_create(organization=tenant.organization, actor=actor,
                                         model="SmolLM2-135M-Instruct", training_file=file.id),
        "job_cancel": lambda: job_cancel(organization=tenant.organization, actor=actor, job=queued),
        "job_fail": lambda: job_fail(job=queued, code="x", message="failed"),
        "job_mark_cancelled": lambda: job_mark_cancelled(job=queued),
        "job_requeue": lambda: job_requeue(job=running, attempt=1, reason="lost."),
        "job_record_checkpoint": lambda: job_record_checkpoint(
            job=running, attempt=1, step=1, blob_prefix="", metrics={}),
        "dispatch": scheduler.dispatch,
        "file_delete": lambda: file_delete(organization=tenant.organization, actor=actor,
                                           file=file),
    }


def snapshot(world) -> tuple:
    _, queued, running, file, _ = world
    return (FineTuningJob.objects.count(), tuple(FineTuningJob.objects.filter(id__in=[queued.id, running.id]).order_by("id")
                  .values_list("status", "dispatched_at", "checkpoints__step")),
            File.objects.filter(id=file.id).exists())


@pytest.mark.parametrize("name", ["job_create", "job_cancel", "job_fail", "job_mark_cancelled", "job_requeue",
                                  "job_record_checkpoint", "dispatch", "file_delete"])
def test_inside_another_transaction_it_refuses_and_changes_nothing(world, name):
    before = snapshot(world)
    with mock.patch.object(queue, "enqueue") as enqueue:
        with pytest.raises(RuntimeError, match="durable"), transaction.atomic():
            calls(world)[name]()
    assert snapshot(world) == before
    enqueue.assert_not_called()


@pytest.mark.parametrize("name", ["job_create", "job_cancel", "job_fail", "job_mark_cancelled", "job_requeue",
                                  "job_record_checkpoint", "dispatch", "file_delete"])
def test_on_its_own_it_commits(world, name, settings):
    # The positive control: the same call, outside a transaction, does its work.
    settings.GPU_SLOTS, settings.ORG_MAX_CONCURRENT_JOBS = 4, 4  # room for the queued job
    before = snapshot(world)
    with mock.patch.object(queue, "enqueue"):
        calls(world)[name]()
    if name == "dispatch":  # the queued job is sent to the gpu queue
        assert FineTuningJob.objects.get(id=world[1].id).dispatched_at is not None
    else:
        assert snapshot(world) != before


def test_a_merge_request_and_a_success_refuse_to_nest_too(world):
    tenant, _, running, _, tmp_path = world
    with pytest.raises(RuntimeError, match="durable"), transaction.atomic():
        adapter_request_merge(organization=tenant.organization, actor=tenant.principal(),
                              adapter=mock.Mock(pk="adapter-none"))
    with mock.patch("tuneplex.finetuning.services.worker_writes.adapter_prepare") as prepare, \
            mock.patch("tuneplex.finetuning.services.worker_writes.delete_prefix"):
        prepare.return_value = mock.Mock(blob_prefix="p", name="ft:x")
        with pytest.raises(RuntimeError, match="durable"), transaction.atomic():
            job_succeed(job=running, attempt=1, adapter_dir=tmp_path, result={"sha256": "0"})
    running.refresh_from_db()
    assert running.status == "running"
