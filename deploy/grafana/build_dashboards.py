"""Writes the Grafana dashboards (deploy/grafana/dashboards/*.json) from the panel lists below.

    python deploy/grafana/build_dashboards.py      # after changing a panel; commit the JSON too

The JSON files are what Grafana provisions (deploy/grafana/provisioning); this script keeps their
layout and data source wiring consistent. Grafana's classic dashboard model: each panel has an
id, a type, a gridPos and Prometheus targets on the dashboard's ``datasource`` variable.
``tests/deploy/test_monitoring.py`` checks that the files match this script and that every
query parses (promtool).
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
RATE = "$__rate_interval"


def stat(title: str, expr: str, unit: str = "short", legend: str = "") -> dict:
    return {"type": "stat", "title": title, "targets": [(expr, legend)], "unit": unit, "w": 4, "h": 4}


def series(title: str, *targets: tuple[str, str], unit: str = "short", w: int = 12) -> dict:
    return {"type": "timeseries", "title": title, "targets": list(targets), "unit": unit, "w": w, "h": 8}


def quantiles(metric: str, by: str, selector: str = "") -> list[tuple[str, str]]:
    inner = f"sum by (le{', ' + by if by else ''}) (rate({metric}_bucket{selector}[{RATE}]))"
    label = "".join(f"{{{{{name.strip()}}}}} " for name in by.split(",")) if by else ""
    return [(f"histogram_quantile({q}, {inner})", f"{label}p{int(q * 100)}") for q in (0.5, 0.95)]


OVERVIEW = [
    stat("Jobs running", 'max(tuneplex_jobs{state="running"})'),
    stat("Jobs queued", 'max(tuneplex_jobs{state="queued"})'),
    stat("GPU slots in use", "max(tuneplex_gpu_slots_in_use) / max(tuneplex_gpu_slots)", "percentunit"),
    stat("Replicas up", "sum(tuneplex_pool_engine_up)"),
    stat("Inference requests/s", f"sum(rate(tuneplex_gateway_requests_total[{RATE}]))", "reqps"),
    stat("Inference 5xx ratio", f'sum(rate(tuneplex_gateway_requests_total{{status=~"5.."}}[{RATE}]))'
         f" / sum(rate(tuneplex_gateway_requests_total[{RATE}]))", "percentunit"),
    series("Jobs by state", ('max by (state) (tuneplex_jobs{state=~"validating_files|queued|running"})',
                             "{{state}}")),
    series("Celery queue depth", ("max by (queue) (tuneplex_queue_depth)", "{{queue}}")),
    series("Artifact storage", ("max(tuneplex_storage_bytes)", "stored"), unit="bytes"),
    series("Highest share of a storage quota", ("max(tuneplex_storage_quota_ratio_max)", "max"),
           unit="percentunit"),
    series("Targets up", ('up{job=~"tuneplex-.*|vllm"}', "{{job}} {{instance}}"), w=24),
]

TRAINING = [
    stat("Training tokens/s now", "sum(tuneplex_training_tokens_per_second)"),
    stat("GPU workers busy", "sum(tuneplex_worker_gpu_busy)"),
    stat("Oldest queued job", "max(tuneplex_jobs_oldest_queued_seconds)", "s"),
    stat("Oldest heartbeat", "max(tuneplex_jobs_oldest_heartbeat_seconds)", "s"),
    stat("Jobs succeeded (24h)",
         'sum(increase(tuneplex_job_attempt_duration_seconds_count{outcome="succeeded"}[24h]))'),
    stat("Jobs failed (24h)",
         'sum(increase(tuneplex_job_attempt_duration_seconds_count{outcome="failed"}[24h]))'),
    series("Trained tokens/s", ("sum(tuneplex_training_tokens_per_second)", "reported by trainers"),
           (f"sum(rate(tuneplex_job_trained_tokens_total[{RATE}]))", "finished jobs")),
    series("Job attempt duration", *quantiles("tuneplex_job_attempt_duration_seconds", "outcome"), unit="s"),
    series("Wait for a GPU (creation to first claim)", *quantiles("tuneplex_job_queue_wait_seconds", ""),
           unit="s"),
    series("Celery queue wait", *quantiles("tuneplex_queue_wait_seconds", "queue"), unit="s"),
    series("Dataset statistics duration", *quantiles("tuneplex_statistics_duration_seconds", "outcome"),
           unit="s"),
    series("Merge duration", *quantiles("tuneplex_merge_duration_seconds", "outcome"), unit="s"),
    series("Celery tasks failing", (f'sum by (task) (rate(tuneplex_celery_tasks_total{{outcome="failed"}}[{RATE}]))',
                                    "{{task}}"), unit="ops", w=24),
]

SERVING = [
    stat("Requests/s", f"sum(rate(tuneplex_gateway_requests_total[{RATE}]))", "reqps"),
    stat("p95 latency (base)", quantiles("tuneplex_gateway_request_duration_seconds", "",
                                         '{kind="base", stream="false"}')[1][0], "s"),
    stat("p95 latency (adapter)", quantiles("tuneplex_gateway_request_duration_seconds", "",
                                            '{kind="adapter", stream="false"}')[1][0], "s"),
    stat("Completion tokens/s", f'sum(rate(tuneplex_gateway_tokens_total{{type="completion"}}[{RATE}]))'),
    stat("Rate-limited/s", f"sum(rate(tuneplex_gateway_rate_limited_total[{RATE}]))", "reqps"),
    stat("Adapters resident", 'sum(tuneplex_pool_adapters{state="loaded"})'),
    series("Requests by model kind and status",
           (f"sum by (kind, status) (rate(tuneplex_gateway_requests_total[{RATE}]))", "{{kind}} {{status}}"),
           unit="reqps"),
    series("Latency (to the end of the answer)",
           *quantiles("tuneplex_gateway_request_duration_seconds", "kind, stream"), unit="s"),
    series("Tokens/s by model kind", (f"sum by (kind, type) (rate(tuneplex_gateway_tokens_total[{RATE}]))",
                                      "{{kind}} {{type}}")),
    series("Rate-limit rejections", (f"sum by (limit) (rate(tuneplex_gateway_rate_limited_total[{RATE}]))",
                                     "{{limit}}"), unit="reqps"),
    series("Adapter residency per replica", ('sum by (instance) (tuneplex_pool_adapters{state="loaded"})',
                                             "{{instance}} loaded"),
           ("sum by (instance) (tuneplex_pool_slots)", "{{instance}} slots")),
    series("Adapter loads and evictions per replica",
           (f"sum by (instance) (rate(tuneplex_pool_adapter_loads_total[{RATE}]))", "{{instance}} loads"),
           (f"sum by (instance) (rate(tuneplex_pool_evictions_total[{RATE}]))", "{{instance}} evictions"),
           unit="ops"),
    series("Cold-load latency", *quantiles("tuneplex_pool_adapter_load_seconds", "instance"), unit="s"),
    series("Replica engines up", ("tuneplex_pool_engine_up", "{{instance}}")),
    series("vLLM requests running and waiting", ("sum by (instance) (vllm:num_requests_running)",
                                                 "{{instance}} running"),
           ("sum by (instance) (vllm:num_requests_waiting)", "{{instance}} waiting"), w=24),
]

DASHBOARDS = {
    "overview": ("tuneplex-overview", "Tuneplex: platform overview", OVERVIEW),
    "training": ("tuneplex-training", "Tuneplex: training", TRAINING),
    "serving": ("tuneplex-serving", "Tuneplex: serving", SERVING),
}


def panel(number: int, spec: dict, x: int, y: int) -> dict:
    targets = [{"refId": chr(ord("A") + i), "datasource": DATASOURCE, "expr": expr,
                "legendFormat": legend or "__auto", "range": True}
               for i, (expr, legend) in enumerate(spec["targets"])]
    return {"id": number, "type": spec["type"], "title": spec["title"], "datasource": DATASOURCE,
            "gridPos": {"h": spec["h"], "w": spec["w"], "x": x, "y": y}, "targets": targets,
            "fieldConfig": {"defaults": {"unit": spec["unit"]}, "overrides": []},
            "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True}}
            if spec["type"] == "timeseries" else {"reduceOptions": {"calcs": ["lastNotNull"]}}}


def dashboard(uid: str, title: str, specs: list[dict]) -> dict:
    panels, x, y, row_height = [], 0, 0, 0
    for number, spec in enumerate(specs, start=1):
        if x + spec["w"] > 24:
            x, y, row_height = 0, y + row_height, 0
        panels.append(panel(number, spec, x, y))
        x, row_height = x + spec["w"], max(row_height, spec["h"])
    return {
        "id": None, "uid": uid, "title": title, "tags": ["tuneplex"], "timezone": "browser",
        "editable": True, "graphTooltip": 1, "refresh": "30s", "schemaVersion": 39, "version": 1,
        "time": {"from": "now-6h", "to": "now"}, "timepicker": {},
        "annotations": {"list": []},
        "links": [{"title": "Tuneplex", "type": "dashboards", "tags": ["tuneplex"], "asDropdown": True}],
        "templating": {"list": [{"name": "datasource", "label": "Data source", "type": "datasource",
                                 "query": "prometheus", "current": {}, "hide": 0,
                                 "refresh": 1, "regex": "", "options": []}]},
        "panels": panels,
    }


def render() -> dict[str, str]:
    return {f"{name}.json": json.dumps(dashboard(uid, title, specs), indent=2) + "\n"
            for name, (uid, title, specs) in DASHBOARDS.items()}


if __name__ == "__main__":
    for name, text in render().items():
        (HERE / "dashboards" / name).write_text(text)
        print(f"wrote deploy/grafana/dashboards/{name}")
