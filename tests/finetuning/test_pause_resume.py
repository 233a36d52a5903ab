"""Pause and resume (OpenAI's client.fine_tuning.jobs.pause / .resume) and the metadata filter
of jobs.list, without training: the API through the official SDK, the lifecycle's races (a
worker lost while pausing, a cancel meeting a pause, a pause asked while the files are checked),
what a paused job counts against, and the runner with a stand-in trainer that speaks the
protocol. A real job paused mid-training is in test_pause_e2e.py."""

from __future__ import annotations

import sys
import threading
from datetime import timedelta

import openai
import pytest
from django.utils import timezone
from tuneplex.core.storage import list_prefix
from tuneplex.finetuning import runner, scheduler
from tuneplex.finetuning.models import FineTuningJob
from tuneplex.finetuning.services.lifecycle import (
    job_cancel,
    job_files_validated,
    job_mark_paused,
    job_pause,
    job_resume,
)

from jobs.training import protocol
from tests.conftest import bearer, key_for, wait_for
from tests.finetuning.conftest import create_job
from tests.fixtures.datasets import lines_to_bytes, pirate_lines

MODEL = "SmolLM2-135M-Instruct"


def queued_job(tenant, base_model, **fields) -> FineTuningJob:
    fields.setdefault("status", "queued")
    return FineTuningJob.objects.create(organization=tenant.organization, base_model=base_model,
                                        training_file="file-x", seed=1, **fields)


def running_job(tenant, base_model, worker: str = "w1") -> FineTuningJob:
    job = queued_job(tenant, base_model, dispatched_at=timezone.now())
    return scheduler.claim(job_id=job.id, worker=worker)


def state(job: FineTuningJob) -> FineTuningJob:
    return FineTuningJob.objects.get(pk=job.pk)


def messages(job: FineTuningJob) -> list[str]:
    return list(job.events.order_by("created_at", "id").values_list("message", flat=True))


# --- the API, through the official SDK ---------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_a_queued_job_pauses_at_once_and_resumes_into_the_queue_through_the_sdk(
        live_server, org_a, org_b, default_model):
    client = openai.OpenAI(base_url=f"{live_server.url}/v1", api_key=org_a.owner_key, max_retries=0)
    data = client.files.create(file=("train.jsonl", lines_to_bytes(pirate_lines(12))),
                               purpose="fine-tune")
    job = client.fine_tuning.jobs.create(model=MODEL, training_file=data.id)
    job_files_validated(job_id=job.id)  # what the default worker's task does
    assert client.fine_tuning.jobs.retrieve(job.id).status == "queued"

    paused = client.fine_tuning.jobs.pause(job.id)
    assert paused.status == "paused" and paused.id == job.id
    assert job.id not in scheduler.dispatch()  # out of the queue
    assert client.fine_tuning.jobs.pause(job.id).status == "paused"  # asked again: no change
    events = [e.message for e in client.fine_tuning.jobs.list_events(job.id)]
    assert sum(m.startswith("Job paused.") for m in events) == 1
    assert "No checkpoint was saved yet: resuming starts from the beginning." in events[0]

    # Another organization's job does not exist for them.
    theirs = openai.OpenAI(base_url=f"{live_server.url}/v1", api_key=org_b.owner_key,
                           max_retries=0)
    for call in (theirs.fine_tuning.jobs.pause, theirs.fine_tuning.jobs.resume):
        with pytest.raises(openai.NotFoundError):
            call(job.id)
    assert client.fine_tuning.jobs.retrieve(job.id).status == "paused"

    resumed = client.fine_tuning.jobs.resume(job.id)
    assert resumed.status == "queued"
    assert client.fine_tuning.jobs.list_events(job.id).data[0].message.startswith("Job resumed")
    with pytest.raises(openai.ConflictError) as raised:
        client.fine_tuning.jobs.resume(job.id)
    assert raised.value.body["code"] == "job_not_paused"
    assert "this one is queued" in raised.value.body["message"]

    assert client.fine_tuning.jobs.cancel(job.id).status == "cancelled"
    with pytest.raises(openai.ConflictError) as raised:
        client.fine_tuning.jobs.pause(job.id)
    assert raised.value.body["code"] == "job_finished"
    with pytest.raises(openai.ConflictError) as raised:
        client.fine_tuning.jobs.resume(job.id)
    assert raised.value.body["code"] == "job_not_paused"


@pytest.mark.django_db(transaction=True)
def test_jobs_are_listed_by_their_metadata_through_the_sdk(live_server, org_a, org_b,
                                                            default_model):
    made = {name: queued_job(org_a, default_model, metadata=metadata) for name, metadata in [
        ("a1", {"team": "a", "run": "1"}), ("a2", {"team": "a", "run": "2", "a__b": "x"}),
        ("b", {"team": "b", "run": ""}), ("none", None)]}
    queued_job(org_b, default_model, metadata={"team": "a", "run": "1"})
    client = openai.OpenAI(base_url=f"{live_server.url}/v1", api_key=org_a.owner_key, max_retries=0)

    def listed(**query) -> set[str]:
        found = {job.id for job in client.fine_tuning.jobs.list(**query)}
        assert found <= {job.id for job in made.values()}  # never another organization's
        return {name for name, job in made.items() if job.id in found}

    assert listed() == {"a1", "a2", "b", "none"}
    assert listed(metadata={"team": "a"}) == {"a1", "a2"}  # the positive control
    assert listed(metadata={"team": "a", "run": "2"}) == {"a2"}  # every pair must match
    assert listed(metadata={"team": "a", "run": "3"}) == set()
    assert listed(metadata={"run": ""}) == {"b"}  # an empty value, not a missing key
    assert listed(metadata={"a__b": "x"}) == {"a2"}  # a key is taken literally
    assert listed(metadata={"team": "c"}) == set()
    assert listed(extra_query={"metadata": "null"}) == {"none"}
    page = client.fine_tuning.jobs.list(metadata={"team": "a"}, limit=1)
    assert len(page.data) == 1 and page.has_more


@pytest.mark.django_db
@pytest.mark.parametrize("query,param", [
    ("metadata=x", "metadata"),
    ("metadata=null&metadata[team]=a", "metadata"),
    ("metadata[team]=a&metadata[team]=b", "metadata[team]"),
    ("metadata[]=a", "metadata[]"),
    ("metadata[team=a", "metadata[team"),
    ("metadatateam=a", "metadatateam"),
    (f"metadata[{'k' * 65}]=a", f"metadata[{'k' * 65}]"),
    (f"metadata[team]={'v' * 513}", "metadata[team]"),
    ("&".join(f"metadata[k{i}]=v" for i in range(17)), "metadata"),
])
def test_a_malformed_metadata_filter_is_a_400_naming_it(org_a, query, param):
    response = bearer(org_a.owner_key).get(f"/v1/fine_tuning/jobs?{query}")
    assert response.status_code == 400, response.content
    assert response.json()["error"]["code"] == "invalid_metadata_filter"
    assert response.json()["error"]["param"] == param


@pytest.mark.django_db
def test_a_viewer_cannot_pause_or_resume(org_a, viewer_of_a, default_model):
    job = queued_job(org_a, default_model)
    key = key_for(org_a, viewer_of_a, ["read"])
    assert bearer(key).post(f"/v1/fine_tuning/jobs/{job.id}/pause").status_code == 403
    assert state(job).status == "queued"
    assert bearer(org_a.owner_key).post(f"/v1/fine_tuning/jobs/{job.id}/pause").status_code == 200
    assert bearer(key).post(f"/v1/fine_tuning/jobs/{job.id}/resume").status_code == 403
    assert state(job).status == "paused"


# --- the lifecycle ---------------------------------------------------------------------------


@pytest.mark.django_db
def test_a_paused_job_frees_its_slot_and_counts_against_no_concurrency(
        org_a, default_model, settings, django_capture_on_commit_callbacks):
    settings.GPU_SLOTS, settings.ORG_MAX_CONCURRENT_JOBS = 2, 1
    first = running_job(org_a, default_model)
    second = queued_job(org_a, default_model)
    with django_capture_on_commit_callbacks(execute=False):
        assert scheduler.dispatch() == []  # the organization runs its one job
        job_pause(organization=org_a.organization, actor=org_a.principal(), job=first)
        api = bearer(org_a.owner_key).get(f"/v1/fine_tuning/jobs/{first.id}").json()
        assert api["status"] == "pausing" and state(first).status == "running"
        assert scheduler.dispatch() == []  # still holds its GPU until the trainer stopped
        assert job_mark_paused(job=first, attempt=1)
        assert state(first).status == "paused" and scheduler.gpu_slots_in_use() == 0
        assert scheduler.dispatch() == [second.id]
        job_resume(organization=org_a.organization, actor=org_a.principal(), job=first)
        assert state(first).status == "queued"
        assert scheduler.dispatch() == []  # back under the organization's limit: it waits
        FineTuningJob.objects.filter(pk=second.pk).update(status="succeeded")
        assert scheduler.dispatch() == [first.id]
    assert scheduler.claim(job_id=first.id, worker="w2").attempts == 2
    # A pause is no lost worker: the count of attempts starts again.
    assert messages(first)[-1] == f"Running (attempt 1 of {settings.JOB_MAX_ATTEMPTS})."


@pytest.mark.django_db
def test_resuming_takes_a_place_in_the_organizations_queue(org_a, default_model, settings,
                                                           django_capture_on_commit_callbacks):
    settings.ORG_MAX_QUEUED_JOBS = 1
    job = queued_job(org_a, default_model)
    with django_capture_on_commit_callbacks(execute=False):
        job_pause(organization=org_a.organization, actor=org_a.principal(), job=job)
    other = queued_job(org_a, default_model)  # the place the paused job left
    refused = bearer(org_a.owner_key).post(f"/v1/fine_tuning/jobs/{job.id}/resume")
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "too_many_queued_jobs"
    assert state(job).status == "paused"
    FineTuningJob.objects.filter(pk=other.pk).update(status="running")
    with django_capture_on_commit_callbacks(execute=False):
        assert bearer(org_a.owner_key).post(
            f"/v1/fine_tuning/jobs/{job.id}/resume").json()["status"] == "queued"


@pytest.mark.django_db
def test_a_worker_lost_while_pausing_leaves_the_job_paused(org_a, default_model, settings,
                                                           django_capture_on_commit_callbacks):
    settings.JOB_HEARTBEAT_TIMEOUT = 30
    pausing = running_job(org_a, default_model)
    control = running_job(org_a, default_model, worker="w2")
    pausing.checkpoints.create(step=4, attempt=1, blob_prefix="p/step-4")
    with django_capture_on_commit_callbacks(execute=False):
        job_pause(organization=org_a.organization, actor=org_a.principal(), job=pausing)
    FineTuningJob.objects.filter(pk__in=[pausing.pk, control.pk]).update(
        heartbeat_at=timezone.now() - timedelta(minutes=5))
    with django_capture_on_commit_callbacks(execute=False):
        done = scheduler.reap()
    assert done["paused"] == [pausing.id] and done["requeued"] == [control.id]
    assert state(pausing).status == "paused" and not state(pausing).pause_requested
    assert messages(pausing)[-1] == ("The worker running attempt 1 stopped responding. Job paused, "
                                     "as asked. Resuming continues from the checkpoint at step 4.")


@pytest.mark.django_db
def test_a_cancel_wins_over_a_pause(org_a, default_model, django_capture_on_commit_callbacks):
    principal, organization = org_a.principal(), org_a.organization
    job = running_job(org_a, default_model)
    with django_capture_on_commit_callbacks(execute=False):
        job_pause(organization=organization, actor=principal, job=job)
        job_cancel(organization=organization, actor=principal, job=job)  # while it pauses
        # The trainer had paused already: its pause is reported, the job is cancelled.
        assert job_mark_paused(job=job, attempt=1)
    assert state(job).status == "cancelled"
    cancelling = running_job(org_a, default_model)
    with django_capture_on_commit_callbacks(execute=False):
        job_cancel(organization=organization, actor=principal, job=cancelling)
    refused = bearer(org_a.owner_key).post(f"/v1/fine_tuning/jobs/{cancelling.id}/pause")
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "job_cancelling"
    assert not state(cancelling).pause_requested
    assert scheduler.stop_requested(job_id=cancelling.id) == "cancel"


@pytest.mark.django_db
def test_a_pause_asked_while_the_files_are_checked_pauses_once_they_are(
        org_a, default_model, pirate_file_of_a, django_capture_on_commit_callbacks):
    job = create_job(org_a, model=MODEL, training_file=pirate_file_of_a).json()
    paused = bearer(org_a.owner_key).post(f"/v1/fine_tuning/jobs/{job['id']}/pause").json()
    assert paused["status"] == "pausing"
    with django_capture_on_commit_callbacks(execute=False):
        assert job_files_validated(job_id=job["id"]) is None  # nothing to dispatch
    found = FineTuningJob.objects.get(id=job["id"])
    assert found.status == "paused"
    assert messages(found)[-1].startswith("Files validated; job paused.")


@pytest.mark.django_db
def test_time_spent_paused_does_not_count_in_the_runtime_limit(
        org_a, default_model, settings, django_capture_on_commit_callbacks):
    settings.JOB_MAX_RUNTIME_SECONDS = 3600
    settings.GPU_SLOTS, settings.ORG_MAX_CONCURRENT_JOBS = 2, 2
    started = timezone.now() - timedelta(hours=2, minutes=30)
    resumed, control = running_job(org_a, default_model), running_job(org_a, default_model, "w2")
    with django_capture_on_commit_callbacks(execute=False):
        job_pause(organization=org_a.organization, actor=org_a.principal(), job=resumed)
        job_mark_paused(job=resumed, attempt=1)
        # Paused for two of its two and a half hours since it started.
        FineTuningJob.objects.filter(pk=resumed.pk).update(
            started_at=started, paused_at=timezone.now() - timedelta(hours=2))
        FineTuningJob.objects.filter(pk=control.pk).update(started_at=started)
        job_resume(organization=org_a.organization, actor=org_a.principal(), job=resumed)
        assert scheduler.dispatch() == [resumed.id]
        scheduler.claim(job_id=resumed.id, worker="w3")
        assert scheduler.reap()["failed"] == [control.id]
    assert state(resumed).status == "running"
    assert timedelta(hours=2) <= state(resumed).paused_for < timedelta(hours=2, minutes=1)


@pytest.mark.django_db
def test_after_a_resume_the_attempts_are_counted_afresh(org_a, default_model, settings,
                                                       django_capture_on_commit_callbacks):
    settings.JOB_MAX_ATTEMPTS, settings.JOB_HEARTBEAT_TIMEOUT = 2, 30
    job = running_job(org_a, default_model)
    with django_capture_on_commit_callbacks(execute=False):
        job_pause(organization=org_a.organization, actor=org_a.principal(), job=job)
        job_mark_paused(job=job, attempt=1)
        job_resume(organization=org_a.organization, actor=org_a.principal(), job=job)
        scheduler.dispatch()
        assert scheduler.claim(job_id=job.id, worker="w2").attempts == 2
        FineTuningJob.objects.filter(pk=job.pk).update(
            heartbeat_at=timezone.now() - timedelta(minutes=5))
        assert scheduler.reap()["requeued"] == [job.id]  # the first lost worker since the resume
        scheduler.dispatch()
        scheduler.claim(job_id=job.id, worker="w3")
        FineTuningJob.objects.filter(pk=job.pk).update(
            heartbeat_at=timezone.now() - timedelta(minutes=5))
        assert scheduler.reap()["failed"] == [job.id]  # the second: the limit of 2
    assert "each of 2 attempts" in state(job).error["message"]


# --- the runner, with a stand-in trainer ------------------------------------------------------

# Says it started, waits for the runner's pause file, then does what the trainer does on a pause:
# a checkpoint of its step on disk and its line, then the paused result.
PAUSING_TRAINER = """
import sys, time
from pathlib import Path
from jobs.training import protocol
from jobs.training.layout import CHECKPOINT_FILES

out = Path(sys.argv[1]).parent
print(protocol.Event("stand-in trainer started").to_json(), flush=True)
deadline = time.monotonic() + 60
while not (out / protocol.PAUSE_REQUEST).exists():
    if time.monotonic() > deadline:
        sys.exit(protocol.EXIT_ERROR)
    time.sleep(0.05)
folder = out / "checkpoints" / "step-3"
folder.mkdir(parents=True)
for name in CHECKPOINT_FILES:
    (folder / name).write_text(name)
print(protocol.Checkpoint(step=3, path=str(folder), metrics={"step": 3}).to_json(), flush=True)
print(protocol.Result(status="paused", steps=3).to_json(), flush=True)
sys.exit(protocol.EXIT_PAUSED)
"""


@pytest.mark.django_db(transaction=True)
def test_the_runner_has_the_trainer_checkpoint_and_stop_then_marks_the_job_paused(
        org_a, default_model, monkeypatch, settings, tmp_path):
    settings.WORK_DIR, settings.JOB_HEARTBEAT_SECONDS = tmp_path, 1
    monkeypatch.setattr(runner, "trainer_command",
                        lambda module, *args, processes=1: [sys.executable, "-c", PAUSING_TRAINER,
                                                            *args])
    monkeypatch.setattr(runner.JobRun, "setup", lambda self, scope: (
        self.work.mkdir(parents=True), self.work / "config.json")[1])
    job = running_job(org_a, default_model)
    run = runner.JobRun(job, "test-worker")
    outcome: list[str] = []
    thread = threading.Thread(target=lambda: outcome.append(run.run()))
    thread.start()
    try:
        wait_for(lambda: job.events.filter(message="stand-in trainer started").exists(),
                 timeout=30, message="the trainer to start")
        assert not (run.work / protocol.PAUSE_REQUEST).exists()
        job_pause(organization=org_a.organization, actor=org_a.principal(), job=job)
    finally:
        thread.join(timeout=90)
    assert outcome == ["paused"]
    job = state(job)
    assert job.status == "paused" and job.worker == "" and job.dispatched_at is None
    checkpoint = job.checkpoints.get()
    assert (checkpoint.step, checkpoint.attempt) == (3, 1) and list_prefix(checkpoint.blob_prefix)
    said = messages(job)
    assert said.index("Checkpoint saved at step 3.") < said.index(
        "Job paused. Resuming continues from the checkpoint at step 3.")
    assert not run.work.exists()  # the attempt's folder is a cache


@pytest.mark.django_db(transaction=True)
def test_a_pause_asked_while_the_attempt_set_up_stops_it_before_the_trainer_starts(
        org_a, default_model, monkeypatch, settings, tmp_path):
    settings.WORK_DIR = tmp_path
    job = running_job(org_a, default_model)

    def setup(self, scope):  # the pause comes while the datasets and checkpoint download
        job_pause(organization=org_a.organization, actor=org_a.principal(), job=self.job)
        self.work.mkdir(parents=True)
        return self.work / "config.json"

    monkeypatch.setattr(runner.JobRun, "setup", setup)
    monkeypatch.setattr(runner, "trainer_command", lambda *a, **k: pytest.fail("trainer started"))
    assert runner.JobRun(job, "test-worker").run() == "paused"
    assert state(job).status == "paused"
