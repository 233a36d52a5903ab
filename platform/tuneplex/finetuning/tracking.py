"""Experiment tracking of a running job: its integrations (finetuning/integrations.py) as
trackers that the GPU worker's runner feeds at its natural points.

    start      the job's settings as parameters (``job_parameters``)
    each step  the trainer's numeric metrics at their step
    success    the adapter's directory as an artifact
    end        the attempt's status

A tracker is one small interface (``Tracker``): MLflow through its official client against the
operator's tracking server (``MlflowTracker``), W&B through the official ``wandb`` package,
offline (files only, stored with the job) or online with the organization's key
(``WandbTracker``). A failing tracker (server down, bad key) never fails or slows the training:
each is fed from its own thread, and its first failure is logged, reported once as a job event
("MLflow tracking failed: ..."), and the tracker dropped. No tracker call runs under a database
lock; the runner waits for them only once the attempt has ended, at most
TUNEPLEX_TRACKING_DRAIN_SECONDS.
"""

from __future__ import annotations

import json
import logging
import math
import queue
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from django.conf import settings
from django.db import connection

from tuneplex.core.redact import client_message
from tuneplex.finetuning.models import FineTuningJob
from tuneplex.tenancy.secrets import SecretUnreadable
from tuneplex.tenancy.selectors import organization_wandb_api_key

log = logging.getLogger(__name__)

# The statuses an attempt ends with (the runner's outcomes).
SUCCEEDED, FAILED, CANCELLED, REQUEUED, SUPERSEDED = (
    "succeeded", "failed", "cancelled", "requeued", "superseded")
MAX_PENDING = 10_000  # calls waiting for one tracker; past that, metrics are dropped
WANDB_DIRECTORY = "wandb"  # W&B's folder (of run directories) in the attempt's tracking folder


class TrackingError(Exception):
    """A tracker that cannot run, with the reason a tenant may read."""


class Tracker(Protocol):
    name: str  # as a job event names it: "MLflow", "W&B"

    def start(self) -> None: ...

    def log_params(self, params: dict[str, Any]) -> None: ...

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None: ...

    def log_adapter(self, path: Path) -> None: ...

    def finish(self, status: str) -> None: ...

    def redact(self, text: str) -> str:
        """``text`` without what a tenant must not read (the server's address, a key)."""
        ...


# --- what is tracked -------------------------------------------------------------------------


def job_parameters(job: FineTuningJob) -> dict[str, Any]:
    """The job as parameters: what it is, its hyperparameters as requested, and every trainer
    setting it runs with (``training.*``, as the job object's ``training`` lists them)."""
    params: dict[str, Any] = {
        "job_id": job.id, "model": (job.lineage or {}).get("model") or job.base_model.name,
        "base_model": job.base_model.name, "method_type": job.method_type,
        "training_file": job.training_file, "validation_file": job.validation_file or None,
        "suffix": job.suffix or None}
    params.update({f"hyperparameters.{key}": value
                   for key, value in (job.hyperparameters or {}).items()})
    params.update({f"training.{key}": value for key, value in (job.config or {}).items()})
    return params


def step_metrics(data: dict[str, Any]) -> tuple[int, dict[str, float]] | None:
    """A trainer metrics message as (step, its finite numeric values), or None without a step."""
    step = data.get("step")
    if not isinstance(step, int) or isinstance(step, bool):
        return None
    values = {key: float(value) for key, value in data.items()
              if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)
              and math.isfinite(value)}
    return step, values


def _default_tags(job: FineTuningJob) -> dict[str, str]:
    return {"tuneplex.job_id": job.id, "tuneplex.organization": job.organization.slug,
            "tuneplex.base_model": job.base_model.name}


# --- MLflow ----------------------------------------------------------------------------------

MLFLOW_STATUS = {SUCCEEDED: "FINISHED", FAILED: "FAILED", CANCELLED: "KILLED",
                 REQUEUED: "SCHEDULED"}  # a superseded attempt leaves the run to the next one
MLFLOW_PARAM_VALUE_MAX = 6000  # mlflow.utils.validation.MAX_PARAM_VAL_LENGTH
MLFLOW_BATCH = 100  # params a log_batch call


class MlflowTracker:
    """One MLflow run per job in experiment ``<organization slug>/<experiment_name>`` (tenants
    share the operator's server, so each organization's experiments have its own prefix). A
    later attempt continues the job's run, found by its ``tuneplex.job_id`` tag."""

    name = "MLflow"

    def __init__(self, *, job: FineTuningJob, options: dict[str, Any], tracking_uri: str) -> None:
        self.tracking_uri = tracking_uri
        self.experiment_name = f"{job.organization.slug}/{options['experiment_name']}"
        self.run_name = options.get("run_name") or job.id
        self.tags = {**(options.get("tags") or {}), **_default_tags(job)}
        self.job_id = job.id
        self.client: Any = None
        self.run_id = ""

    def redact(self, text: str) -> str:
        return text.replace(self.tracking_uri.rstrip("/"), "the tracking server")

    def start(self) -> None:
        from mlflow import MlflowClient

        self.client = MlflowClient(tracking_uri=self.tracking_uri)
        experiment_id = self._experiment_id()
        found = self.client.search_runs(
            [experiment_id], filter_string=f"tags.`tuneplex.job_id` = '{self.job_id}'",
            max_results=1)
        if found:
            self.run_id = found[0].info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            self.run_id = self.client.create_run(experiment_id, run_name=self.run_name,
                                                 tags=self.tags).info.run_id

    def _experiment_id(self) -> str:
        from mlflow.exceptions import MlflowException

        experiment = self.client.get_experiment_by_name(self.experiment_name)
        if experiment is not None:
            if experiment.lifecycle_stage != "active":
                raise TrackingError(f"the experiment {self.experiment_name!r} is deleted")
            return experiment.experiment_id
        try:
            return self.client.create_experiment(self.experiment_name)
        except MlflowException as exc:  # another job created it meanwhile
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            return self.client.get_experiment_by_name(self.experiment_name).experiment_id

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        entries = [Param(key, _param_text(value)) for key, value in params.items()]
        for start in range(0, len(entries), MLFLOW_BATCH):
            self.client.log_batch(self.run_id, params=entries[start:start + MLFLOW_BATCH],
                                  synchronous=True)

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(key, value, now, step)
                                                    for key, value in metrics.items()],
                              synchronous=True)

    def log_adapter(self, path: Path) -> None:
        self.client.log_artifacts(self.run_id, str(path), artifact_path="adapter")

    def finish(self, status: str) -> None:
        if status in MLFLOW_STATUS:
            self.client.set_terminated(self.run_id, MLFLOW_STATUS[status])


def _param_text(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text[:MLFLOW_PARAM_VALUE_MAX]


# --- W&B -------------------------------------------------------------------------------------


class WandbTracker:
    """A W&B run with the job's id as its run id (OpenAI's default name, the job id, too).

    Offline (TUNEPLEX_WANDB_MODE=offline, the default): W&B writes its run directory into the
    attempt's tracking folder and the runner stores it with the job; the adapter's files go into
    the run's files, so that `wandb sync` of the directory alone carries everything. Online: the
    run is sent with the organization's key and the adapter is a `model` artifact."""

    name = "W&B"

    def __init__(self, *, job: FineTuningJob, options: dict[str, Any], directory: Path,
                 mode: str, api_key: str | None) -> None:
        self.job_id = job.id
        self.options = options
        self.directory = directory
        self.mode = mode
        self.api_key = api_key
        self.tags = ([f"tuneplex/{name}"[:64] for name in ("finetune", job.base_model.name,
                                                            job.id)]
                     + list(options.get("tags") or []))
        self.run: Any = None

    def redact(self, text: str) -> str:
        return text.replace(self.api_key, "<key>") if self.api_key else text

    def start(self) -> None:
        import wandb

        self.directory.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            mode=self.mode, dir=str(self.directory), project=self.options["project"],
            entity=self.options.get("entity"), name=self.options.get("name") or self.job_id,
            id=self.job_id, tags=self.tags, job_type="fine-tune",
            resume="allow" if self.mode == "online" else None,
            settings=wandb.Settings(
                api_key=self.api_key, reinit="create_new", silent=True,
                # A worker process, not a script: no console capture, no git or code, no
                # system metrics of the worker (the trainer is another process).
                console="off", disable_git=True, save_code=False, x_disable_stats=True,
                x_disable_meta=True, x_save_requirements=False))

    def log_params(self, params: dict[str, Any]) -> None:
        self.run.config.update(params, allow_val_change=True)

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(metrics, step=step)

    def log_adapter(self, path: Path) -> None:
        if self.mode == "offline":
            target = Path(self.run.dir) / "adapter"
            shutil.copytree(path, target, dirs_exist_ok=True)
            self.run.save(str(target / "*"), base_path=self.run.dir, policy="now")
            return
        import wandb

        artifact = wandb.Artifact(f"adapter-{self.job_id}", type="model",
                                  metadata={"fine_tuning_job": self.job_id})
        artifact.add_dir(str(path))
        self.run.log_artifact(artifact)

    def finish(self, status: str) -> None:
        self.run.finish(exit_code=0 if status == SUCCEEDED else 1)


def wandb_run_files(directory: Path) -> list[tuple[Path, list[str]]]:
    """W&B's run directories under an attempt's tracking folder, each with what `wandb sync`
    needs of it: its .wandb file and its files/ (not the logs, nor W&B's symbolic links)."""
    runs = []
    for run_dir in sorted((directory / WANDB_DIRECTORY).glob("*run-*")):
        if not run_dir.is_dir() or run_dir.is_symlink():
            continue
        names = [path.relative_to(run_dir).as_posix() for path in sorted(run_dir.rglob("*"))
                 if path.is_file() and not path.is_symlink()
                 and (path.suffix == ".wandb" and path.parent == run_dir
                      or path.relative_to(run_dir).parts[0] == "files")]
        if names:
            runs.append((run_dir, names))
    return runs


# --- opening and feeding ---------------------------------------------------------------------


class _Refused:
    """A tracker that cannot run (its settings are gone, the key cannot be read): its start
    raises, so it is reported once and dropped like any failing tracker."""

    def __init__(self, name: str, reason: str) -> None:
        self.name, self.reason = name, reason

    def redact(self, text: str) -> str:
        return text

    def start(self) -> None:
        raise TrackingError(self.reason)


def open_trackers(job: FineTuningJob, *, directory: Path) -> list[Tracker]:
    """The job's trackers, writing their local files under ``directory``. Reads the database
    (the organization's key), sends nothing: each tracker starts on its own thread."""
    trackers: list[Any] = []
    for integration in job.integrations or []:
        kind = integration.get("type")
        options = integration.get(kind) or {}
        if kind == "mlflow":
            if not settings.MLFLOW_TRACKING_URI:
                trackers.append(_Refused("MLflow", "this platform no longer has a tracking "
                                                   "server (TUNEPLEX_MLFLOW_TRACKING_URI)"))
                continue
            trackers.append(MlflowTracker(job=job, options=options,
                                          tracking_uri=settings.MLFLOW_TRACKING_URI))
        elif kind == "wandb":
            api_key = None
            if settings.WANDB_MODE == "online":
                try:
                    api_key = organization_wandb_api_key(organization=job.organization)
                except SecretUnreadable as exc:
                    trackers.append(_Refused("W&B", str(exc)))
                    continue
                if api_key is None:
                    trackers.append(_Refused("W&B", "the organization's W&B API key is not set "
                                                    "(POST /v1/organization/integrations/wandb)"))
                    continue
            trackers.append(WandbTracker(job=job, options=options, mode=settings.WANDB_MODE,
                                         directory=directory, api_key=api_key))
    return trackers


ReportFailure = Callable[[str, dict[str, Any]], None]


class _Feed:
    """One tracker fed from its own thread: one that hangs (a server that does not answer, a
    client retrying) holds up neither the training nor the other trackers."""

    def __init__(self, tracker: Tracker, report: ReportFailure, job_id: str) -> None:
        self.tracker = tracker
        self.report = report
        self.calls: queue.Queue = queue.Queue(maxsize=MAX_PENDING)
        self.failed = False
        self.finished = False
        self._reported = False
        self._dropping = False
        self._lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, daemon=True,
                                       name=f"tracking-{tracker.name}-{job_id}")
        self.thread.start()

    def put(self, method: str, *args: Any) -> None:
        if self.failed:
            return
        try:
            self.calls.put_nowait((method, args))
        except queue.Full:
            if not self._dropping:
                self._dropping = True
                log.warning("%s tracking is %s calls behind; dropping new ones",
                            self.tracker.name, MAX_PENDING)

    def end(self, status: str, deadline: float) -> None:
        """Queue the finish (waiting for room until ``deadline``) and the thread's end."""
        if self.failed:
            return
        for call in (("finish", (status,)), None):
            try:
                self.calls.put(call, timeout=max(0.0, deadline - time.monotonic()))
            except queue.Full:
                return

    def _run(self) -> None:
        try:
            self.tracker.start()
            while (call := self.calls.get()) is not None:
                method, args = call
                getattr(self.tracker, method)(*args)
            self.finished = True
        except Exception as exc:  # noqa: BLE001 - whatever a tracker raises, training goes on
            self.failed = True
            log.warning("%s tracking failed; dropping it", self.tracker.name, exc_info=True)
            text = str(exc) if isinstance(exc, TrackingError) else f"{type(exc).__name__}: {exc}"
            self.fail(client_message(self.tracker.redact(text)) or type(exc).__name__)
        finally:
            connection.close()  # the report's, if it wrote one from this thread

    def fail(self, reason: str) -> None:
        """Report the failure once (the thread and the runner's deadline may both see one)."""
        with self._lock:
            if self._reported:
                return
            self._reported = True
        self.failed = True
        name = self.tracker.name
        self.report(f"{name} tracking failed: {reason}. The job goes on without it.",
                    {"integration": name, "reason": reason})


class Tracking:
    """A job attempt's trackers, fed without blocking: the runner calls these from its own
    thread (the trainer's output loop), and each call is queued for each live tracker."""

    def __init__(self, trackers: list[Tracker], *, report: ReportFailure, job_id: str) -> None:
        self.feeds = [_Feed(tracker, report, job_id) for tracker in trackers]

    def params(self, params: dict[str, Any]) -> None:
        for feed in self.feeds:
            feed.put("log_params", params)

    def metrics(self, data: dict[str, Any]) -> None:
        point = step_metrics(data)
        if point is not None and point[1]:
            for feed in self.feeds:
                feed.put("log_metrics", *point)

    def adapter(self, path: Path) -> None:
        for feed in self.feeds:
            feed.put("log_adapter", path)

    def close(self, status: str, *, timeout: float) -> None:
        """End every tracker with the attempt's ``status``, waiting at most ``timeout`` seconds
        in all; one still busy then is reported as failed and left to its (daemon) thread."""
        deadline = time.monotonic() + timeout
        for feed in self.feeds:
            feed.end(status, deadline)
        for feed in self.feeds:
            feed.thread.join(max(0.0, deadline - time.monotonic()))
        for feed in self.feeds:
            if feed.thread.is_alive():
                feed.fail(f"it had not finished {timeout:g} s after the attempt ended (the "
                          "server did not answer in time); what it had not sent is lost")
