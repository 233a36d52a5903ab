"""Celery tasks: the platform's work as the broker sees it, by name.

Thin: each task takes ids and makes one call into one platform entry point, which re-reads the
rows and does the work (tests/platform/test_architecture.py keeps it so). The platform enqueues
them by name (``tuneplex.core.queue``), never by importing this module.
"""

from __future__ import annotations

from jobs.celery import app


@app.task(name="tuneplex.ping", ignore_result=True)
def ping(token: str) -> None:
    """Proves a worker consumes the queue; ``manage.py check_worker`` sends one and waits."""
    from tuneplex.core.worker_ping import ping_answer

    ping_answer(token)


# Idempotent (the row is claimed with a conditional UPDATE), so late acknowledgement is safe:
# a worker that dies mid-task has the message redelivered.
@app.task(name="tuneplex.files.statistics", ignore_result=True, acks_late=True,
          reject_on_worker_lost=True)
def compute_file_statistics(file_id: str) -> None:
    from tuneplex.files.statistics import compute_statistics

    compute_statistics(file_id)


@app.task(name="tuneplex.files.uploads_clean", ignore_result=True)
def clean_uploads() -> None:
    """Celery beat, every minute: expire uploads past their time and delete the parts of
    uploads that ended (idempotent: a second delivery finds nothing left to delete)."""
    from tuneplex.files.upload_services import uploads_clean

    uploads_clean()


# --- fine-tuning -----------------------------------------------------------------------------------


@app.task(name="tuneplex.jobs.validate_files", ignore_result=True, acks_late=True)
def validate_job_files(job_id: str) -> None:
    """validating_files → queued, then try to dispatch. Idempotent (a conditional UPDATE)."""
    from tuneplex.finetuning.scheduler import validated_then_dispatch

    validated_then_dispatch(job_id)


@app.task(name="tuneplex.jobs.dispatch", ignore_result=True)
def dispatch_jobs() -> None:
    from tuneplex.finetuning.scheduler import dispatch

    dispatch()


@app.task(name="tuneplex.sweep", ignore_result=True)
def sweep() -> None:
    """Celery beat, every 10 s: re-queue or fail jobs whose worker stopped heartbeating, re-send
    or fail lost validation, statistics and merge work, and dispatch into free GPU slots."""
    from tuneplex.finetuning.scheduler import sweep

    sweep()


# Late acknowledgement, so a message taken by a worker that dies before claiming the job is
# delivered again. A redelivery of a job already claimed (a Redis visibility timeout shorter than
# the run, or a reaper re-dispatch) finds the row no longer "queued and dispatched" and does
# nothing: the row's conditional claim, not the broker, guarantees one training at a time.
# No time limit: cancellation and the reaper bound a run instead.
@app.task(name="tuneplex.train.run", ignore_result=True, acks_late=True)
def train_job(job_id: str) -> str:
    from tuneplex.finetuning.runner import run_job

    return run_job(job_id)


@app.task(name="tuneplex.train.merge", ignore_result=True)
def merge_adapter(adapter_id: str) -> None:
    from tuneplex.adapters.merging import run_merge

    run_merge(adapter_id)


# --- evaluation ------------------------------------------------------------------------------------

# Late acknowledgement: a run taken by a worker that dies is delivered again. The run row's
# conditional claim makes a second delivery of a claimed run do nothing; the evals sweep queues a
# run whose worker went silent again, and the next attempt resumes after the items stored.
@app.task(name="tuneplex.evals.run", ignore_result=True, acks_late=True)
def run_eval(run_id: str) -> str:
    from tuneplex.evals.executor import run_eval

    return run_eval(run_id)


@app.task(name="tuneplex.evals.sweep", ignore_result=True)
def sweep_evals() -> None:
    """Celery beat, every 10 s: re-queue eval runs whose worker stopped heartbeating."""
    from tuneplex.evals.executor import sweep

    sweep()


# --- batches ---------------------------------------------------------------------------------------

# On the `evals` queue (background inference). Late acknowledgement: a batch taken by a worker that
# dies is delivered again. The batch row's conditional claim makes a second delivery of a claimed
# batch do nothing; the batches sweep releases a batch whose worker went silent, and the next
# attempt goes on after the lines already sent (never sending again one left in flight).
@app.task(name="tuneplex.batches.run", ignore_result=True, acks_late=True)
def run_batch(batch_id: str) -> str:
    from tuneplex.batches.executor import run_batch

    return run_batch(batch_id)


@app.task(name="tuneplex.batches.sweep", ignore_result=True)
def sweep_batches() -> None:
    """Celery beat, every 10 s: release batches whose worker stopped heartbeating, resend lost ones."""
    from tuneplex.batches.executor import sweep

    sweep()


# --- exports ---------------------------------------------------------------------------------------

# On the `exports` queue (CPU, the trainer's environment). Late acknowledgement: an export taken by
# a worker that dies before claiming it is delivered again; the row's conditional claim (queued →
# running) makes any second delivery do nothing, and the exports sweep fails one whose worker died
# while running it.
@app.task(name="tuneplex.exports.run", ignore_result=True, acks_late=True)
def run_export(export_id: str) -> str:
    from tuneplex.exports.executor import run_export

    return run_export(export_id)


@app.task(name="tuneplex.exports.after_merge", ignore_result=True)
def exports_after_merge(adapter_id: str) -> None:
    """Sent by a merge that ended: the exports that waited for it go to the exports queue (or
    fail with the merge's error)."""
    from tuneplex.exports.worker_writes import exports_after_merge

    exports_after_merge(adapter_id)


@app.task(name="tuneplex.exports.sweep", ignore_result=True)
def sweep_exports() -> None:
    """Celery beat, every 10 s: fail exports whose worker died, resend lost ones."""
    from tuneplex.exports.worker_writes import exports_sweep

    exports_sweep()


# --- sweeps ----------------------------------------------------------------------------------------

@app.task(name="tuneplex.sweeps.step", ignore_result=True)
def step_sweeps() -> None:
    """Celery beat, every TUNEPLEX_SWEEP_STEP_SECONDS: each running hyperparameter sweep reports
    its trials' validation losses to Optuna, prunes, tells, and starts its next trials. Each
    sweep is claimed for its step, so a second delivery or a second beat changes nothing."""
    from tuneplex.sweeps.steps import step_all

    step_all()
