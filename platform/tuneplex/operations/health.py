"""/healthz (the process answers) and /readyz (database, broker and storage reachable, and the
serving pool).

A failed database, broker or storage check makes the process not ready (503). The serving pool
is reported separately: when no replica of a served base model is up, /readyz answers 200 with
status ``degraded`` and the reason under ``checks.serving``. The dashboard, the API and training
keep working without an engine, so taking every web process out of a load balancer because the
engines are down would turn an inference outage into a full one; a probe that cares about
inference reads ``degraded``.

/readyz is public (load balancers and kubelets call it without credentials) and its checks cost
a database query, a broker connection and a storage write, so it is bounded: each process runs
the checks at most once per ``TUNEPLEX_READYZ_CACHE_SECONDS`` (one run at a time; callers
meanwhile get the last result), each client address may call it ``TUNEPLEX_READYZ_RATE_LIMIT``
times a minute in each process (then 429 with Retry-After; counted in memory, so that the probe
needs no Redis), and which part failed, and why (exception text, addresses), is shown to operators
only: direct callers from the monitoring networks (this machine by default), holders of the
metrics token, and staff users.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from django.conf import settings
from django.core.files.base import ContentFile
from django.core.files.storage import storages
from django.db import connection
from django.http import JsonResponse
from django.views.decorators.http import require_GET

from tuneplex.core.errors import error_body

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


@dataclass(frozen=True)
class Readiness:
    checks: dict[str, str]
    failed: list[str]
    degraded: list[str]

    @property
    def status(self) -> str:
        return "unavailable" if self.failed else "degraded" if self.degraded else "ok"


def run_checks() -> Readiness:
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
    return Readiness(results, failed, degraded)


clock: Callable[[], float] = time.monotonic  # the tests move time on


class _LastResult:
    """The checks' last result in this process, run again once it is older than the setting, by
    one caller at a time (the others meanwhile get the last result, or wait for the first).
    The lock guards the bookkeeping only: the checks run outside it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._value: Readiness | None = None
        self._taken_at = -math.inf
        self._running: threading.Event | None = None

    def get(self, run: Callable[[], Readiness], max_age: float) -> Readiness:
        with self._lock:
            if self._value is not None and clock() - self._taken_at < max_age:
                return self._value
            running = self._running
            if running is None:
                self._running = done = threading.Event()
        if running is not None:  # another caller is running the checks
            if self._value is not None:
                return self._value
            running.wait()
            return self._value or run()
        try:
            value = run()
            with self._lock:
                self._value, self._taken_at = value, clock()
            return value
        finally:
            with self._lock:
                self._running = None
            done.set()

    def forget(self) -> None:
        with self._lock:
            self._value, self._taken_at = None, -math.inf


class _CallsPerAddress:
    """Calls per client address in fixed one-minute windows, in this process. The table is
    bounded: beyond its size the least recently seen addresses are forgotten, which can only
    loosen the limit for them (the cached result bounds the cost either way)."""

    WINDOW = 60.0

    def __init__(self, size: int = 10_000) -> None:
        self._lock = threading.Lock()
        self._size = size
        self._windows: OrderedDict[str, tuple[float, int]] = OrderedDict()

    def refused_for(self, address: str, limit: int) -> float | None:
        """None when the call is allowed, else the seconds until it would be."""
        now = clock()
        with self._lock:
            started, calls = self._windows.pop(address, (now, 0))
            if now - started >= self.WINDOW:
                started, calls = now, 0
            self._windows[address] = (started, calls + 1)
            while len(self._windows) > self._size:
                self._windows.popitem(last=False)
        return None if calls < limit else self.WINDOW - (now - started)

    def forget(self) -> None:
        with self._lock:
            self._windows.clear()


last_result = _LastResult()
calls_per_address = _CallsPerAddress()


@require_GET
def readyz(request):
    address = request.META.get("REMOTE_ADDR") or "-"
    if settings.READYZ_RATE_LIMIT:
        wait = calls_per_address.refused_for(address, settings.READYZ_RATE_LIMIT)
        if wait is not None:
            response = JsonResponse(error_body(
                "rate_limit_exceeded", f"/readyz answers {settings.READYZ_RATE_LIMIT} calls a "
                                       f"minute from one address."), status=429)
            response["Retry-After"] = str(max(1, math.ceil(wait)))
            return response
    readiness = last_result.get(run_checks, settings.READYZ_CACHE_SECONDS)
    body = {"status": readiness.status}
    if is_operator(request):  # which part failed, and why
        body |= {"checks": readiness.checks, "failed": readiness.failed,
                 "degraded": readiness.degraded,
                 "database_engine": settings.DATABASES["default"]["ENGINE"].rsplit(".", 1)[-1],
                 "broker": "redis" if settings.REDIS_URL else "filesystem"}
    response = JsonResponse(body, status=503 if readiness.failed else 200)
    response["Cache-Control"] = "no-store"
    return response


def is_operator(request) -> bool:
    """A direct caller from the monitoring networks (this machine by default), a holder of the
    metrics token, or a signed-in staff user; never an organization's admin as such."""
    from tuneplex.core.metrics import may_scrape

    if may_scrape(request.META.get("REMOTE_ADDR"), request.headers.get("Authorization"),
                  proxied="HTTP_X_FORWARDED_FOR" in request.META):
        return True
    user = getattr(request, "user", None)
    return bool(user is not None and user.is_authenticated and user.is_staff and user.is_active)
