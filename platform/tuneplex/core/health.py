"""/healthz (the process answers) and /readyz (database, broker and storage reachable)."""

from __future__ import annotations

import logging
import uuid

from django.conf import settings
from django.core.files.base import ContentFile
from django.core.files.storage import storages
from django.db import connection
from django.http import JsonResponse
from django.views.decorators.http import require_GET

log = logging.getLogger(__name__)


@require_GET
def healthz(request):
    return JsonResponse({"status": "ok"})


def _check_database() -> None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
        cursor.fetchone()


def _check_broker() -> None:
    from jobs.celery import app

    with app.connection_for_write() as conn:
        conn.ensure_connection(max_retries=1, timeout=2)


def _check_storage() -> None:
    storage = storages["artifacts"]
    name = storage.save(f"readyz/{uuid.uuid4().hex}", ContentFile(b"ok"))
    storage.delete(name)


CHECKS = {"database": _check_database, "broker": _check_broker, "storage": _check_storage}


@require_GET
def readyz(request):
    results: dict[str, str] = {}
    failed = []
    for name, check in CHECKS.items():
        try:
            check()
            results[name] = "ok"
        except Exception as exc:  # noqa: BLE001 - any failure means "not ready", reported by name
            log.warning("readiness check %s failed: %s", name, exc)
            results[name] = f"error: {exc.__class__.__name__}: {exc}"[:300]
            failed.append(name)
    body = {"status": "ok" if not failed else "unavailable", "checks": results,
            "failed": failed, "database_engine": settings.DATABASES["default"]["ENGINE"].rsplit(".", 1)[-1],
            "broker": "redis" if settings.REDIS_URL else "filesystem"}
    return JsonResponse(body, status=200 if not failed else 503)
