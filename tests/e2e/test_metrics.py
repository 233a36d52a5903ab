"""/metrics of the real processes around a real job and real inference requests.

The web process runs as two uvicorn workers sharing a PROMETHEUS_MULTIPROC_DIR (so every count
below is the sum over both, whichever answered); the GPU worker serves its exporter on its own
port (its pool process records, its main process serves); the replica's pool agent serves its
own. Each counter and histogram is checked to have moved by exactly what the test did. The
job's TensorBoard curves are checked on the way (one real job serves both).
"""

from __future__ import annotations

import io
import json
import socket
import time
import zipfile

import httpx
import pytest
from django.core.management import call_command
from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader

from tests.conftest import (
    REPLICA_SLOTS,
    GatewayProcess,
    bearer,
    empty_replicas,
    free_port,
    key_for,
    wait_for,
)
from tests.finetuning.conftest import create_job, upload
from tests.fixtures.datasets import lines_to_bytes, pirate_lines
from tests.metrics import scrape
from tuneplex.adapters.models import Adapter
from tuneplex.files.selectors import storage_used
from tuneplex.finetuning.models import FineTuningJob

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]
MODEL = "SmolLM2-135M-Instruct"
TOKEN = "metrics-token-" + "x" * 24
CHAT = "chat/completions"


@pytest.fixture
def web(engine, test_database_url, tmp_path):
    folder = tmp_path / "web-metrics"
    folder.mkdir()
    process = GatewayProcess(database_url=test_database_url, engine=engine, workers=2, extra_env={
        "PROMETHEUS_MULTIPROC_DIR": str(folder), "TUNEPLEX_METRICS_TOKEN": TOKEN,
        "TUNEPLEX_INFERENCE_RATE_LIMIT": "3"})
    try:
        yield process
    finally:
        process.stop()
        # This test's rows are flushed only after its fixtures end: undeploy them now so that the
        # shared replica lets go of their adapters.
        Adapter.objects.update(deployed=False)
        empty_replicas(engine)


def listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except OSError:
        return False
    return True


def test_metrics_move_by_exactly_what_happened(celery_worker, gpu_workers, web, engine, org_a,
                                               tmp_path):
    call_command("prepare_default_model")
    port = free_port()
    gpu_workers(extra_env={"TUNEPLEX_ENGINE_MODE": "attach", "TUNEPLEX_ENGINE_URLS": web.engine_url,
                           "TUNEPLEX_WORKER_METRICS_PORT": str(port)})
    web_url, worker_url, agent_url = f"{web.url}/metrics", f"http://127.0.0.1:{port}/metrics", \
        f"{engine.url}/metrics"

    # The worker opens its exporter once it has started (a scrape before that is refused).
    wait_for(lambda: listening(port), timeout=60, message="the GPU worker's exporter")
    # Behind a proxy (X-Forwarded-For) only the token opens them.
    for url in (web_url, worker_url, agent_url):
        refused = httpx.get(url, headers={"X-Forwarded-For": "203.0.113.9"}, timeout=30)
        assert refused.status_code == 403 and "tuneplex_" not in refused.text
    assert httpx.get(web_url, headers={"X-Forwarded-For": "203.0.113.9",
                                       "Authorization": f"Bearer {TOKEN}"}, timeout=30).status_code == 200

    web0, worker0, agent0 = scrape(web_url), scrape(worker_url), scrape(agent_url)
    assert worker0.before("tuneplex_job_attempt_duration_seconds_count", outcome="succeeded") == 0

    # --- a real job on the GPU worker -------------------------------------------------------
    started = time.monotonic()
    file_id = upload(org_a, lines_to_bytes(pirate_lines(16)))
    created = create_job(org_a, model=MODEL, training_file=file_id, suffix="metrics",
                         hyperparameters={"n_epochs": 1, "batch_size": 8, "lora_rank": 8})
    assert created.status_code == 200, created.content
    job_id = created.json()["id"]
    job = wait_for(lambda: (j := FineTuningJob.objects.get(id=job_id)).status
                   in FineTuningJob.FINISHED and j, timeout=300, interval=0.5, message="the job")
    assert job.status == "succeeded", job.error
    wall = time.monotonic() - started
    # The task's end is counted last (after it returned), so wait for that one.
    worker = wait_for(lambda: (s := scrape(worker_url)).value(
        "tuneplex_celery_tasks_total", task="tuneplex.train.run", outcome="succeeded") == 1 and s,
        timeout=30, message="the worker's job metrics")
    assert worker.value("tuneplex_job_attempt_duration_seconds_count", outcome="succeeded") == 1
    assert 0 < worker.value("tuneplex_job_attempt_duration_seconds_sum", outcome="succeeded") < wall
    assert worker.value("tuneplex_job_trained_tokens_total") == job.trained_tokens > 0
    assert worker.value("tuneplex_queue_wait_seconds_count", queue="gpu") == 1
    assert worker.value("tuneplex_job_queue_wait_seconds_count") == 1
    assert worker.value("tuneplex_training_tokens_per_second") == 0  # nothing trains now
    assert worker.value("tuneplex_worker_gpu_busy") == 0

    # The same run's training curves, as TensorBoard reads them, downloadable from the API.
    download = bearer(org_a.owner_key).get(f"/v1/fine_tuning/jobs/{job_id}/tensorboard")
    assert download.status_code == 200, download.content
    archive = zipfile.ZipFile(io.BytesIO(b"".join(download.streaming_content)))
    (name,) = archive.namelist()  # one attempt, one event file
    assert name.startswith(f"{job_id}/events.out.tfevents.") and name.endswith(".a1")
    archive.extractall(tmp_path / "curves")
    events = LegacyEventFileLoader(str(tmp_path / "curves" / name)).Load()
    losses = [(e.step, v.simple_value) for e in events for v in e.summary.value if v.tag == "train/loss"]
    reported = [(e.data["step"], e.data["train_loss"])
                for e in job.events.filter(type="metrics").order_by("created_at")]
    assert len(losses) == len(reported) > 0
    assert all(s == r and abs(v - loss) < 1e-5 for (s, v), (r, loss) in zip(losses, reported))

    adapter = wait_for(lambda: Adapter.objects.filter(name=job.fine_tuned_model, deployed=True).first(),
                       timeout=60, message="the adapter deployed")
    wait_for(lambda: job.events.filter(message__contains="Adapter deployed").exists(), timeout=60,
             message="the deploy event")

    # --- real inference requests through the gateway -----------------------------------------
    owner = {"Authorization": f"Bearer {org_a.owner_key}"}
    base = httpx.post(f"{web.url}/v1/{CHAT}", headers=owner, timeout=120, json={
        "model": MODEL, "max_tokens": 4, "temperature": 0,
        "messages": [{"role": "user", "content": "Hello!"}]})
    assert base.status_code == 200, base.text
    base_usage = base.json()["usage"]
    adapter_usage = None
    with httpx.stream("POST", f"{web.url}/v1/{CHAT}", headers=owner, timeout=120, json={
            "model": adapter.name, "max_tokens": 4, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": "Tell me about tea."}]}) as streamed:
        assert streamed.status_code == 200
        for line in streamed.iter_lines():
            if line.startswith("data: {") and '"usage":{' in line:
                adapter_usage = json.loads(line[6:])["usage"] or adapter_usage
    assert adapter_usage and adapter_usage["completion_tokens"] > 0
    # A key of its own with a limit of 3 requests a minute: three bad bodies, then a 429. The
    # limit's window is the clock's minute: the four go in one that has time enough left.
    limited = {"Authorization": f"Bearer {key_for(org_a, org_a.owner, ['infer'])}"}
    wait_for(lambda: 60 - time.time() % 60 > 15, timeout=20, interval=0.2,
             message="a rate-limit window with 15 s left")
    statuses = [httpx.post(f"{web.url}/v1/{CHAT}", headers=limited, json={}, timeout=30).status_code
                for _ in range(4)]
    assert statuses == [400, 400, 400, 429]

    # The replica loaded the adapter once, for its first request (auto-deploy only stages it).
    agent = scrape(agent_url)
    assert agent.value("tuneplex_pool_adapter_loads_total", model=MODEL, result="ok") == \
        agent0.before("tuneplex_pool_adapter_loads_total", model=MODEL, result="ok") + 1
    assert agent.value("tuneplex_pool_adapter_load_seconds_count", model=MODEL) == \
        agent0.before("tuneplex_pool_adapter_load_seconds_count", model=MODEL) + 1
    assert agent.value("tuneplex_pool_adapters", model=MODEL, state="loaded") == \
        agent0.before("tuneplex_pool_adapters", model=MODEL, state="loaded") + 1
    assert agent.value("tuneplex_pool_engine_up", model=MODEL) == 1
    assert agent.value("tuneplex_pool_slots", model=MODEL) == REPLICA_SLOTS

    def moved(after, name: str, **labels) -> float:
        return after.value(name, **labels) - web0.before(name, **labels)

    web1 = wait_for(lambda: (s := scrape(web_url)) and moved(
        s, "tuneplex_gateway_request_duration_seconds_count", endpoint=CHAT, kind="adapter",
        stream="true") == 1 and s, timeout=30, message="the stream's metrics")
    assert moved(web1, "tuneplex_gateway_requests_total", endpoint=CHAT, kind="base", status="200") == 1
    assert moved(web1, "tuneplex_gateway_requests_total", endpoint=CHAT, kind="adapter", status="200") == 1
    assert moved(web1, "tuneplex_gateway_requests_total", endpoint=CHAT, kind="none", status="400") == 3
    assert moved(web1, "tuneplex_gateway_requests_total", endpoint=CHAT, kind="none", status="429") == 1
    assert moved(web1, "tuneplex_gateway_rate_limited_total", limit="rate_limit_exceeded") == 1
    assert moved(web1, "tuneplex_gateway_request_duration_seconds_count", endpoint=CHAT,
                 kind="base", stream="false") == 1
    assert moved(web1, "tuneplex_gateway_tokens_total", kind="base", type="prompt") == \
        base_usage["prompt_tokens"]
    assert moved(web1, "tuneplex_gateway_tokens_total", kind="base", type="completion") == \
        base_usage["completion_tokens"]
    assert moved(web1, "tuneplex_gateway_tokens_total", kind="adapter", type="prompt") == \
        adapter_usage["prompt_tokens"]
    assert moved(web1, "tuneplex_gateway_tokens_total", kind="adapter", type="completion") == \
        adapter_usage["completion_tokens"]

    # The platform's state, read from the database and Redis at scrape time.
    assert moved(web1, "tuneplex_jobs", state="succeeded") == 1
    assert web1.value("tuneplex_jobs", state="running") == 0
    assert web1.value("tuneplex_gpu_slots_in_use") == 0 and web1.value("tuneplex_gpu_slots") == 1
    assert web1.value("tuneplex_storage_bytes") == storage_used(organization=org_a.organization) > 0
    assert 0 < web1.value("tuneplex_storage_quota_ratio_max") < 1
    assert web1.value("tuneplex_queue_depth", queue="gpu") == 0
    # Off by default (tests/platform/test_metrics.py turns it on and reads it by this name).
    assert not [k for k in web1 if k[0] == "tuneplex_organization_storage_bytes"]
    for part in ("jobs", "gpu", "storage", "queues"):
        assert web1.value("tuneplex_state_scrape_error", part=part) == 0
