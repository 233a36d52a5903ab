"""A GPU worker's membership hooks: Celery's worker signals, each one call into
:mod:`tuneplex.finetuning.services.gpu_workers`.

Connected by :class:`tuneplex.finetuning.apps.FineTuningConfig` when Django starts, which in a
worker is before any worker signal (as ``tuneplex.operations.worker_metrics``). Both signals are
sent in a worker's main process only; a worker that does not consume the ``gpu`` queue, and any
process that is not a worker, does nothing.
"""

from __future__ import annotations

from celery.signals import worker_ready, worker_shutdown


def connect() -> None:
    """Connect the hooks (once, whatever the number of calls)."""
    worker_ready.connect(_ready, dispatch_uid="tuneplex.finetuning.worker_signals.ready")
    worker_shutdown.connect(_shutdown, dispatch_uid="tuneplex.finetuning.worker_signals.shutdown")


def _ready(sender=None, **kwargs) -> None:
    """``sender``: the worker's consumer, its queues those it consumes (``--queues``)."""
    from tuneplex.finetuning.services.gpu_workers import gpu_worker_join

    gpu_worker_join(name=sender.hostname, queues=[q.name for q in sender.task_consumer.queues])


def _shutdown(**kwargs) -> None:
    from tuneplex.finetuning.services.gpu_workers import gpu_worker_quit

    gpu_worker_quit()
