"""GPU workers register themselves in the database, and the scheduler counts the GPUs of those
alive: another GPU worker adds GPU slots with no configuration edit and no restart."""

from __future__ import annotations

from datetime import timedelta
from unittest import mock

import pytest
from django.db.models.functions import Now
from tuneplex.core import queue
from tuneplex.finetuning import scheduler
from tuneplex.finetuning.models import FineTuningJob, GpuWorker
from tuneplex.finetuning.selectors import gpu_capacity
from tuneplex.finetuning.services.gpu_workers import (
    Member,
    gpu_worker_beat,
    gpu_worker_register,
    gpu_workers_sweep,
)
from tuneplex.finetuning.services.lifecycle import job_files_validated

from tests.conftest import make_tenant, wait_for
from tests.finetuning.conftest import create_job

pytestmark = pytest.mark.django_db
# The workers a test starts count their GPUs from membership too (deploy/test.sh fixes one slot
# for the rest of the suite), and beat every second.
MEMBERSHIP = {"TUNEPLEX_GPU_SLOTS": "", "TUNEPLEX_GPU_WORKER_HEARTBEAT_SECONDS": "1"}


@pytest.fixture
def from_membership(settings):
    settings.GPU_SLOTS = None  # unset: the slots are the registered workers' GPUs
    settings.GPU_WORKER_HEARTBEAT_SECONDS = 10
    GpuWorker.objects.all().delete()  # a worker an earlier test killed (undone after the test)
    return settings


def beat_ago(name: str, seconds: float) -> None:
    """As if the worker's last heartbeat was this long ago (the database's clock)."""
    GpuWorker.objects.filter(name=name).update(heartbeat_at=Now() - timedelta(seconds=seconds))


def test_a_registered_worker_adds_its_gpus_and_asks_for_a_dispatch(
        from_membership, django_capture_on_commit_callbacks):
    assert gpu_capacity() == 0
    with mock.patch.object(queue, "enqueue") as enqueue, \
            django_capture_on_commit_callbacks(execute=True):
        gpu_worker_register(member=Member(name="gpu0@node-a", node="node-a", gpus=2))
    enqueue.assert_called_once_with(queue.DISPATCH_JOBS)  # its GPUs may start waiting work
    assert gpu_capacity() == 2
    gpu_worker_register(member=Member(name="gpu0@node-b", node="node-b", gpus=1))
    assert gpu_capacity() == 3
    # Registering again (a worker whose row was swept) replaces its row, never counts twice.
    gpu_worker_register(member=Member(name="gpu0@node-b", node="node-b", gpus=1))
    assert gpu_capacity() == 3 and GpuWorker.objects.count() == 2


def test_explicit_gpu_slots_override_the_membership(from_membership):
    gpu_worker_register(member=Member(name="gpu0@node-a", node="node-a", gpus=2))
    assert gpu_capacity() == 2
    from_membership.GPU_SLOTS = 5
    assert gpu_capacity() == 5
    from_membership.GPU_SLOTS = 1
    assert gpu_capacity() == 1


def test_a_worker_that_stops_heartbeating_stops_counting_after_three_beats(from_membership):
    quiet = Member(name="gpu0@quiet", node="quiet", gpus=2)
    steady = Member(name="gpu0@steady", node="steady", gpus=1)
    gpu_worker_register(member=quiet)
    gpu_worker_register(member=steady)
    beat_ago(quiet.name, 25)  # two and a half beats of 10 s missed: still counted
    assert gpu_capacity() == 3
    assert gpu_workers_sweep() == [] and GpuWorker.objects.count() == 2
    beat_ago(quiet.name, 31)  # three missed
    assert gpu_capacity() == 1
    assert gpu_workers_sweep() == [quiet.name]
    assert list(GpuWorker.objects.values_list("name", flat=True)) == [steady.name]
    # It comes back (it was paused, or cut off from the database): its next beat registers it.
    gpu_worker_beat(member=quiet)
    assert gpu_capacity() == 3
    # Every live worker's beat sweeps its silent peers.
    beat_ago(quiet.name, 31)
    gpu_worker_beat(member=steady)
    assert list(GpuWorker.objects.values_list("name", flat=True)) == [steady.name]


def test_a_job_waits_while_no_gpu_worker_is_registered_and_is_refused_only_by_too_few_gpus(
        from_membership, org_a, default_model, pirate_file_of_a):
    from_membership.JOB_MAX_GPUS = 2
    # No worker yet (the fleet is starting): accepted, and its events say why it waits.
    waiting = create_job(org_a, model=default_model.name, training_file=pirate_file_of_a,
                         hyperparameters={"gpus": 2})
    assert waiting.status_code == 200, waiting.content
    job = job_files_validated(job_id=waiting.json()["id"])
    assert job.status == "queued"
    assert "No GPU worker is registered yet" in job.events.order_by("-created_at").first().message
    # Workers are registered and have fewer GPUs in all than the job asks for: refused.
    gpu_worker_register(member=Member(name="gpu0@node-a", node="node-a", gpus=1))
    refused = create_job(org_a, model=default_model.name, training_file=pirate_file_of_a,
                         hyperparameters={"gpus": 2})
    assert refused.status_code == 400
    error = refused.json()["error"]
    assert error["param"] == "hyperparameters.gpus" and "registered now have 1 GPU" in error["message"]
    # A job that fits is queued with the plain message.
    fits = create_job(org_a, model=default_model.name, training_file=pirate_file_of_a)
    assert fits.status_code == 200, fits.content
    job = job_files_validated(job_id=fits.json()["id"])
    assert job.events.order_by("-created_at").first().message == "Files validated; job queued."
    # The operator's number: refused against it, whatever is registered.
    from_membership.GPU_SLOTS = 1
    gpu_worker_register(member=Member(name="gpu0@node-b", node="node-b", gpus=4))
    refused = create_job(org_a, model=default_model.name, training_file=pirate_file_of_a,
                         hyperparameters={"gpus": 2})
    assert refused.status_code == 400 and "TUNEPLEX_GPU_SLOTS" in refused.json()["error"]["message"]


def queued_job(tenant, base_model, gpus: int) -> FineTuningJob:
    return FineTuningJob.objects.create(organization=tenant.organization, base_model=base_model,
                                        training_file="file-x", seed=1, status="queued", gpus=gpus)


def test_a_gpu_worker_started_later_adds_a_slot_that_the_scheduler_uses(
        from_membership, celery_worker, gpu_workers, default_model):
    """Real workers of the gpu queue. The jobs stay in this test's transaction, so no worker
    runs them: dispatch() (the scheduler's, as on any event or beat) shows what it sends."""
    from_membership.ORG_MAX_CONCURRENT_JOBS = 2
    assert not GpuWorker.objects.exists()  # the default worker (other queues) is no GPU worker
    tenant = make_tenant("Fleet")
    one_gpu, two_gpus = queued_job(tenant, default_model, 1), queued_job(tenant, default_model, 2)
    assert scheduler.dispatch() == []  # no GPU worker yet
    gpu_workers(extra_env=MEMBERSHIP)
    assert gpu_capacity() == 1  # it registered before it said it was ready
    assert scheduler.dispatch() == [one_gpu.id]
    assert scheduler.dispatch() == []  # the two-GPU job waits: one slot, taken
    row = GpuWorker.objects.get()
    assert row.gpus == 1 and row.name.startswith("gpu0-")
    wait_for(lambda: GpuWorker.objects.get(name=row.name).heartbeat_at > row.heartbeat_at,
             timeout=15, message="the first worker's heartbeat")

    second = gpu_workers(extra_env={**MEMBERSHIP, "CUDA_VISIBLE_DEVICES": "0,1"})
    assert gpu_capacity() == 3  # the GPUs it sees
    assert scheduler.dispatch() == [two_gpus.id]
    # A clean stop leaves at once, not after three beats.
    second.stop()
    assert gpu_capacity() == 1
    assert list(GpuWorker.objects.values_list("name", flat=True)) == [row.name]
