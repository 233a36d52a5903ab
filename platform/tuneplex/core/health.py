"""/healthz (the process answers) and /readyz (database, broker and storage reachable, and the
serving pool).

A failed database, broker or storage check makes the process not ready (503). The serving pool
is reported separately: when no replica of a served base model is up, /readyz answers 200 with
status ``degraded`` and the reason under ``checks.serving``. The dashboard, the API and training
keep working without an engine, so taking every web process out of a load balancer because the
engines are down would turn an inference outage into a full one; a probe that cares about
inference reads ``degraded``.
"""

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


def _check_serving() -> str | None:
    """None when every served base model has a replica up, else why not."""
    from tuneplex.inference.pools import serving_health

    down = [f"no healthy replica for {base}: {reason}"
            for base, (up, reason) in serving_health().items() if not up]
    return "; ".join(down) or None


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
    degraded = []
    try:
        problem = _check_serving()
    except Exception as exc:  # noqa: BLE001 - reported like the others
        problem = f"{exc.__class__.__name__}: {exc}"
    if settings.ENGINE_REPLICAS:
        results["serving"] = "ok" if problem is None else f"error: {problem}"[:300]
        if problem is not None:
            log.warning("readiness: serving degraded: %s", problem)
            degraded.append("serving")
    status = "unavailable" if failed else "degraded" if degraded else "ok"
    body = {"status": status}
    if _may_see_detail(request):  # which part failed, and why: operators only
        body |= {"checks": results, "failed": failed, "degraded": degraded,
                 "database_engine": settings.DATABASES["default"]["ENGINE"].rsplit(".", 1)[-1],
                 "broker": "redis" if settings.REDIS_URL else "filesystem"}
    return JsonResponse(body, status=200 if not failed else 503)


LOOPBACK = {"127.0.0.1", "::1"}


def _may_see_detail(request) -> bool:
    """A caller on this machine (not through a proxy), or an admin (session or admin-scoped key)."""
    if request.META.get("REMOTE_ADDR") in LOOPBACK and "HTTP_X_FORWARDED_FOR" not in request.META:
        return True
    from rest_framework.exceptions import AuthenticationFailed
    from rest_framework.request import Request

    from tuneplex.apikeys.authentication import ApiKeyAuthentication
    from tuneplex.core.scopes import ADMIN
    from tuneplex.tenancy.sessions import active_membership

    try:
        found = ApiKeyAuthentication().authenticate(Request(request))
    except AuthenticationFailed:
        return False
    if found is not None:
        return ADMIN in found[1].scopes
    membership = active_membership(request)
    return membership is not None and ADMIN in membership.scopes
