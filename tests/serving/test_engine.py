"""The engine launcher's environment: vLLM gets what it needs and none of the platform's secrets.

(tests/serving/test_agent.py checks the same on a real engine process started by run_engine.)
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from serving.engine import EngineSpec, engine_env

# An engine node's environment as the pool agent sees it: the platform's settings and secrets...
PLATFORM = {
    "SECRET_KEY": "s" * 50,
    "DATABASE_URL": "postgres://tuneplex:pw@db.internal:5432/tuneplex",
    "REDIS_URL": "redis://:pw@redis.internal:6379/0",
    "AWS_ACCESS_KEY_ID": "AKIA-platform",
    "AWS_SECRET_ACCESS_KEY": "platform-secret",
    "AWS_SESSION_TOKEN": "session",
    "TUNEPLEX_AGENT_S3_ACCESS_KEY_ID": "agent",
    "TUNEPLEX_AGENT_S3_SECRET_ACCESS_KEY": "agent-secret",
    "TUNEPLEX_ENGINE_API_KEY": "k" * 40,
    "TUNEPLEX_METRICS_TOKEN": "m" * 30,
    "TUNEPLEX_OIDC_CLIENT_SECRET": "oidc",
    "DJANGO_SETTINGS_MODULE": "tuneplex.settings",
    "PYTHONPATH": "/app:/app/platform",
    "PROMETHEUS_MULTIPROC_DIR": "/tmp/metrics",
    "HF_TOKEN": "hf_secret",
    "VLLM_API_KEY": "not-the-spec-key",
    "POSTGRES_PASSWORD": "pw",
    "KUBERNETES_SERVICE_HOST": "10.96.0.1",
}
# ... and what vLLM and the GPU stack read.
NEEDED = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "HOME": "/home/tuneplex",
    "LANG": "C.UTF-8",
    "LC_ALL": "C.UTF-8",
    "TMPDIR": "/tmp",
    "LD_LIBRARY_PATH": "/usr/local/cuda/lib64",
    "CUDA_VISIBLE_DEVICES": "1",
    "NVIDIA_VISIBLE_DEVICES": "all",
    "NCCL_SOCKET_IFNAME": "eth0",
    "OMP_NUM_THREADS": "8",
    "HF_HOME": "/models/.hf",
    "HF_HUB_CACHE": "/models/.hf/hub",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_ATTENTION_BACKEND": "FLASH_ATTN",
    "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True",
}


def spec(api_key: str = "e" * 40, **extra) -> EngineSpec:
    return EngineSpec(python=Path("/usr/bin/python3"), model_dir="/models/m", served_name="m",
                      port=8101, api_key=api_key, **extra)


@pytest.fixture
def node(monkeypatch):
    """This process's environment is an engine node's."""
    def become(variables: dict[str, str]) -> None:
        for name in list(os.environ):
            monkeypatch.delenv(name)
        for name, value in variables.items():
            monkeypatch.setenv(name, value)
    return become


def test_the_engine_gets_none_of_the_platforms_secrets(node):
    node({**PLATFORM, **NEEDED})
    environment = engine_env(spec())
    leaked = sorted(set(PLATFORM) & set(environment) - {"VLLM_API_KEY"})
    assert leaked == []
    assert environment["VLLM_API_KEY"] == "e" * 40  # its own key, from the spec, not inherited
    assert not any(value in {"pw", "platform-secret", "hf_secret", "s" * 50}
                   for value in environment.values())


def test_the_engine_gets_what_it_needs(node):
    node({**PLATFORM, **NEEDED})
    environment = engine_env(spec())
    assert {name: environment[name] for name in NEEDED} == NEEDED
    assert environment["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    assert environment["HF_HUB_OFFLINE"] == "1" and environment["VLLM_NO_USAGE_STATS"] == "1"
    assert set(environment) == set(NEEDED) | {
        "VLLM_API_KEY", "VLLM_ALLOW_RUNTIME_LORA_UPDATING", "HF_HUB_OFFLINE", "VLLM_NO_USAGE_STATS",
        "VLLM_CPU_KVCACHE_SPACE", "VLLM_CPU_NUM_OF_RESERVED_CPU"}


def test_the_operator_can_name_more_variables_and_no_key_means_none(node):
    node({**PLATFORM, "HTTPS_PROXY": "http://proxy:3128"})
    environment = engine_env(spec(env_pass=("HTTPS_PROXY",), api_key=""))
    assert environment["HTTPS_PROXY"] == "http://proxy:3128"
    assert "VLLM_API_KEY" not in environment
