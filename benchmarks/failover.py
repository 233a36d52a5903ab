"""Failover: how long a job is interrupted when its GPU node is killed and another takes over.

    DATABASE_URL=postgres://... REDIS_URL=redis://... .venv/bin/python benchmarks/failover.py \
        [--heartbeat-timeout 5] [--json benchmarks/results/failover-cpu.json]

Starts everything it needs and stops it at the end, even on failure: a real S3-compatible server
(moto's server mode) as artifact storage, a default worker, and two GPU-queue workers ("nodes")
with separate data folders that share only PostgreSQL, Redis and the bucket. One job of the
embedded model (SmolLM2-135M, checkpoint every 2 steps) starts on node A alone; once its first
checkpoint is in storage, node B is started and node A is killed with SIGKILL. The sweep runs
here every 0.5 s, as beat would (every 10 s in production).

Reported, from the job's own events:
- kill → resumed step: SIGKILL until node B's first optimizer step after the checkpoint;
  split into detection (kill → re-queued: the heartbeat timeout), claim, and claim → first step;
- the baseline, measured in the same run: node A's claim → first step of the fresh job
  (loading the data and the model, the first step). The ratio of B's claim → first step to it
  is what restoring the checkpoint from storage adds.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "platform")]
BUCKET = "tuneplex-bench"

from serving.engine import stop_process_group  # noqa: E402 - after the path is set


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait(predicate, timeout: float, what: str, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise SystemExit(f"timed out after {timeout:.0f} s waiting for {what}")


def _start_s3(scratch: Path) -> tuple[subprocess.Popen, dict[str, str]]:
    import httpx

    port = _free_port()
    process = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1",
                                "-p", str(port)], stdout=(scratch / "moto.log").open("w"),
                               stderr=subprocess.STDOUT, start_new_session=True)
    endpoint = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return httpx.get(endpoint, timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    _wait(up, 30, "the S3 server")
    httpx.put(f"{endpoint}/{BUCKET}", timeout=5).raise_for_status()
    return process, {"TUNEPLEX_STORAGE": "s3", "TUNEPLEX_S3_BUCKET": BUCKET,
                     "TUNEPLEX_S3_ENDPOINT_URL": endpoint, "TUNEPLEX_S3_REGION": "us-east-1",
                     "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench"}


def _start_worker(name: str, queues: str, data_dir: Path, environment: dict[str, str]
                  ) -> subprocess.Popen:
    data_dir.mkdir(parents=True, exist_ok=True)
    log = data_dir / f"worker-{name}.log"
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "celery"), "-A", "jobs.celery", "worker", "--queues",
         queues, "--concurrency", "1", "--prefetch-multiplier", "1", "--hostname",
         f"{name}@%h", "--without-gossip", "--without-mingle", "--loglevel", "INFO"],
        cwd=REPO, env={**os.environ, **environment, "TUNEPLEX_DATA_DIR": str(data_dir),
                       "TUNEPLEX_JOB_HEARTBEAT_SECONDS": "1"},
        stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    _wait(lambda: "ready." in log.read_text() or process.poll() is not None, 90, f"worker {name}")
    if process.poll() is not None:
        raise SystemExit(f"worker {name} exited:\n{log.read_text()[-2000:]}")
    return process


def _event_time(job, prefix: str, after=None, kind: str = "message"):
    events = job.events.filter(type=kind).order_by("created_at")
    if kind == "message":
        events = events.filter(message__startswith=prefix)
    if after is not None:
        events = events.filter(created_at__gt=after)
    first = events.first()
    return first.created_at if first else None


def _tenant_and_file():
    from django.core.files.uploadedfile import SimpleUploadedFile

    from tests.fixtures.datasets import lines_to_bytes, pirate_lines
    from tuneplex.core.actors import Principal
    from tuneplex.files.services import file_create
    from tuneplex.tenancy.models import Membership, User
    from tuneplex.tenancy.services import organization_create

    user = User.objects.create_user(f"bench-{time.time_ns()}", password="bench-password-1")
    organization = organization_create(name="Bench", owner=user)
    actor = Principal.of_member(Membership.objects.get(organization=organization, user=user))
    upload = SimpleUploadedFile("bench.jsonl", lines_to_bytes(pirate_lines(24)))
    file = file_create(organization=organization, actor=actor, upload=upload, purpose="fine-tune",
                       filename="bench.jsonl")
    return organization, actor, file


def run(args) -> dict:
    from django.core.management import call_command

    from tuneplex.finetuning import scheduler
    from tuneplex.finetuning.models import FineTuningJob
    from tuneplex.finetuning.services.lifecycle import job_cancel, job_create

    call_command("migrate", verbosity=0)
    call_command("prepare_default_model", verbosity=0)
    busy = scheduler.gpu_slots_in_use()
    if busy:  # e.g. the job of an earlier run, whose worker this run's teardown stopped
        raise SystemExit(f"the database has {busy} GPU slot(s) in use by earlier jobs, so this "
                         "run's job would never be dispatched: use an empty database")
    organization, actor, file = _tenant_and_file()
    job = job_create(organization=organization, actor=actor, model="SmolLM2-135M-Instruct",
                     training_file=file.id, hyperparameters={
                         "n_epochs": 20, "batch_size": 8, "checkpoint_every_steps": 2})
    first_checkpoint = _wait(lambda: job.checkpoints.filter(attempt=1).first(), 600,
                             "node A's first checkpoint")
    args.start_node_b()
    os.killpg(args.node_a.pid, signal.SIGKILL)  # the worker, its pool and its trainer
    killed_at = time.time()
    _wait(lambda: job.id in scheduler.sweep()["requeued"], 120, "the re-queue")
    job = FineTuningJob.objects.get(id=job.id)
    requeued = _event_time(job, "The worker running attempt")
    requeued_at = requeued.timestamp()
    claimed_b = _wait(lambda: _event_time(job, "Running (attempt", after=requeued), 120, "B's claim")
    first_b = _wait(lambda: _event_time(job, "", after=claimed_b, kind="metrics"), 600,
                    "B's first step")
    claimed_a = _event_time(job, "Running (attempt")
    first_a = _event_time(job, "", kind="metrics")
    resumed_step = job.events.filter(type="metrics", created_at=first_b).first().data["step"]
    job_cancel(organization=organization, actor=actor, job=job)
    fresh = (first_a - claimed_a).total_seconds()
    resume = (first_b - claimed_b).total_seconds()
    return {
        "heartbeat_timeout_s": args.heartbeat_timeout,
        "checkpoint_step": first_checkpoint.step, "resumed_at_step": resumed_step,
        "kill_to_resumed_step_s": round(first_b.timestamp() - killed_at, 2),
        "kill_to_requeued_s": round(requeued_at - killed_at, 2),
        "requeued_to_claimed_s": round(claimed_b.timestamp() - requeued_at, 2),
        "claim_to_first_step_resumed_s": round(resume, 2),
        "baseline_claim_to_first_step_fresh_s": round(fresh, 2),
        "resume_vs_fresh_start": round(resume / fresh, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--heartbeat-timeout", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if not os.environ.get("DATABASE_URL") or not os.environ.get("REDIS_URL"):
        raise SystemExit("set DATABASE_URL (PostgreSQL) and REDIS_URL: nodes share nothing else")
    scratch = Path(tempfile.mkdtemp(prefix="failover-", dir=REPO / "var"))
    s3, storage_env = _start_s3(scratch)
    processes = [s3]
    try:
        os.environ.update(storage_env, TUNEPLEX_DATA_DIR=str(scratch / "control"),
                          TUNEPLEX_MODELS_DIR=str(REPO / "var" / "models"),
                          TUNEPLEX_ENGINE_MODE="off",
                          TUNEPLEX_JOB_HEARTBEAT_TIMEOUT=str(args.heartbeat_timeout),
                          DJANGO_SETTINGS_MODULE="tuneplex.settings")
        import django

        django.setup()
        shared = {**storage_env, "TUNEPLEX_MODELS_DIR": str(REPO / "var" / "models"),
                  "TUNEPLEX_ENGINE_MODE": "off"}
        processes.append(_start_worker("default", "default,statistics", scratch / "control", shared))
        args.node_a = _start_worker("node-a", "gpu", scratch / "node-a", shared)
        processes.append(args.node_a)

        def start_node_b() -> None:
            processes.append(_start_worker("node-b", "gpu", scratch / "node-b", shared))

        args.start_node_b = start_node_b
        result = run(args)
    finally:
        for process in reversed(processes):
            stop_process_group(process, timeout=30)
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
