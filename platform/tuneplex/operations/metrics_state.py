"""The platform's state, read at scrape time by a web process's /metrics.

Read from the source of truth (PostgreSQL) and the broker (Redis) with a handful of cheap,
indexed, aggregate queries, so every web process reports the same values: dashboards and alert
rules take ``max`` over instances. An operator's view across organizations, so these queries
are not scoped by organization (unlike the selectors); organization ids become label values only
with TUNEPLEX_METRICS_ORG_LABELS.
"""

from __future__ import annotations

import logging
import time

from django.conf import settings
from django.db import close_old_connections
from django.db.models import Count, F, Min, Q, Sum
from django.utils import timezone
from prometheus_client.core import GaugeMetricFamily

log = logging.getLogger(__name__)

QUEUES = ("default", "statistics", "gpu")
# kombu's Redis transport keeps a queue's messages of priority p > 0 in "<queue>\x06\x16<p>".
PRIORITY_SUFFIXES = ("", "\x06\x163", "\x06\x166", "\x06\x169")


class PlatformStateCollector:
    """Jobs by state, queue depths, GPU slots and storage; each part fails on its own."""

    def collect(self):
        close_old_connections()
        started = time.monotonic()
        parts = {"jobs": self._jobs, "gpu": self._gpu, "storage": self._storage,
                 "queues": self._queues}
        failed = GaugeMetricFamily("tuneplex_state_scrape_error",
                                   "1 when this part of the platform state could not be read.",
                                   labels=["part"])
        for name, part in parts.items():
            try:
                yield from part()
                failed.add_metric([name], 0)
            except Exception as exc:  # noqa: BLE001 - one unreadable part must not hide the others
                log.warning("metrics: reading %s failed: %s: %s", name, type(exc).__name__, exc)
                failed.add_metric([name], 1)
        yield failed
        yield GaugeMetricFamily("tuneplex_state_scrape_duration_seconds",
                                "Time spent reading the platform state for this scrape.",
                                value=time.monotonic() - started)
        close_old_connections()

    def _jobs(self):
        from tuneplex.finetuning.models import FineTuningJob

        Status = FineTuningJob.Status
        counts = dict(FineTuningJob.objects.values_list("status").annotate(n=Count("id"))
                      .values_list("status", "n"))
        jobs = GaugeMetricFamily("tuneplex_jobs", "Fine-tuning jobs by state.", labels=["state"])
        for state in Status.values:
            jobs.add_metric([state], counts.get(state, 0))
        yield jobs
        ages = FineTuningJob.objects.aggregate(
            queued=Min("created_at", filter=Q(status=Status.QUEUED)),
            heartbeat=Min("heartbeat_at", filter=Q(status=Status.RUNNING)))
        now = timezone.now()
        yield GaugeMetricFamily(
            "tuneplex_jobs_oldest_queued_seconds", "Age of the oldest queued job (0: none).",
            value=(now - ages["queued"]).total_seconds() if ages["queued"] else 0)
        yield GaugeMetricFamily(
            "tuneplex_jobs_oldest_heartbeat_seconds", "Age of the oldest heartbeat of a running "
            "job (0: none running); the sweep re-queues a job past TUNEPLEX_JOB_HEARTBEAT_TIMEOUT.",
            value=(now - ages["heartbeat"]).total_seconds() if ages["heartbeat"] else 0)
        yield GaugeMetricFamily("tuneplex_job_heartbeat_timeout_seconds",
                                "TUNEPLEX_JOB_HEARTBEAT_TIMEOUT.",
                                value=settings.JOB_HEARTBEAT_TIMEOUT)

    def _gpu(self):
        from tuneplex.finetuning.scheduler import gpu_slots_in_use
        from tuneplex.finetuning.selectors import gpu_capacity, gpu_workers_live

        yield GaugeMetricFamily("tuneplex_gpu_slots", "GPU slots the scheduler fills: the GPUs of "
                                "the live GPU workers, or TUNEPLEX_GPU_SLOTS where set.",
                                value=gpu_capacity())
        yield GaugeMetricFamily("tuneplex_gpu_workers", "GPU workers registered and heartbeating "
                                "(whether or not TUNEPLEX_GPU_SLOTS is set).",
                                value=gpu_workers_live().count())
        yield GaugeMetricFamily("tuneplex_gpu_slots_in_use", "GPU slots taken by dispatched or "
                                "running jobs and merges.", value=gpu_slots_in_use())

    def _storage(self):
        from tuneplex.adapters.models import Adapter
        from tuneplex.exports.models import Export
        from tuneplex.files.models import File
        from tuneplex.finetuning.models import JobCheckpoint
        from tuneplex.tenancy.models import Organization

        used: dict[str, int] = {}
        for org, size in (File.objects.values_list("organization").annotate(t=Sum("bytes"))
                          .values_list("organization", "t")):
            used[org] = used.get(org, 0) + (size or 0)
        for org, size in (Adapter.objects.values_list("organization")
                          .annotate(t=Sum(F("bytes") + F("merged_bytes")))
                          .values_list("organization", "t")):
            used[org] = used.get(org, 0) + (size or 0)
        for org, size in (Export.objects.values_list("organization").annotate(t=Sum("bytes"))
                          .values_list("organization", "t")):
            used[org] = used.get(org, 0) + (size or 0)
        for org, size in (JobCheckpoint.objects.values_list("job__organization")
                          .annotate(t=Sum("bytes")).values_list("job__organization", "t")):
            used[org] = used.get(org, 0) + (size or 0)
        quotas = {org.id: org.storage_quota for org in
                  Organization.objects.filter(id__in=list(used)).only("id", "storage_quota_bytes")}
        yield GaugeMetricFamily("tuneplex_storage_bytes", "Bytes kept in artifact storage "
                                "(datasets, checkpoints, adapters, merged models, exports).",
                                value=sum(used.values()))
        ratios = [size / quotas[org] for org, size in used.items() if quotas.get(org)]
        yield GaugeMetricFamily(
            "tuneplex_storage_quota_ratio_max", "The highest share of its storage quota any "
            "organization uses (1: full).", value=max(ratios, default=0.0))
        if settings.METRICS_ORG_LABELS:
            per_org = GaugeMetricFamily("tuneplex_organization_storage_bytes",
                                        "Bytes in artifact storage per organization.",
                                        labels=["organization"])
            quota = GaugeMetricFamily("tuneplex_organization_storage_quota_bytes",
                                      "Storage quota per organization.", labels=["organization"])
            for org, size in sorted(used.items()):
                per_org.add_metric([org], size)
                if org in quotas:
                    quota.add_metric([org], quotas[org])
            yield per_org
            yield quota

    def _queues(self):
        """Messages waiting per Celery queue (Redis LLEN); nothing on the filesystem broker.
        The gpu queue stays short by design: queued jobs wait in the database (``tuneplex_jobs``)."""
        if not settings.REDIS_URL:
            return
        import redis

        client = redis.Redis.from_url(settings.REDIS_URL, socket_timeout=2, socket_connect_timeout=2)
        try:
            with client.pipeline(transaction=False) as pipe:
                for queue in QUEUES:
                    for suffix in PRIORITY_SUFFIXES:
                        pipe.llen(queue + suffix)
                lengths = pipe.execute()
        finally:
            client.close()
        depth = GaugeMetricFamily("tuneplex_queue_depth", "Messages waiting in a Celery queue.",
                                  labels=["queue"])
        per_queue = len(PRIORITY_SUFFIXES)
        for index, queue in enumerate(QUEUES):
            depth.add_metric([queue], sum(lengths[index * per_queue:(index + 1) * per_queue]))
        yield depth
