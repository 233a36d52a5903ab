"""A serving replica's metrics, served by its pool agent at ``/metrics``.

The agent runs in one process (``manage.py run_engine``), so these live in a registry of its own:
residency read from the pool at scrape time, and the cold-load latency observed as loads happen.
The replica is the scrape target (Prometheus's ``instance``); ``model`` is its base model.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from serving.pool import ReplicaPool
from tuneplex.core import metrics

LOAD_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class ReplicaMetrics:
    def __init__(self, pool: ReplicaPool, model: str) -> None:
        self.pool, self.model = pool, model
        self.registry = CollectorRegistry(auto_describe=False)
        self.load_seconds = Histogram(
            "tuneplex_pool_adapter_load_seconds", "Cold load of an adapter onto this replica: "
            "staging from artifact storage, validation and the engine's load.", ["model"],
            buckets=LOAD_BUCKETS, registry=self.registry)
        self.registry.register(self)

    def on_load(self, seconds: float, ok: bool) -> None:
        if ok:
            self.load_seconds.labels(self.model).observe(seconds)

    def collect(self):
        state = self.pool.state()
        labels = [self.model]

        def gauge(name: str, help_text: str, value: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(name, help_text, labels=["model"])
            family.add_metric(labels, value)
            return family

        yield gauge("tuneplex_pool_engine_up", "1 while this replica's engine answers.",
                    1 if state["ready"] else 0)
        yield gauge("tuneplex_pool_slots", "Adapter slots of this replica.", state["slots"])
        adapters = GaugeMetricFamily("tuneplex_pool_adapters", "Adapters on this replica, by "
                                     "state (loaded, loading, leased, pinned).",
                                     labels=["model", "state"])
        for kind in ("loaded", "loading", "leased", "pinned"):
            adapters.add_metric([self.model, kind], len(state[kind]))
        yield adapters
        loads = CounterMetricFamily("tuneplex_pool_adapter_loads", "Adapter loads onto this "
                                    "replica, by result (ok, error).", labels=["model", "result"])
        loads.add_metric([self.model, "ok"], state["loads"])
        loads.add_metric([self.model, "error"], state["load_failures"])
        yield loads
        evictions = CounterMetricFamily("tuneplex_pool_evictions", "Adapters evicted (least "
                                        "recently used) to make room.", labels=["model"])
        evictions.add_metric(labels, state["evictions"])
        yield evictions

    # the agent's MetricsExporter
    def allowed(self, client_address: str, authorization: str | None, *, proxied: bool) -> bool:
        return metrics.may_scrape(client_address, authorization, proxied=proxied)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), metrics.CONTENT_TYPE
