"""GPU workers' membership, written by the workers themselves: starting another GPU worker adds
its GPUs to the scheduler's slots with no configuration edit and no restart.

A Celery worker consuming the ``gpu`` queue registers when it is ready (Celery's
``worker_ready``, heard by :mod:`tuneplex.finetuning.worker_signals`): its name, its node and the
GPUs it sees (:func:`tuneplex.finetuning.gpus.visible_devices`). A thread of its main process
renews the row's heartbeat every TUNEPLEX_GPU_WORKER_HEARTBEAT_SECONDS, writes the row again when
it is gone (swept while the worker was paused or cut off), and deletes the rows of workers that
missed three beats. A clean stop (``worker_shutdown``) deletes its row at once; a killed worker
stops counting after three beats (``selectors.gpu_capacity``). Timestamps are the database's
clock, never a worker's.

Registering sends a dispatch after the commit: waiting work may start on the GPUs that joined
(beat's sweep dispatches every 10 s anyway, so a lost message only delays it).
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Iterable
from dataclasses import dataclass

from django.conf import settings
from django.db import DatabaseError, connections, transaction
from django.db.models.functions import Now

from tuneplex.core import queue
from tuneplex.finetuning.gpus import visible_devices
from tuneplex.finetuning.models import GpuWorker
from tuneplex.finetuning.selectors import gpu_workers_silent

log = logging.getLogger(__name__)
# The queue training and merges are routed to (CELERY_TASK_ROUTES): its workers are GPU workers.
GPU_QUEUE = settings.CELERY_TASK_ROUTES["tuneplex.train.*"]["queue"]


@dataclass(frozen=True)
class Member:
    name: str
    node: str
    gpus: int


def gpu_worker_register(*, member: Member) -> None:
    """The worker's row, written afresh; a dispatch is sent after the commit."""
    with transaction.atomic():
        GpuWorker.objects.filter(name=member.name).delete()
        GpuWorker.objects.create(name=member.name, node=member.node, gpus=member.gpus,
                                 started_at=Now(), heartbeat_at=Now())
        transaction.on_commit(_dispatch_soon)
    log.info("GPU worker %s registered with %s GPU(s) on %s", member.name, member.gpus, member.node)


def gpu_worker_beat(*, member: Member) -> None:
    """One heartbeat: renew the row (or write it again when it was swept), sweep silent peers."""
    if not GpuWorker.objects.filter(name=member.name).update(heartbeat_at=Now()):
        log.warning("GPU worker %s: its registration was gone (it missed its beats); "
                    "registering again", member.name)
        gpu_worker_register(member=member)
    gpu_workers_sweep()


def gpu_workers_sweep() -> list[str]:
    """Delete the rows of workers that missed three beats; the names deleted."""
    silent = list(gpu_workers_silent().values_list("name", flat=True))
    if silent:
        gpu_workers_silent().filter(name__in=silent).delete()  # unless one beat meanwhile
        log.warning("GPU workers stopped heartbeating, no longer counted: %s", ", ".join(silent))
    return silent


def gpu_worker_leave(*, name: str) -> None:
    GpuWorker.objects.filter(name=name).delete()
    log.info("GPU worker %s left", name)


def _dispatch_soon() -> None:
    try:
        queue.enqueue(queue.DISPATCH_JOBS)
    except Exception as exc:  # noqa: BLE001 - the broker may be down; beat's sweep dispatches too
        log.warning("could not send a dispatch after a GPU worker joined: %s", exc)


# --- the worker's side: its Celery signals call these two -------------------------------------


class _Heartbeat(threading.Thread):
    """Beats for this process's registration until stopped; a failed beat is retried at the
    next one (the row outlives three missed beats only if the database is unreachable)."""

    def __init__(self, member: Member):
        super().__init__(name="gpu-worker-heartbeat", daemon=True)
        self.member = member
        self.stopped = threading.Event()
        self.failing = False

    def run(self) -> None:
        while not self.stopped.wait(settings.GPU_WORKER_HEARTBEAT_SECONDS):
            try:
                gpu_worker_beat(member=self.member)
                if self.failing:
                    log.info("GPU worker %s: heartbeats written again", self.member.name)
                self.failing = False
            except DatabaseError as exc:
                if not self.failing:  # once per outage, not every beat
                    log.warning("GPU worker %s: heartbeat failed: %s", self.member.name, exc)
                self.failing = True
            finally:
                connections.close_all()  # this thread's; no connection kept between beats

    def stop(self) -> None:
        self.stopped.set()
        self.join(timeout=settings.GPU_WORKER_HEARTBEAT_SECONDS + 10)


_heartbeat: _Heartbeat | None = None  # set in a GPU worker's main process once it registered


def gpu_worker_join(*, name: str, queues: Iterable[str]) -> bool:
    """A worker is ready: if it consumes the ``gpu`` queue, register it and start beating.
    Whether it joined."""
    global _heartbeat
    if GPU_QUEUE not in set(queues) or _heartbeat is not None:
        return False
    member = Member(name=name, node=socket.gethostname(), gpus=len(visible_devices()))
    try:
        gpu_worker_register(member=member)
    except DatabaseError as exc:  # its first beat registers it
        log.warning("GPU worker %s: registering failed (%s); retrying at each heartbeat", name, exc)
    finally:
        connections.close_all()  # the main process keeps none open (pool processes fork from it)
    _heartbeat = _Heartbeat(member)
    _heartbeat.start()
    return True


def gpu_worker_quit() -> None:
    """The worker stops cleanly: stop beating, then leave (nothing in any other process)."""
    global _heartbeat
    if _heartbeat is None:
        return
    heartbeat, _heartbeat = _heartbeat, None
    heartbeat.stop()
    try:
        gpu_worker_leave(name=heartbeat.member.name)
    except DatabaseError as exc:  # it stops counting after three beats instead
        log.warning("GPU worker %s: leaving failed: %s", heartbeat.member.name, exc)
    finally:
        connections.close_all()
