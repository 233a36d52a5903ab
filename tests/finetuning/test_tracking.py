"""Experiment tracking: a job's `integrations` (OpenAI's wandb, our mlflow) checked field by field,
the organization's W&B key set but never shown, the trackers fed without holding up training,
and real jobs reporting to a real MLflow tracking server and to W&B's offline files, also while
the tracking server is down."""

from __future__ import annotations

import hashlib
import io
import struct
import threading
import zipfile
import zlib
from pathlib import Path

import openai
import pytest
from openai.types.fine_tuning import FineTuningJob as SdkJob
from django.core.management import call_command
from tuneplex.audit.models import AuditEvent
from tuneplex.finetuning import tracking
from tuneplex.finetuning.models import FineTuningJob
from tuneplex.tenancy.models import Organization
from tuneplex.tenancy.secrets import SecretUnreadable
from tuneplex.tenancy.selectors import organization_wandb_api_key

from jobs.training.layout import sha256_of
from tests.conftest import bearer, free_port, key_for, wait_for
from tests.finetuning.conftest import create_job, upload
from tests.fixtures.datasets import lines_to_bytes, pirate_lines

MODEL = "SmolLM2-135M-Instruct"
WANDB_KEY = "0123456789abcdef0123456789abcdef01234567"  # the shape of a W&B key (40 characters)
WANDB = {"type": "wandb", "wandb": {"project": "tea"}}
MLFLOW = {"type": "mlflow", "mlflow": {"experiment_name": "tea"}}


@pytest.fixture
def tracking_server(settings):
    """The operator has set a tracking server (creating a job sends nothing to it)."""
    settings.MLFLOW_TRACKING_URI = "http://127.0.0.1:9"


# --- the request ------------------------------------------------------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize("integrations,param", [
    ("wandb", "integrations"),
    (["wandb"], "integrations[0]"),
    ([{"type": "comet", "comet": {}}], "integrations[0].type"),
    ([{"type": "wandb"}], "integrations[0].wandb"),
    ([{"type": "wandb", "wandb": {"project": "tea"}, "mlflow": {}}], "integrations[0].mlflow"),
    ([{"type": "wandb", "wandb": "tea"}], "integrations[0].wandb"),
    ([{"type": "wandb", "wandb": {}}], "integrations[0].wandb.project"),
    ([{"type": "wandb", "wandb": {"project": " "}}], "integrations[0].wandb.project"),
    ([{"type": "wandb", "wandb": {"project": "tea/green"}}], "integrations[0].wandb.project"),
    ([{"type": "wandb", "wandb": {"project": "t" * 129}}], "integrations[0].wandb.project"),
    ([{"type": "wandb", "wandb": {"project": "tea", "entity": "a:b"}}],
     "integrations[0].wandb.entity"),
    ([{"type": "wandb", "wandb": {"project": "tea", "name": 7}}], "integrations[0].wandb.name"),
    ([{"type": "wandb", "wandb": {"project": "tea", "tags": "green"}}],
     "integrations[0].wandb.tags"),
    ([{"type": "wandb", "wandb": {"project": "tea", "tags": ["green", ""]}}],
     "integrations[0].wandb.tags[1]"),
    ([{"type": "wandb", "wandb": {"project": "tea", "tags": ["t" * 65]}}],
     "integrations[0].wandb.tags[0]"),
    ([{"type": "wandb", "wandb": {"project": "tea", "colour": "green"}}],
     "integrations[0].wandb.colour"),
    ([WANDB, WANDB], "integrations[1].type"),
    ([MLFLOW, {"type": "mlflow", "mlflow": {}}], "integrations[1].type"),
    ([{"type": "mlflow", "mlflow": {"run_name": "first"}}], "integrations[0].mlflow.experiment_name"),
    ([{"type": "mlflow", "mlflow": {"experiment_name": "tea", "run_name": 5}}],
     "integrations[0].mlflow.run_name"),
    ([{"type": "mlflow", "mlflow": {"experiment_name": "tea", "tags": ["green"]}}],
     "integrations[0].mlflow.tags"),
    ([{"type": "mlflow", "mlflow": {"experiment_name": "tea", "tags": {"team": 3}}}],
     "integrations[0].mlflow.tags.team"),
    ([{"type": "mlflow", "mlflow": {"experiment_name": "tea", "tags": {"mlflow.user": "eve"}}}],
     "integrations[0].mlflow.tags.mlflow.user"),
    ([{"type": "mlflow", "mlflow": {"experiment_name": "tea", "tags": {"a;b": "c"}}}],
     "integrations[0].mlflow.tags.a;b"),
    # No tenant names an address for the platform to call.
    ([{"type": "mlflow", "mlflow": {"experiment_name": "tea",
                                    "tracking_uri": "http://169.254.169.254/"}}],
     "integrations[0].mlflow.tracking_uri"),
])
def test_each_bad_integration_field_is_a_400_naming_it(org_a, default_model, pirate_file_of_a,
                                                       tracking_server, integrations, param):
    response = create_job(org_a, model=MODEL, training_file=pirate_file_of_a,
                          integrations=integrations)
    assert response.status_code == 400, response.content
    assert response.json()["error"]["code"] == "invalid_integration"
    assert response.json()["error"]["param"] == param
    assert not FineTuningJob.objects.exists()


@pytest.mark.django_db
def test_mlflow_is_refused_where_the_operator_set_no_tracking_server(org_a, default_model,
                                                                     pirate_file_of_a, settings):
    settings.MLFLOW_TRACKING_URI = None
    response = create_job(org_a, model=MODEL, training_file=pirate_file_of_a,
                          integrations=[WANDB, MLFLOW])
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "integration_unavailable"
    assert response.json()["error"]["param"] == "integrations[1].type"
    assert "TUNEPLEX_MLFLOW_TRACKING_URI" in response.json()["error"]["message"]
    settings.MLFLOW_TRACKING_URI = "http://127.0.0.1:9"  # the control: the same request passes
    assert create_job(org_a, model=MODEL, training_file=pirate_file_of_a,
                      integrations=[WANDB, MLFLOW]).status_code == 200


@pytest.mark.django_db
def test_the_job_returns_its_integrations_in_openai_shape(org_a, default_model, pirate_file_of_a,
                                                          tracking_server):
    response = create_job(org_a, model=MODEL, training_file=pirate_file_of_a, integrations=[
        {"type": "wandb", "wandb": {"project": "tea", "tags": ["green"]}},
        {"type": "mlflow", "mlflow": {"experiment_name": "tea", "run_name": "first",
                                      "tags": {"team": "leaves"}}}])
    assert response.status_code == 200, response.content
    expected = [{"type": "wandb", "wandb": {"project": "tea", "name": None, "entity": None,
                                            "tags": ["green"]}},
                {"type": "mlflow", "mlflow": {"experiment_name": "tea", "run_name": "first",
                                              "tags": {"team": "leaves"}}}]
    assert response.json()["integrations"] == expected
    job_id = response.json()["id"]
    assert bearer(org_a.owner_key).get(f"/v1/fine_tuning/jobs/{job_id}").json()[
        "integrations"] == expected
    # The openai SDK's job type takes a job's W&B integration (strictly validated here; the
    # SDK's own responses, with the mlflow one, are read in the end-to-end test below).
    job = SdkJob.model_validate({**response.json(), "integrations": expected[:1]})
    assert job.integrations[0].wandb.project == "tea"
    plain = create_job(org_a, model=MODEL, training_file=pirate_file_of_a).json()
    assert plain["integrations"] == []
    # No W&B files before an attempt with W&B has ended.
    missing = bearer(org_a.owner_key).get(f"/v1/fine_tuning/jobs/{job_id}/wandb")
    assert missing.status_code == 409 and missing.json()["error"]["code"] == "no_wandb_files"


# --- the organization's W&B key ---------------------------------------------------------------


@pytest.mark.django_db
def test_the_wandb_key_is_set_by_an_admin_and_never_returned(org_a, member_of_a, viewer_of_a):
    owner = bearer(org_a.owner_key)
    path = "/v1/organization/integrations/wandb"
    assert owner.get(path).json()["api_key_set"] is False
    refused = bearer(key_for(org_a, member_of_a, ["read", "train", "infer"])).post(
        path, {"api_key": WANDB_KEY}, format="json")
    assert refused.status_code == 403
    bad = owner.post(path, {"api_key": "short"}, format="json")
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "api_key"

    stored = owner.post(path, {"api_key": WANDB_KEY}, format="json")
    assert stored.status_code == 200 and stored.json()["api_key_set"] is True
    viewer = bearer(key_for(org_a, viewer_of_a, ["read"]))
    answers = [stored, owner.get(path), viewer.get(path), owner.get("/v1/organization"),
               owner.get("/v1/audit_events")]
    assert answers[2].json() == {"object": "organization.integration", "type": "wandb",
                                 "api_key_set": True, "updated_at": answers[2].json()["updated_at"],
                                 "mode": "offline"}
    for answer in answers:
        assert answer.status_code == 200 and WANDB_KEY not in answer.content.decode()
    assert AuditEvent.objects.filter(action="organization.wandb_key.set").exists()
    # Stored sealed, read back only by the worker's selector.
    sealed = Organization.objects.get(pk=org_a.organization.pk).wandb_api_key_sealed
    assert sealed and WANDB_KEY not in sealed
    assert organization_wandb_api_key(organization=org_a.organization) == WANDB_KEY

    removed = owner.delete(path)
    assert removed.status_code == 200 and removed.json()["api_key_set"] is False
    assert organization_wandb_api_key(organization=org_a.organization) is None


@pytest.mark.django_db
def test_a_key_sealed_under_another_secret_key_is_unreadable_not_wrong(org_a, settings):
    bearer(org_a.owner_key).post("/v1/organization/integrations/wandb", {"api_key": WANDB_KEY},
                                 format="json")
    settings.SECRET_KEY = "another-secret-key-of-at-least-32-characters"
    with pytest.raises(SecretUnreadable):
        organization_wandb_api_key(organization=org_a.organization)


@pytest.mark.django_db
def test_online_wandb_needs_the_organizations_key(org_a, default_model, pirate_file_of_a,
                                                  settings, tmp_path):
    settings.WANDB_MODE = "online"
    refused = create_job(org_a, model=MODEL, training_file=pirate_file_of_a, integrations=[WANDB])
    assert refused.status_code == 400
    assert refused.json()["error"] == {
        "code": "integration_unavailable", "param": "integrations[0].wandb",
        "message": refused.json()["error"]["message"]}
    bearer(org_a.owner_key).post("/v1/organization/integrations/wandb", {"api_key": WANDB_KEY},
                                 format="json")
    org_a.organization.refresh_from_db()
    created = create_job(org_a, model=MODEL, training_file=pirate_file_of_a, integrations=[WANDB])
    assert created.status_code == 200, created.content
    job = FineTuningJob.objects.get(id=created.json()["id"])
    [wandb] = tracking.open_trackers(job, directory=tmp_path)
    assert isinstance(wandb, tracking.WandbTracker) and wandb.api_key == WANDB_KEY
    # Removed since: the worker's tracker refuses to start, with the reason.
    bearer(org_a.owner_key).delete("/v1/organization/integrations/wandb")
    [refusing] = tracking.open_trackers(job, directory=tmp_path)
    with pytest.raises(tracking.TrackingError, match="W&B API key is not set"):
        refusing.start()


# --- feeding the trackers ---------------------------------------------------------------------


class Recording:
    """A tracker that records its calls; ``fail_on`` names the call that raises."""

    def __init__(self, name: str, fail_on: str = "", hold: threading.Event | None = None):
        self.name, self.fail_on, self.hold = name, fail_on, hold
        self.calls: list[tuple] = []

    def redact(self, text: str) -> str:
        return text.replace("secret-host", "the tracking server")

    def _call(self, *call) -> None:
        if self.hold is not None and call[0] == "log_metrics":
            self.hold.wait()
        if call[0] == self.fail_on:
            raise RuntimeError("connection refused by secret-host")
        self.calls.append(call)

    def start(self):
        self._call("start")

    def log_params(self, params):
        self._call("log_params", params)

    def log_metrics(self, step, metrics):
        self._call("log_metrics", step, metrics)

    def log_adapter(self, path):
        self._call("log_adapter", path)

    def finish(self, status):
        self._call("finish", status)


def test_a_failing_tracker_is_reported_once_and_dropped_while_the_others_go_on():
    reports: list[tuple[str, dict]] = []
    failing, working = Recording("Failing", fail_on="log_metrics"), Recording("Working")
    feeding = tracking.Tracking([failing, working], job_id="ftjob-x",
                                report=lambda message, data: reports.append((message, data)))
    feeding.params({"training.lora_rank": 8})
    for step in (1, 2, 3):  # the first fails; the two after it are not sent to it
        feeding.metrics({"step": step, "total_steps": 3, "train_loss": 1.0 / step,
                         "note": "text", "flag": True, "bad": float("nan")})
    feeding.adapter(Path("/adapter"))
    feeding.close("succeeded", timeout=30)
    assert reports == [("Failing tracking failed: RuntimeError: connection refused by the "
                        "tracking server. The job goes on without it.",
                        {"integration": "Failing",
                         "reason": "RuntimeError: connection refused by the tracking server"})]
    assert failing.calls == [("start",), ("log_params", {"training.lora_rank": 8})]
    assert working.calls == [
        ("start",), ("log_params", {"training.lora_rank": 8}),
        *[("log_metrics", step, {"total_steps": 3.0, "train_loss": 1.0 / step})
          for step in (1, 2, 3)],
        ("log_adapter", Path("/adapter")), ("finish", "succeeded")]


def test_a_tracker_that_hangs_holds_up_neither_the_training_nor_the_end():
    reports: list[str] = []
    held = threading.Event()
    hanging = Recording("Hanging", fail_on="finish", hold=held)
    working = Recording("Working")
    feeding = tracking.Tracking([hanging, working], job_id="ftjob-x",
                                report=lambda message, data: reports.append(message))
    for step in range(1, 501):  # none of these waits for the hanging tracker
        feeding.metrics({"step": step, "train_loss": 1.0})
    feeding.close("failed", timeout=0.5)
    assert working.calls[-1] == ("finish", "failed") and len(working.calls) == 502
    assert reports == ["Hanging tracking failed: it had not finished 0.5 s after the attempt ended "
                       "(the server did not answer in time); what it had not sent is lost. The "
                       "job goes on without it."]
    [hanging_feed] = [feed for feed in feeding.feeds if feed.tracker is hanging]
    held.set()  # it answers at last, and then fails: that is not reported a second time
    hanging_feed.thread.join(timeout=30)
    assert not hanging_feed.thread.is_alive() and len(hanging.calls) == 501
    assert len(reports) == 1


# --- real jobs --------------------------------------------------------------------------------


def wandb_records(data: bytes) -> list:
    """The records of a .wandb file, read with W&B's own record type (wandb_internal_pb2).

    The file is W&B's header (":W&B", 0xBEE1, version 0) and then LevelDB's log format: 32 KiB
    blocks of chunks, each with a CRC-32 of its type and data, its length and its type (1 whole,
    2 first, 3 middle, 4 last). wandb ships no Python reader of it (wandb-core, in Go, is)."""
    from wandb.proto import wandb_internal_pb2

    assert data[:7] == b":W&B\xe1\xbe\x00", data[:7]
    records, pending, position, block = [], b"", 7, 32768
    while position + 7 <= len(data):
        left = block - position % block
        if left < 7:  # a block's tail too short for a chunk header is padding
            position += left
            continue
        checksum, length, kind = struct.unpack("<IHB", data[position:position + 7])
        chunk = data[position + 7:position + 7 + length]
        position += 7 + length
        if kind == 0 and length == 0:
            continue
        assert zlib.crc32(bytes([kind]) + chunk) == checksum, f"bad chunk at {position}"
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            records.append(wandb_internal_pb2.Record.FromString(pending))
    return records


def _of(records: list, kind: str) -> list:
    return [getattr(record, kind) for record in records if record.WhichOneof("record_type") == kind]


@pytest.fixture
def ready(celery_worker, db):
    call_command("prepare_default_model")


def _finished(job_id: str) -> FineTuningJob:
    return wait_for(lambda: (j := FineTuningJob.objects.get(id=job_id)).status
                    in FineTuningJob.FINISHED and j, timeout=300, interval=0.5,
                    message=f"job {job_id} to finish")


def _losses(job: FineTuningJob) -> list[tuple[int, float]]:
    return sorted((e.data["step"], e.data["train_loss"]) for e in job.events.filter(type="metrics"))


def _tracking_failures(job: FineTuningJob) -> list:
    return list(job.events.filter(level="warn", data__has_key="integration"))


def _wandb_zip(org, job_id: str) -> zipfile.ZipFile:
    download = bearer(org.owner_key).get(f"/v1/fine_tuning/jobs/{job_id}/wandb")
    assert download.status_code == 200, download.content
    return zipfile.ZipFile(io.BytesIO(b"".join(download.streaming_content)))


TINY = {"n_epochs": 1, "batch_size": 4, "learning_rate": 1e-3, "lora_rank": 4}


@pytest.mark.e2e
@pytest.mark.django_db(transaction=True)
def test_a_job_reports_to_a_real_mlflow_server_and_writes_wandb_offline_files(
        ready, gpu_workers, mlflow_server, live_server, org_a, settings, tmp_path):
    from mlflow import MlflowClient

    settings.MLFLOW_TRACKING_URI = mlflow_server.url
    gpu_workers(extra_env={"TUNEPLEX_MLFLOW_TRACKING_URI": mlflow_server.url})
    file_id = upload(org_a, lines_to_bytes(pirate_lines(16)))
    sdk = openai.OpenAI(base_url=f"{live_server.url}/v1", api_key=org_a.owner_key, max_retries=0)
    created = sdk.fine_tuning.jobs.create(
        model=MODEL, training_file=file_id, extra_body={"hyperparameters": TINY},
        integrations=[{"type": "wandb", "wandb": {"project": "tea", "tags": ["smoke"]}},
                      {"type": "mlflow", "mlflow": {"experiment_name": "brews",
                                                    "run_name": "first-brew",
                                                    "tags": {"team": "leaves"}}}])
    assert created.integrations[0].wandb.project == "tea"
    job = _finished(created.id)
    assert job.status == "succeeded", job.error
    losses = _losses(job)
    assert [step for step, _ in losses] == [1, 2, 3, 4]

    # MLflow: one run in the organization's experiment, ended with the job.
    client = MlflowClient(tracking_uri=mlflow_server.url)
    experiment = wait_for(lambda: client.get_experiment_by_name(
        f"{org_a.organization.slug}/brews"), timeout=60, message="the experiment")
    run = wait_for(lambda: (runs := client.search_runs([experiment.experiment_id]))
                   and runs[0].info.status == "FINISHED" and runs[0], timeout=120,
                   message="the MLflow run to finish")
    assert len(client.search_runs([experiment.experiment_id])) == 1
    assert run.info.run_name == "first-brew"
    assert run.data.tags["team"] == "leaves" and run.data.tags["tuneplex.job_id"] == job.id
    params = run.data.params
    assert params["job_id"] == job.id and params["base_model"] == MODEL
    assert params["hyperparameters.lora_rank"] == "4" and params["training.lora_rank"] == "4"
    assert params["training.epochs"] == "1" and params["training.learning_rate"] == "0.001"
    assert {f"training.{key}" for key in job.config} <= set(params)
    history = client.get_metric_history(run.info.run_id, "train_loss")
    assert sorted((point.step, point.value) for point in history) == losses
    assert [p.step for p in client.get_metric_history(run.info.run_id, "tokens_per_second")] \
        == [1, 2, 3, 4]
    local = Path(client.download_artifacts(run.info.run_id, "adapter", str(tmp_path)))
    assert sha256_of(local) == job.adapter.sha256  # the adapter the job stored

    # W&B: the offline run directory, stored with the job and downloadable.
    archive = _wandb_zip(org_a, job.id)
    names = archive.namelist()
    [run_file] = [name for name in names if name.endswith(f"/run-{job.id}.wandb")]
    run_dir = run_file.rsplit("/", 1)[0]
    assert run_dir.startswith(f"{job.id}/offline-run-") and run_dir.endswith(job.id)
    assert f"{run_dir}/files/adapter/adapter_model.safetensors" in names
    stored = archive.read(f"{run_dir}/files/adapter/adapter_model.safetensors")
    assert hashlib.sha256(stored).hexdigest() == hashlib.sha256(
        (local / "adapter_model.safetensors").read_bytes()).hexdigest()
    records = wandb_records(archive.read(run_file))
    [started] = _of(records, "run")
    assert (started.project, started.run_id) == ("tea", job.id)
    assert {"smoke", "tuneplex/finetune", f"tuneplex/{job.id}"} <= set(started.tags)
    config = {item.key: item.value_json for record in _of(records, "config")
              for item in record.update}
    assert config["training.lora_rank"] == "4" and config["job_id"] == f'"{job.id}"'
    history = [{item.nested_key[0] if item.nested_key else item.key: item.value_json
                for item in record.item} for record in _of(records, "history")]
    assert sorted((int(h["_step"]), float(h["train_loss"])) for h in history) == losses
    saved = {file.path for record in _of(records, "files") for file in record.files}
    assert "adapter/adapter_model.safetensors" in saved
    assert [exit.exit_code for exit in _of(records, "exit")] == [0]
    assert not _tracking_failures(job)


@pytest.mark.e2e
@pytest.mark.django_db(transaction=True)
def test_a_tracking_server_that_is_down_does_not_fail_or_hold_up_the_job(ready, gpu_workers,
                                                                         org_a, settings):
    down = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    settings.MLFLOW_TRACKING_URI = down
    # MLflow's client retries a refused connection for about four minutes with its defaults
    # (seven retries, growing back-off): the job must not wait for it, the end only 5 s.
    gpu_workers(extra_env={"TUNEPLEX_MLFLOW_TRACKING_URI": down,
                           "TUNEPLEX_TRACKING_DRAIN_SECONDS": "5"})
    file_id = upload(org_a, lines_to_bytes(pirate_lines(16)))
    created = create_job(org_a, model=MODEL, training_file=file_id, hyperparameters=TINY,
                         integrations=[MLFLOW, WANDB])
    assert created.status_code == 200, created.content
    job = _finished(created.json()["id"])
    assert job.status == "succeeded", job.error
    [warning] = wait_for(lambda: _tracking_failures(job), timeout=60,
                         message="the tracking failure's event")
    assert warning.message.startswith("MLflow tracking failed: it had not finished 5 s after")
    assert warning.data["integration"] == "MLflow"
    assert warning.created_at >= job.finished_at  # the job succeeded without waiting for it
    assert [step for step, _ in _losses(job)] == [1, 2, 3, 4]
    # W&B, fed apart, was not held up by MLflow: its run ended and is stored.
    archive = _wandb_zip(org_a, job.id)
    [run_file] = [name for name in archive.namelist() if name.endswith(".wandb")]
    assert [exit.exit_code for exit in _of(wandb_records(archive.read(run_file)), "exit")] == [0]
    assert len(_tracking_failures(job)) == 1
