"""Proof that a Celery worker consumes the queue: the ping task leaves its token in the shared
cache, and ``manage.py check_worker``, which sent it, waits for it there."""

from __future__ import annotations

import platform

from django.core.cache import cache

PING_TTL_SECONDS = 300


def _key(token: str) -> str:
    return f"tuneplex:ping:{token}"


def ping_answer(token: str) -> None:
    """Run by the ping task, in the worker: the answer is the worker's Python version."""
    cache.set(_key(token), platform.python_version(), PING_TTL_SECONDS)


def ping_answered(token: str) -> str | None:
    """The answering worker's Python version, once a worker has run the ping task."""
    return cache.get(_key(token))
