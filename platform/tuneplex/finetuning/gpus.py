"""Which of this node's GPUs a job's trainer runs on: node-local leases on lock files.

A GPU worker sees its node's GPUs (CUDA_VISIBLE_DEVICES, or 0..TUNEPLEX_JOB_MAX_GPUS-1 when
unset) and runs with ``--concurrency`` equal to their number. Each task leases as many as its job
asks for (``gpus``) by taking an exclusive ``flock`` on ``<data dir>/gpu-leases/<device>.lock``
for each, all or none, and starts its trainer with CUDA_VISIBLE_DEVICES set to them. The kernel
drops a lock when its holder exits, even by SIGKILL, so a lease never outlives its task.

The scheduler counts GPUs over the whole cluster (each registered GPU worker counts
``len(visible_devices())``, or TUNEPLEX_GPU_SLOTS where set); a job dispatched to a node whose
free GPUs are fewer than it needs (the cluster had room, spread over other nodes) waits here for
them, heartbeating, rather than running on too few.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Callable, Iterator

from django.conf import settings

POLL_SECONDS = 2.0


class NotEnoughGpus(Exception):
    """The job needs more GPUs than this worker sees at all."""


def visible_devices() -> list[str]:
    listed = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    if listed:
        return [device.strip() for device in listed.split(",") if device.strip()]
    return [str(index) for index in range(settings.JOB_MAX_GPUS)]


def _try_lock(device: str) -> int | None:
    folder = settings.DATA_DIR / "gpu-leases"
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / f"{device}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _release(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)  # closing the descriptor drops its flock


@contextlib.contextmanager
def lease(count: int, *, give_up: Callable[[], bool] = lambda: False,
          on_wait: Callable[[int], None] = lambda free: None) -> Iterator[list[str]]:
    """``count`` of this node's GPUs, held until the block ends. Waits while fewer are free
    (calling ``on_wait(free)`` once); stops waiting with TimeoutError once ``give_up()``."""
    devices = visible_devices()
    if count > len(devices):
        raise NotEnoughGpus(f"the job needs {count} GPUs and this worker sees {len(devices)}")
    waited = False
    while True:
        taken: dict[str, int] = {}
        for device in devices:
            if len(taken) == count:
                break
            fd = _try_lock(device)
            if fd is not None:
                taken[device] = fd
        if len(taken) == count:
            break
        _release(list(taken.values()))  # all or none: two waiting jobs never deadlock
        if give_up():
            raise TimeoutError("stopped waiting for GPUs")
        if not waited:
            on_wait(len(taken))
            waited = True
        time.sleep(POLL_SECONDS)
    try:
        yield list(taken)
    finally:
        _release(list(taken.values()))
