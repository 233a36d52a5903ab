"""Prometheus configuration, alert rules and Grafana dashboards: promtool, and a real Prometheus.

promtool and prometheus come from Debian's ``prometheus`` package (``deploy/setup.sh --with-tests``
installs it).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
import yaml

from tests.conftest import GatewayProcess, free_port, wait_for

REPO = Path(__file__).resolve().parents[2]
PROMETHEUS = REPO / "deploy/prometheus"
GRAFANA = REPO / "deploy/grafana"
SOURCES = [REPO / "platform/tuneplex/core/metrics.py",
           REPO / "platform/tuneplex/operations/metrics_state.py",
           REPO / "platform/tuneplex/inference/replica_metrics.py"]

def promtool(*args: str, cwd: Path = PROMETHEUS) -> subprocess.CompletedProcess:
    return subprocess.run(["promtool", *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_the_configurations_are_valid():
    for name in ("prometheus.yml", "prometheus-kubernetes.yml"):
        # --syntax-only: the token file they name exists only where Prometheus runs.
        result = promtool("check", "config", "--syntax-only", name)
        assert result.returncode == 0, result.stdout + result.stderr


def test_the_alert_rules_are_valid_and_pass_their_unit_tests():
    result = promtool("check", "rules", "rules/tuneplex.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "8 rules found" in result.stdout
    result = promtool("test", "rules", "tests/tuneplex_test.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def defined_metrics() -> set[str]:
    """Every metric family the platform exports (as the exposition names them)."""
    text = "\n".join(p.read_text() for p in SOURCES)
    names = set(re.findall(r'"(tuneplex_[a-z_]+)"', text))
    counters = set(re.findall(r'(?:Counter|CounterMetricFamily)\(\s*"(tuneplex_[a-z_]+)"', text))
    return names | {f"{n}_total" for n in counters if not n.endswith("_total")}


def used_metrics(expr: str) -> set[str]:
    used = set()
    for name in re.findall(r"\b(tuneplex_[a-z_]+)", expr):
        for suffix in ("_bucket", "_count", "_sum"):
            if name.endswith(suffix) and name[: -len(suffix)] in defined_metrics():
                name = name[: -len(suffix)]
        used.add(name)
    return used


def test_rules_use_only_metrics_the_platform_exports():
    rules = yaml.safe_load((PROMETHEUS / "rules/tuneplex.yml").read_text())
    exprs = [rule["expr"] for group in rules["groups"] for rule in group["rules"]]
    assert {used for e in exprs for used in used_metrics(e)} <= defined_metrics()


# --- dashboards -----------------------------------------------------------------------------------

def dashboards() -> dict[str, dict]:
    return {p.name: json.loads(p.read_text()) for p in sorted((GRAFANA / "dashboards").glob("*.json"))}


def test_the_dashboards_are_the_generators_output():
    sys.path.insert(0, str(GRAFANA))
    try:
        import build_dashboards
    finally:
        sys.path.remove(str(GRAFANA))
    expected = build_dashboards.render()
    assert set(expected) == {"overview.json", "training.json", "serving.json"}
    for name, text in expected.items():
        assert (GRAFANA / "dashboards" / name).read_text() == text, f"run build_dashboards.py ({name})"


def test_the_dashboards_follow_grafanas_model_and_every_query_parses(tmp_path):
    uids = set()
    rules = {"groups": []}
    for name, board in dashboards().items():
        assert 8 <= len(board["uid"]) <= 40 and board["uid"] not in uids
        uids.add(board["uid"])
        assert board["schemaVersion"] >= 36 and board["title"].startswith("Tuneplex")
        assert [v["name"] for v in board["templating"]["list"]] == ["datasource"]
        ids = [p["id"] for p in board["panels"]]
        assert len(ids) == len(set(ids)), name
        occupied: set[tuple[int, int]] = set()
        for panel in board["panels"]:
            grid = panel["gridPos"]
            assert grid["x"] + grid["w"] <= 24 and grid["h"] > 0, panel["title"]
            cells = {(x, y) for x in range(grid["x"], grid["x"] + grid["w"])
                     for y in range(grid["y"], grid["y"] + grid["h"])}
            assert not cells & occupied, f"{name}: {panel['title']} overlaps another panel"
            occupied |= cells
            assert panel["type"] in ("stat", "timeseries") and panel["targets"]
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            for target in panel["targets"]:
                assert not re.search(r"\{\{[^}]*[, ][^}]*\}\}", target["legendFormat"]), target
                expr = target["expr"].replace("$__rate_interval", "5m")
                assert used_metrics(expr) <= defined_metrics(), (panel["title"], expr)
                rules["groups"].append({"name": f"{name}-{panel['id']}-{target['refId']}", "rules": [
                    {"record": "dashboard:query", "expr": expr}]})
    (tmp_path / "queries.yml").write_text(yaml.safe_dump(rules))
    result = promtool("check", "rules", str(tmp_path / "queries.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    provisioned = yaml.safe_load((GRAFANA / "provisioning/dashboards/tuneplex.yml").read_text())
    assert provisioned["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards/tuneplex"


# --- a real Prometheus with the shipped configuration -----------------------------------------------

TOKEN = "prometheus-test-token-" + "y" * 24


@pytest.fixture
def platform_web(test_database_url):
    process = GatewayProcess(database_url=test_database_url, engine=None,
                             extra_env={"TUNEPLEX_METRICS_TOKEN": TOKEN})
    try:
        yield process
    finally:
        process.stop()


@pytest.mark.django_db(transaction=True)
def test_prometheus_scrapes_the_platform_and_evaluates_an_alert(platform_web, tmp_path):
    """The shipped scrape jobs (token from a file), rule files and alerts, with the targets
    pointed at this machine: the web process is scraped; the replica's address is down, so
    TuneplexReplicaDown goes pending."""
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    (tmp_path / "token").write_text(TOKEN)
    dead = f"127.0.0.1:{free_port()}"  # nothing listens there
    targets = {"tuneplex-web": [platform_web.url.removeprefix("http://")], "tuneplex-workers": [dead],
               "tuneplex-pool": [dead], "vllm": [dead]}
    for job in config["scrape_configs"]:
        if job["job_name"] in targets:
            job["static_configs"] = [{"targets": targets[job["job_name"]]}]
        if "authorization" in job:
            job["authorization"]["credentials_file"] = str(tmp_path / "token")
    with running_prometheus(config, tmp_path) as (api, query):
        wait_for(lambda: query('up{job="tuneplex-web"} == 1'), timeout=60, message="a scrape of web")
        jobs = wait_for(lambda: query('max by (state) (tuneplex_jobs)'), timeout=30,
                        message="the platform state")
        assert {r["metric"]["state"] for r in jobs} >= {"queued", "running", "succeeded"}
        assert query('tuneplex_state_scrape_error == 1') == []

        def replica_down() -> set:
            alerts = httpx.get(f"{api}/alerts", timeout=5).json()["data"]["alerts"]
            return {(a["labels"]["job"], a["labels"]["instance"], a["state"]) for a in alerts
                    if a["labels"]["alertname"] == "TuneplexReplicaDown"}

        # Each dead target's first failed scrape lands in its own evaluation: wait for both.
        expected = {("tuneplex-pool", dead, "pending"), ("vllm", dead, "pending")}
        wait_for(lambda: replica_down() >= expected, timeout=60,
                 message="TuneplexReplicaDown pending for both dead targets")
        assert replica_down() == expected  # and for nothing that answers (web)
        rules = httpx.get(f"{api}/rules", params={"type": "alert"}, timeout=5).json()["data"]["groups"]
        assert {r["name"] for g in rules for r in g["rules"]} >= {
            "TuneplexReplicaDown", "TuneplexJobStuck", "TuneplexQueueBackingUp",
            "TuneplexInferenceErrorRate", "TuneplexStorageNearQuota"}


@contextmanager
def running_prometheus(config: dict, folder: Path):
    """A real Prometheus with ``config`` (and the shipped rules); yields its API URL and a
    query function (the result list of an instant query, empty while it cannot answer)."""
    shutil.copytree(PROMETHEUS / "rules", folder / "rules")
    (folder / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    api = f"http://127.0.0.1:{port}/api/v1"
    with (folder / "prometheus.log").open("w") as log:
        server = subprocess.Popen(
            ["prometheus", f"--config.file={folder / 'prometheus.yml'}",
             f"--storage.tsdb.path={folder / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
            cwd=folder, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        def query(expr: str) -> list:
            assert server.poll() is None, (folder / "prometheus.log").read_text()[-2000:]
            try:
                answer = httpx.get(f"{api}/query", params={"query": expr}, timeout=5).json()
            except (httpx.HTTPError, ValueError):  # not up yet: a 503 in plain text while it starts
                return []
            return answer.get("data", {}).get("result", [])

        yield api, query
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


# vLLM's metrics as a replica exposes them while a tenant's adapter runs (names carry org slugs).
VLLM_METRICS = b"""# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="Llama-3.1-8B-Instruct"} 1.0
# HELP vllm:lora_requests_info Running stats on lora requests.
# TYPE vllm:lora_requests_info gauge
vllm:lora_requests_info{max_lora="4",running_lora_adapters="ft:acme-corp:support-bot",waiting_lora_adapters="ft:globex:faq"} 1.7e+09
# HELP vllm:future_lora_gauge A series a later vLLM might label with an adapter.
# TYPE vllm:future_lora_gauge gauge
vllm:future_lora_gauge{lora_name="ft:acme-corp:support-bot",model_name="Llama-3.1-8B-Instruct"} 3.0
"""


class _VllmMetrics(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.send_header("Content-Length", str(len(VLLM_METRICS)))
        self.end_headers()
        self.wfile.write(VLLM_METRICS)

    def log_message(self, format, *args):
        pass


@pytest.mark.parametrize("name", ["prometheus.yml", "prometheus-kubernetes.yml"])
def test_prometheus_keeps_no_series_that_names_an_adapter(name, tmp_path):
    """The shipped vllm job's relabelling, on a real Prometheus scraping metrics that name
    adapters (as vLLM's own would, were the agent's filter ever bypassed)."""
    exporter = ThreadingHTTPServer(("127.0.0.1", 0), _VllmMetrics)
    threading.Thread(target=exporter.serve_forever, daemon=True).start()
    shipped = yaml.safe_load((PROMETHEUS / name).read_text())
    job = next(j for j in shipped["scrape_configs"] if j["job_name"] == "vllm")
    job.pop("dns_sd_configs", None)
    job["static_configs"] = [{"targets": [f"127.0.0.1:{exporter.server_port}"]}]
    job["authorization"]["credentials_file"] = str(tmp_path / "token")
    (tmp_path / "token").write_text(TOKEN)
    config = {"global": {"scrape_interval": "1s"}, "scrape_configs": [job]}
    try:
        with running_prometheus(config, tmp_path) as (_, query):
            # One scrape's samples are stored together: once one is in, all that were kept are.
            wait_for(lambda: query("vllm:num_requests_running"), timeout=60, message="a scrape")
            assert query('{__name__="vllm:lora_requests_info"}') == []
            future = query("vllm:future_lora_gauge")
            assert [r["metric"].get("lora_name") for r in future] == [None]  # kept, unlabelled
            named = query('{__name__=~".+", running_lora_adapters=~".+"} or '
                          '{__name__=~".+", waiting_lora_adapters=~".+"} or '
                          '{__name__=~".+", lora_name=~".+"}')
            assert named == []
    finally:
        exporter.shutdown()
