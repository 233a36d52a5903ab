"""The platform's Prometheus metrics: their definitions, who may read them, and the exposition.

Every metric is defined here, once, and recorded where the thing happens (the gateway, the job
runner, the merge and statistics tasks, the Celery signal hooks in
``tuneplex.operations.worker_metrics``). Three kinds of process serve them:

- web processes: ``GET /metrics`` (``tuneplex.operations.asgi_metrics``, in front of Django):
  what this process (or, with PROMETHEUS_MULTIPROC_DIR, every process sharing that folder)
  recorded, plus the platform's state read at scrape time (``tuneplex.operations.metrics_state``:
  jobs by state, queue depths, GPU slots, storage);
- Celery workers: an exporter on TUNEPLEX_WORKER_METRICS_PORT
  (``tuneplex.operations.worker_metrics``), over a folder of the worker's own that its pool
  processes write to (multi-process mode, ``jobs/metrics.py``);
- pool agents (``manage.py run_engine``): ``/metrics`` on the agent's port, the replica's
  residency and adapter loads.

Multi-process mode (prometheus_client's): when PROMETHEUS_MULTIPROC_DIR is set before this
module is first imported, every process writes its samples to files there and a scrape adds
them up; the folder must be emptied before the process group starts (the images' entrypoint
does) and belongs to one group of processes.

Recording is a few in-memory (or memory-mapped) additions: no I/O, nothing per token.
"""

from __future__ import annotations

import atexit
import hmac
import ipaddress
import json
import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client import multiprocess

MULTIPROCESS_DIR = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None
CONTENT_TYPE = CONTENT_TYPE_LATEST

# --- the gateway (web processes) -------------------------------------------------------------------
# kind: "base" (a base model), "adapter" (a fine-tuned adapter), "none" (refused before a model
# was resolved); status: the HTTP status answered.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
GATEWAY_REQUESTS = Counter(
    "tuneplex_gateway_requests_total", "Inference requests answered, by endpoint, model kind "
    "and HTTP status.", ["endpoint", "kind", "status"])
GATEWAY_LATENCY = Histogram(
    "tuneplex_gateway_request_duration_seconds", "Inference request duration, from the request "
    "to the end of the answer (the last event of a stream).", ["endpoint", "kind", "stream"],
    buckets=LATENCY_BUCKETS)
GATEWAY_TOKENS = Counter(
    "tuneplex_gateway_tokens_total", "Tokens of answered inference requests, as the engine "
    "counted them.", ["kind", "type"])
GATEWAY_REJECTED = Counter(
    "tuneplex_gateway_rate_limited_total", "Inference requests refused with 429, by limit "
    "(rate_limit_exceeded, token_budget_exceeded, concurrency_limit_exceeded).", ["limit"])

# --- workers ------------------------------------------------------------------------------------
DURATION_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400, 43200, 86400)
QUEUE_WAIT = Histogram(
    "tuneplex_queue_wait_seconds", "Time from sending a Celery message to a worker starting it, "
    "by queue.", ["queue"], buckets=(0.01, 0.05, 0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600))
TASKS = Counter("tuneplex_celery_tasks_total", "Celery tasks run, by task name and outcome "
                "(succeeded, failed).", ["task", "outcome"])
JOB_WAIT = Histogram(
    "tuneplex_job_queue_wait_seconds", "Time from a job's creation to its first claim by a GPU "
    "worker.", buckets=DURATION_BUCKETS)
JOB_DURATION = Histogram(
    "tuneplex_job_attempt_duration_seconds", "Duration of one claim of a job on a GPU worker, by "
    "how it ended (succeeded, failed, cancelled, queued: re-queued, superseded).", ["outcome"],
    buckets=DURATION_BUCKETS)
JOB_TOKENS = Counter("tuneplex_job_trained_tokens_total",
                     "Tokens trained on (loss-bearing) by jobs that succeeded.")
TRAINING_THROUGHPUT = Gauge(
    "tuneplex_training_tokens_per_second", "Trained tokens per second of the jobs running now, "
    "as their trainers last reported.", multiprocess_mode="livesum")
GPU_WORK = Gauge("tuneplex_worker_gpu_busy", "GPU work (training or merging) running in this "
                 "worker now.", multiprocess_mode="livesum")
STATISTICS_DURATION = Histogram(
    "tuneplex_statistics_duration_seconds", "Dataset statistics computation time, by outcome.",
    ["outcome"], buckets=DURATION_BUCKETS)
MERGE_DURATION = Histogram(
    "tuneplex_merge_duration_seconds", "Merge-and-export time, by outcome.", ["outcome"],
    buckets=DURATION_BUCKETS)
EXPORT_DURATION = Histogram(
    "tuneplex_export_duration_seconds", "Export time on an exports worker (conversion, check, "
    "upload), by format and outcome.", ["format", "outcome"], buckets=DURATION_BUCKETS)


# --- who may read them ---------------------------------------------------------------------------

def may_scrape(client_address: str | None, authorization: str | None, *, proxied: bool) -> bool:
    """The metrics token as a bearer token, or a direct caller (not through a proxy) from one of
    TUNEPLEX_METRICS_NETWORKS (loopback by default)."""
    from django.conf import settings

    token = settings.METRICS_TOKEN
    if token and authorization is not None and hmac.compare_digest(
            authorization.encode(errors="replace"), f"Bearer {token}".encode()):
        return True
    if proxied or not client_address:
        return False
    try:
        address = ipaddress.ip_address(client_address)
    except ValueError:
        return False
    return any(address in network for network in settings.METRICS_NETWORKS)


REFUSED_MESSAGE = "Metrics are served to the monitoring network or with the metrics token."
REFUSED = json.dumps({"error": {"code": "permission_denied", "message": REFUSED_MESSAGE,
                                "param": None}}).encode()  # outside a request: no request id


# --- exposition ----------------------------------------------------------------------------------

def recorded() -> bytes:
    """What this process recorded, or, in multi-process mode, every process of its folder."""
    if MULTIPROCESS_DIR is None:
        return generate_latest(REGISTRY)
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=MULTIPROCESS_DIR)
    return generate_latest(registry)


def exposition(*collectors) -> bytes:
    """The recorded metrics followed by those of ``collectors`` (read at scrape time)."""
    text = recorded()
    if collectors:
        registry = CollectorRegistry(auto_describe=False)
        for collector in collectors:
            registry.register(collector)
        text += generate_latest(registry)
    return text


def _forget_this_process() -> None:
    # A process's live gauges (work in progress) must not outlive it in the shared folder.
    if MULTIPROCESS_DIR is not None and os.path.isdir(MULTIPROCESS_DIR):
        multiprocess.mark_process_dead(os.getpid(), MULTIPROCESS_DIR)


def forget_process(pid: int) -> None:
    """A process of this folder ended (a Celery pool process): drop its live gauges."""
    if MULTIPROCESS_DIR is not None and os.path.isdir(MULTIPROCESS_DIR):
        multiprocess.mark_process_dead(pid, MULTIPROCESS_DIR)


atexit.register(_forget_this_process)
