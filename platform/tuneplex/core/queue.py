"""The one way the platform enqueues Celery work: by task name, never by importing jobs.tasks.

``jobs/tasks.py`` defines the tasks and may import the platform; the platform only knows their
names (below) and sends messages through the Celery app. Routing (which queue a name goes to) is
``CELERY_TASK_ROUTES`` in settings, so a message sent here and one sent by a task agree.

Queues: ``default`` (job validation, dispatch, sweeps, pings), ``statistics`` (dataset
statistics, which can take minutes for a large file and must not hold up the scheduler) and
``gpu`` (training and merges; one worker process per GPU), ``evals`` (background inference:
eval runs and batches, which wait on the serving pool for minutes or hours) and ``exports``
(an adapter's model converted to another format: CPU work in the trainer's environment).
"""

from __future__ import annotations

from typing import Any

PING = "tuneplex.ping"
FILE_STATISTICS = "tuneplex.files.statistics"
VALIDATE_JOB_FILES = "tuneplex.jobs.validate_files"
DISPATCH_JOBS = "tuneplex.jobs.dispatch"
TRAIN_JOB = "tuneplex.train.run"
MERGE_ADAPTER = "tuneplex.train.merge"
EVAL_RUN = "tuneplex.evals.run"
BATCH_RUN = "tuneplex.batches.run"
EXPORT_RUN = "tuneplex.exports.run"
EXPORTS_AFTER_MERGE = "tuneplex.exports.after_merge"


def enqueue(task_name: str, *args: Any) -> None:
    """Send one message for ``task_name`` with positional ``args`` (ids: JSON-serialisable)."""
    from jobs.celery import app

    app.send_task(task_name, args=list(args))
