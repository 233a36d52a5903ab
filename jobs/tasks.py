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
