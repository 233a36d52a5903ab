"""Celery tasks. Thin: take ids, re-read rows, call a plain function, return."""

from __future__ import annotations

import platform

from django.core.cache import cache

from jobs.celery import app

PING_TTL_SECONDS = 300


@app.task(name="tuneplex.ping", ignore_result=True)
def ping(token: str) -> None:
    """Proves a worker consumes the queue: leaves the token in the shared cache.

    ``manage.py check_worker`` sends one and waits for it.
    """
    cache.set(f"tuneplex:ping:{token}", platform.python_version(), PING_TTL_SECONDS)


# Idempotent (the row is claimed with a conditional UPDATE), so late acknowledgement is safe:
# a worker that dies mid-task has the message redelivered.
@app.task(name="tuneplex.files.statistics", ignore_result=True, acks_late=True,
          reject_on_worker_lost=True)
def compute_file_statistics(file_id: str) -> None:
    from tuneplex.files.statistics import compute_statistics

    compute_statistics(file_id)
