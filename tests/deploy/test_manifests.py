"""The deployment files that cannot run here, checked statically against their specifications.

- Compose: deploy/compose/compose.yaml against the Compose specification's JSON schema
  (vendored: deploy/compose/schema/compose-spec.json).
- Kubernetes: each overlay rendered with ``kubectl kustomize``, every object validated strictly
  with kubernetes-validate against the API schemas of a current Kubernetes version.
- Dockerfiles: multi-stage, non-root, no secret in the image, pinned by the build script.
No image is built and nothing is deployed in CI (no Docker daemon, no cluster).
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
KUBERNETES_VERSION = "1.37.0"  # the newest the installed kubernetes-validate carries
SECRET_WORDS = re.compile(r"(PASSWORD|SECRET|TOKEN|_KEY\b|API_KEY)", re.I)


# --- Compose ---------------------------------------------------------------------------------------

def compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose/compose.yaml").read_text())


def compose_errors(document: dict) -> list[str]:
    schema = json.loads((DEPLOY / "compose/schema/compose-spec.json").read_text())
    validator = jsonschema.Draft7Validator(schema)
    return [f"{list(e.path)}: {e.message}" for e in validator.iter_errors(document)]


def test_the_compose_file_follows_the_compose_specification():
    document = compose()
    assert compose_errors(document) == []
    broken = copy.deepcopy(document)
    broken["services"]["web"]["helthcheck"] = broken["services"]["web"].pop("healthcheck")
    broken["services"]["beat"]["restart"] = ["always"]
    assert len(compose_errors(broken)) == 2  # the schema is strict enough to catch both


def test_compose_runs_every_part_with_health_checks_and_one_shot_setup():
    services = compose()["services"]
    assert {"postgres", "redis", "minio", "minio-init", "migrate", "web", "beat", "worker-default",
            "worker-evals", "worker-statistics", "worker-exports", "worker-gpu-0", "engine-0",
            "prometheus", "grafana"} <= set(services)
    one_shot = {name for name, s in services.items() if s.get("restart") == "no"}
    assert one_shot == {"minio-init", "migrate"}
    for name, service in services.items():
        if name not in one_shot:
            assert "healthcheck" in service, name
    for name in ("web", "beat", "worker-default", "worker-gpu-0", "engine-0"):
        assert services[name]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    gpu = services["worker-gpu-0"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["capabilities"] == ["gpu"] and gpu["device_ids"] == ["0"]
    assert services["prometheus"]["secrets"][0]["target"] == "/etc/prometheus/secrets/metrics-token"


def test_compose_takes_every_secret_from_the_env_file():
    services = compose()["services"]
    for name, service in services.items():
        for variable, value in (service.get("environment") or {}).items():
            if SECRET_WORDS.search(variable) and not variable.endswith("_FILE"):
                assert str(value).startswith("${"), f"{name}: {variable} is written in the file"
    example = (DEPLOY / "compose/.env.example").read_text()
    for line in example.splitlines():
        variable, _, value = line.partition("=")
        if SECRET_WORDS.search(variable) and not line.startswith("#"):
            assert value == "", f".env.example carries a value for {variable}"
    assert "/deploy/compose/.env" in (REPO / ".gitignore").read_text()


# --- Kubernetes ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict[str, list[dict]]:
    """Each overlay rendered (with its secrets.env.example standing in for secrets.env)."""
    root = tmp_path_factory.mktemp("k8s")
    shutil.copytree(DEPLOY / "kubernetes", root / "kubernetes")
    out = {}
    for overlay in sorted((root / "kubernetes/overlays").iterdir()):
        for example in overlay.glob("*.env.example"):
            shutil.copy(example, overlay / example.name.removesuffix(".example"))
        result = subprocess.run(["kubectl", "kustomize", str(overlay)], capture_output=True,
                                text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        path = root / f"{overlay.name}.yaml"
        path.write_text(result.stdout)
        out[overlay.name] = [d for d in yaml.safe_load_all(result.stdout) if d]
        out[f"{overlay.name}:path"] = path
    return out


def validate(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(Path(sys.executable).parent / "kubernetes-validate"), "--strict",
                           "--quiet", "-k", KUBERNETES_VERSION, str(path)],
                          capture_output=True, text=True, timeout=120)


def test_every_kubernetes_object_validates_against_the_api_schemas(rendered, tmp_path):
    for overlay in ("production", "small"):
        result = validate(rendered[f"{overlay}:path"])
        assert result.returncode == 0, result.stdout + result.stderr
    # The validator refuses what the API server would.
    web = next(d for d in rendered["production"] if d["kind"] == "Deployment" and d["metadata"]["name"] == "web")
    broken = copy.deepcopy(web)
    broken["spec"]["replicas"] = "two"
    broken["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGet"]["pth"] = "/x"
    (tmp_path / "broken.yaml").write_text(yaml.safe_dump(broken))
    result = validate(tmp_path / "broken.yaml")
    assert result.returncode != 0 and "replicas" in result.stdout + result.stderr


def objects(rendered, overlay: str, kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in rendered[overlay] if d["kind"] == kind}


def test_the_cluster_layout(rendered):
    deployments = objects(rendered, "production", "Deployment")
    assert set(deployments) == {"web", "beat", "worker-default", "worker-evals", "worker-statistics",
                                "worker-exports", "worker-gpu"}
    beat = deployments["beat"]["spec"]
    assert beat["replicas"] == 1 and beat["strategy"]["type"] == "Recreate"
    assert deployments["worker-gpu"]["spec"]["replicas"] == 4
    gpu = deployments["worker-gpu"]["spec"]["template"]["spec"]["containers"][0]["resources"]
    assert gpu["limits"]["nvidia.com/gpu"] == 1 and gpu["requests"]["nvidia.com/gpu"] == 1
    engine = objects(rendered, "production", "StatefulSet")["engine"]
    assert engine["spec"]["replicas"] == 2
    assert engine["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    config = objects(rendered, "production", "ConfigMap")["tuneplex-config"]["data"]
    # The GPU workers register themselves: four pods are four GPU slots, no number to keep in step.
    assert "TUNEPLEX_GPU_SLOTS" not in config
    # The gateways find the engine pods in the fleet: no list of them to keep in step.
    assert config["TUNEPLEX_ENGINE_MODE"] == "attach" and "TUNEPLEX_ENGINE_URLS" not in config
    hpa = objects(rendered, "production", "HorizontalPodAutoscaler")["web"]["spec"]
    assert hpa["scaleTargetRef"]["name"] == "web" and (hpa["minReplicas"], hpa["maxReplicas"]) == (3, 20)
    assert set(objects(rendered, "production", "PodDisruptionBudget")) == {
        "web", "worker-default", "worker-gpu", "engine"}
    assert "tuneplex-migrate" in objects(rendered, "production", "Job")
    assert "tuneplex" in objects(rendered, "production", "Ingress")
    assert "tuneplex-secrets" in objects(rendered, "production", "Secret")
    assert not objects(rendered, "production", "PersistentVolumeClaim")  # state lives in S3, PG, Redis
    web = deployments["web"]["spec"]["template"]["spec"]["containers"][0]
    assert web["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert web["readinessProbe"]["httpGet"]["path"] == "/readyz"


def test_every_pod_is_non_root_with_requests_limits_and_probes(rendered):
    for document in rendered["production"]:
        template = (document.get("spec") or {}).get("template")
        if not template:
            continue
        pod = template["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, document["metadata"]["name"]
        assert pod["securityContext"]["runAsUser"] != 0
        for container in pod["containers"]:
            name = f"{document['metadata']['name']}/{container['name']}"
            assert {"cpu", "memory"} <= set(container["resources"]["requests"]), name
            assert {"cpu", "memory"} <= set(container["resources"]["limits"]), name
            assert container["securityContext"]["allowPrivilegeEscalation"] is False, name
            if document["kind"] != "Job":
                assert "livenessProbe" in container, name
        assert template["metadata"]["labels"]["app.kubernetes.io/part-of"] == "tuneplex"


# --- what engines hold, and who reaches them -----------------------------------------------------

# Where the engine (vLLM, behind the pool agent) runs, none of these may be: it runs third-party
# code on tenants' adapters.
PLATFORM_ONLY = {"SECRET_KEY", "REDIS_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                 "MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD", "TUNEPLEX_OIDC_CLIENT_SECRET"}
AGENT_STORAGE = {"TUNEPLEX_AGENT_S3_ACCESS_KEY_ID", "TUNEPLEX_AGENT_S3_SECRET_ACCESS_KEY"}
ENGINE_OWN = AGENT_STORAGE | {"TUNEPLEX_FLEET_REDIS_URL"}  # its storage and Redis users


def test_compose_engines_get_no_platform_secret_and_a_read_only_storage_user():
    services = compose()["services"]
    engine = services["engine-0"]["environment"]
    assert not PLATFORM_ONLY & set(engine)
    assert AGENT_STORAGE <= set(engine) and engine["TUNEPLEX_ENGINE_API_KEY"].startswith("${")
    # It joins the fleet as the Redis user that may touch the fleet's keys only; the gateways
    # are given no list of engines.
    assert engine["TUNEPLEX_FLEET_REDIS_URL"].startswith("redis://fleet:${REDIS_FLEET_PASSWORD")
    redis_command = " ".join(services["redis"]["command"])
    assert "--user fleet on" in redis_command and "~tuneplex:fleet:*" in redis_command
    assert "TUNEPLEX_ENGINE_URLS" not in services["web"]["environment"]
    assert engine["TUNEPLEX_ENGINE_HOST"] == "0.0.0.0"  # set explicitly (the default is loopback)
    assert {"SECRET_KEY", "AWS_ACCESS_KEY_ID"} <= set(services["web"]["environment"])
    assert not AGENT_STORAGE & set(services["web"]["environment"])
    # minio-init makes the read-only user with the shipped policy.
    init = services["minio-init"]
    script = init["command"][0]
    assert "mc admin user add" in script and "tuneplex-agent-read" in script
    assert "./agent-read-policy.json:/etc/tuneplex/agent-read-policy.json:ro" in init["volumes"]
    policy = json.loads((DEPLOY / "compose/agent-read-policy.json").read_text())
    actions = {a for statement in policy["Statement"] for a in statement["Action"]}
    assert actions == {"s3:GetObject", "s3:ListBucket", "s3:GetBucketLocation"}  # nothing writes
    example = (DEPLOY / "compose/.env.example").read_text()
    assert all(f"{name}=" in example for name in AGENT_STORAGE)


def test_kubernetes_engine_pods_get_only_the_secrets_they_need(rendered):
    for overlay in ("production", "small"):
        engine = objects(rendered, overlay, "StatefulSet")["engine"]["spec"]["template"]["spec"]
        container = engine["containers"][0]
        whole = {source["secretRef"]["name"] for source in container["envFrom"] if "secretRef" in source}
        assert whole == {"tuneplex-engine-storage"}, overlay  # never tuneplex-secrets whole
        picked = {e["valueFrom"]["secretKeyRef"]["key"] for e in container["env"]
                  if "secretKeyRef" in e.get("valueFrom", {})}
        assert picked == {"DATABASE_URL", "TUNEPLEX_S3_ENDPOINT_URL", "TUNEPLEX_ENGINE_API_KEY",
                          "TUNEPLEX_METRICS_TOKEN"}
        host = next(e for e in container["env"] if e["name"] == "TUNEPLEX_ENGINE_HOST")
        assert host["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
        storage = objects(rendered, overlay, "Secret")["tuneplex-engine-storage"]
        assert set(storage["data"]) == ENGINE_OWN
        # every other pod still gets the platform's secrets
        for name, deployment in objects(rendered, overlay, "Deployment").items():
            sources = deployment["spec"]["template"]["spec"]["containers"][0]["envFrom"]
            assert {"secretRef": {"name": "tuneplex-secrets"}} in sources, name


def test_vllm_is_reachable_from_the_gateways_only(rendered):
    policy = objects(rendered, "production", "NetworkPolicy")["engine-ingress"]["spec"]
    assert policy["podSelector"]["matchLabels"] == {"app.kubernetes.io/component": "engine"}
    assert policy["policyTypes"] == ["Ingress"]

    def sources(port: int) -> list[dict]:
        return [peer for rule in policy["ingress"] if {"port": port} in rule["ports"]
                for peer in rule["from"]]

    assert sources(8101) == [{"podSelector": {"matchLabels": {
        "app.kubernetes.io/name": "tuneplex", "app.kubernetes.io/component": "web"}}}]
    agent = sources(8100)
    assert {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}} in agent
    assert all("ipBlock" not in peer for rule in policy["ingress"] for peer in rule["from"])
    # The web pods carry the labels the policy selects.
    web = objects(rendered, "production", "Deployment")["web"]["spec"]["template"]["metadata"]["labels"]
    assert web["app.kubernetes.io/component"] == "web" and web["app.kubernetes.io/name"] == "tuneplex"


@pytest.mark.parametrize("name", ["prometheus.yml", "prometheus-kubernetes.yml"])
def test_engine_metrics_are_scraped_through_the_agent_without_adapter_names(name):
    config = yaml.safe_load((DEPLOY / "prometheus" / name).read_text())
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "vllm")
    assert job["metrics_path"] == "/metrics/engine" and "authorization" in job
    ports = [t.rsplit(":", 1)[1] for c in job.get("static_configs", []) for t in c["targets"]]
    ports += [str(c["port"]) for c in job.get("dns_sd_configs", [])]
    assert ports and set(ports) == {"8100"}  # the agent, never vLLM's port
    relabel = job["metric_relabel_configs"]
    assert {"source_labels": ["__name__"], "regex": "vllm:lora_requests_info", "action": "drop"} in relabel
    dropped = next(r for r in relabel if r["action"] == "labeldrop")["regex"]
    assert all(re.fullmatch(dropped, label) for label in
               ("running_lora_adapters", "waiting_lora_adapters", "lora_name"))
    assert not re.fullmatch(dropped, "model_name")


def test_the_engine_image_binds_where_it_is_told():
    entrypoint = (DEPLOY / "docker/entrypoint.sh").read_text()
    engine_line = next(line for line in entrypoint.splitlines() if "run_engine" in line)
    assert "--host" not in engine_line  # TUNEPLEX_ENGINE_HOST decides; loopback by default


# --- images ------------------------------------------------------------------------------------------

DOCKERFILES = sorted((DEPLOY / "docker").glob("*.Dockerfile"))


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_images_are_multi_stage_non_root_and_carry_no_secret(path):
    lines = [line.strip() for line in path.read_text().splitlines()
             if line.strip() and not line.strip().startswith("#")]
    stages = [line for line in lines if line.upper().startswith("FROM ")]
    assert len(stages) >= 2, "multi-stage"
    assert all(re.match(r"FROM \$\{[A-Z_]+_IMAGE\}( AS \w+)?$", s) for s in stages), \
        "base images come from ARGs that the build script pins by digest"
    final = lines[lines.index(stages[-1]):]
    users = [line.split()[1] for line in final if line.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("0", "root")
    for line in lines:
        if line.startswith(("ENV ", "ARG ")):
            for name, value in re.findall(r"([A-Z_]+)=(\S+)", line):
                assert not (SECRET_WORDS.search(name) and value), f"{path.name}: {name} baked in"
        assert not re.search(r"COPY .*\.env\b", line), line
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".env", "**/.env", "var", ".venv"} <= set(ignored)


def test_the_build_script_and_entrypoint_parse():
    assert subprocess.run(["bash", "-n", str(DEPLOY / "docker/build.sh")]).returncode == 0
    assert subprocess.run(["sh", "-n", str(DEPLOY / "docker/entrypoint.sh")]).returncode == 0
    dockerfiles = " ".join(p.read_text() for p in DOCKERFILES)
    assert "bitsandbytes" in (REPO / "pyproject.toml").read_text() and "--group gpu" in dockerfiles
    assert "vllm/vllm-openai" in dockerfiles
