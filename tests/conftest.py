"""Shared fixtures: organizations, users with roles, API keys, and API clients."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import pytest
from rest_framework.test import APIClient

# tests/training runs in the trainer environment (deploy/test.sh), not beside Django.
collect_ignore = ["training"]

from tuneplex.apikeys.services import api_key_create
from tuneplex.core.actors import Principal
from tuneplex.core.scopes import ALL_SCOPES, Role
from tuneplex.tenancy.models import Membership, Organization, User
from tuneplex.tenancy.services import organization_create

_counter = itertools.count()


@dataclass
class Tenant:
    organization: Organization
    owner: User
    owner_key: str  # full-scope key of the owner

    def principal(self, user: User | None = None) -> Principal:
        membership = Membership.objects.get(organization=self.organization,
                                            user=user or self.owner)
        return Principal.of_member(membership)


def make_user(name: str | None = None) -> User:
    return User.objects.create_user(name or f"user{next(_counter)}", password="pw-123456789")


def make_tenant(name: str) -> Tenant:
    owner = make_user(f"{name.lower()}-owner-{next(_counter)}")
    organization = organization_create(name=name, owner=owner)
    tenant = Tenant(organization=organization, owner=owner, owner_key="")
    tenant.owner_key = api_key_create(organization=organization, actor=tenant.principal(),
                                      name="owner key", scopes=list(ALL_SCOPES)).plaintext
    return tenant


def add_member(tenant: Tenant, role: str) -> User:
    user = make_user()
    Membership.objects.create(organization=tenant.organization, user=user, role=role)
    return user


def key_for(tenant: Tenant, user: User, scopes: list[str]) -> str:
    return api_key_create(organization=tenant.organization, actor=tenant.principal(user),
                          name="test key", scopes=scopes).plaintext


def bearer(key: str) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {key}")
    return client


@pytest.fixture
def org_a(db) -> Tenant:
    return make_tenant("Alpha")


@pytest.fixture
def org_b(db) -> Tenant:
    return make_tenant("Beta")


@pytest.fixture
def default_model(db):
    """The embedded SmolLM2-135M-Instruct, registered (converted once per data folder)."""
    from django.core.management import call_command

    from tuneplex.basemodels.models import BaseModel

    call_command("prepare_default_model")
    return BaseModel.objects.get(name="SmolLM2-135M-Instruct")


@pytest.fixture
def viewer_of_a(org_a) -> User:
    return add_member(org_a, Role.VIEWER)


@pytest.fixture
def member_of_a(org_a) -> User:
    return add_member(org_a, Role.MEMBER)


# --- a real Celery worker on the test database -----------------------------------------------------

import os  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import httpx  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _database_url(settings_dict: dict) -> str:
    if settings_dict["ENGINE"].endswith("sqlite3"):
        return f"sqlite:///{settings_dict['NAME']}"
    user = settings_dict.get("USER") or "postgres"
    password = f":{settings_dict['PASSWORD']}" if settings_dict.get("PASSWORD") else ""
    host = settings_dict.get("HOST") or "127.0.0.1"
    port = settings_dict.get("PORT") or 5432
    return f"postgres://{user}{password}@{host}:{port}/{settings_dict['NAME']}"


class WorkerProcess:
    """A real `celery worker` process on the test database; stopped (or killed) by its fixture."""

    def __init__(self, *, queues: str, database_url: str, name: str, extra_env: dict | None = None):
        environ = dict(os.environ, DATABASE_URL=database_url, TUNEPLEX_JOB_HEARTBEAT_SECONDS="1",
                       **(extra_env or {}))
        self.log_path = Path(os.environ.get("TUNEPLEX_DATA_DIR", "/tmp")) / f"worker-{name}.log"
        self._log = self.log_path.open("w")
        self.process = subprocess.Popen(
            [str(Path(sys.executable).parent / "celery"), "-A", "jobs.celery", "worker",
             "--queues", queues, "--concurrency", "1", "--prefetch-multiplier", "1",
             "--hostname", f"{name}-{os.getpid()}@%h", "--loglevel", "INFO", "--without-gossip",
             "--without-mingle"],
            cwd=REPO, env=environ, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True)
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and "ready." not in self.log_path.read_text():
                assert self.process.poll() is None, self.log_path.read_text()[-3000:]
                time.sleep(0.3)
            assert "ready." in self.log_path.read_text(), self.log_path.read_text()[-3000:]
        except BaseException:
            self.stop()
            raise

    def kill(self) -> None:
        """SIGKILL the whole process group: worker, pool child and trainer, like a lost node."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def stop(self) -> None:
        stop_process_group(self.process, timeout=30)
        self._log.close()


@pytest.fixture(scope="session")
def test_database_url(django_db_setup, django_db_blocker) -> str:
    from django.db import connection

    with django_db_blocker.unblock():
        return _database_url(connection.settings_dict)


@pytest.fixture(scope="session")
def celery_worker(test_database_url):
    """A real worker for the `default` queue (statistics, job validation, dispatch).

    Tests that use it must commit their rows (``@pytest.mark.django_db(transaction=True)``).
    """
    worker = WorkerProcess(queues="default,statistics", database_url=test_database_url, name="default")
    try:
        yield worker
    finally:
        worker.stop()


@pytest.fixture
def gpu_workers(test_database_url):
    """Starts real workers for the `gpu` queue on demand; all are stopped after the test."""
    started: list[WorkerProcess] = []

    def start(name: str = "gpu", extra_env: dict | None = None) -> WorkerProcess:
        worker = WorkerProcess(queues="gpu", database_url=test_database_url,
                               name=f"{name}{len(started)}", extra_env=extra_env)
        started.append(worker)
        return worker

    try:
        yield start
    finally:
        for worker in started:
            worker.stop()


def wait_for(predicate, *, timeout: float, interval: float = 0.3, message: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {message}")


# --- a real vLLM CPU server, and the gateway (uvicorn) in front of it ----------------------------------

import shutil  # noqa: E402

from django.conf import settings as django_settings  # noqa: E402
import socket  # noqa: E402

from serving.engine import EngineProcess, EngineSpec, stop_process_group  # noqa: E402

MODEL = "SmolLM2-135M-Instruct"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def model_dir() -> Path:
    path = django_settings.MODELS_DIR / MODEL
    if not (path / "config.json").exists():
        subprocess.run([str(django_settings.TRAINER_PYTHON), "-m", "jobs.training.gguf_convert",
                        "--out", str(path)], cwd=REPO, check=True, capture_output=True)
    return path


@pytest.fixture(scope="session")
def engine_spec(model_dir) -> EngineSpec:
    return EngineSpec(python=django_settings.ENGINE_PYTHON, model_dir=str(model_dir), served_name=MODEL,
                      port=free_port(), max_loras=2, max_cpu_loras=4, max_lora_rank=16,
                      max_model_len=1024)


@pytest.fixture(scope="session")
def engine(engine_spec, tmp_path_factory):
    process = EngineProcess(engine_spec, tmp_path_factory.mktemp("engine") / "vllm.log")
    process.start()
    try:
        process.wait_ready(timeout=300)
        yield process
    finally:
        process.stop()


@pytest.fixture(scope="session")
def adapters(model_dir, tmp_path_factory) -> dict[str, Path]:
    """Five working adapters and one with a truncated weights file."""
    out = tmp_path_factory.mktemp("adapters")
    subprocess.run([str(django_settings.TRAINER_PYTHON), str(REPO / "tests/fixtures/make_adapters.py"),
                    str(model_dir), str(out), "5"], cwd=REPO, check=True, capture_output=True,
                   env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)})
    found = {p.name: p for p in sorted(out.iterdir())}
    corrupt = out / "corrupt"
    shutil.copytree(found["adapter-0"], corrupt)
    weights = corrupt / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 3])
    found["corrupt"] = corrupt
    return found


def _unload_all(url: str) -> None:
    models = httpx.get(f"{url}/v1/models", timeout=10).json()["data"]
    for model in models:
        if model.get("parent"):
            httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": model["id"]}, timeout=10)


class GatewayProcess:
    """The real ASGI app under uvicorn, on the test database, attached to the test engine."""

    def __init__(self, *, database_url: str, engine: EngineProcess, extra_env: dict | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.engine_url = engine.url
        environ = dict(os.environ, DATABASE_URL=database_url, TUNEPLEX_ENGINE_MODE="attach",
                       TUNEPLEX_ENGINE_URLS=engine.url,
                       TUNEPLEX_ENGINE_LORA_SLOTS=str(engine.spec.max_cpu_loras),
                       TUNEPLEX_ENGINE_MAX_LORA_RANK=str(engine.spec.max_lora_rank),
                       TUNEPLEX_ENGINE_RECONCILE_SECONDS="1", **(extra_env or {}))
        self.log_path = Path(os.environ.get("TUNEPLEX_DATA_DIR", "/tmp")) / f"gateway-{self.port}.log"
        self._log = self.log_path.open("w")
        self.process = subprocess.Popen(
            [str(Path(sys.executable).parent / "uvicorn"), "tuneplex.asgi:application",
             "--host", "127.0.0.1", "--port", str(self.port), "--no-access-log"],
            cwd=REPO, env=environ, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_for(self._healthy, timeout=60, message=f"the gateway (log {self.log_path})")
        except BaseException:
            self.stop()
            raise

    def _healthy(self) -> bool:
        assert self.process.poll() is None, self.log_path.read_text()[-3000:]
        try:
            return httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        stop_process_group(self.process)
        self._log.close()


@pytest.fixture(scope="module")
def gateway(engine, test_database_url):
    """uvicorn serving the platform for this module's tests; the engine is emptied afterwards."""
    _unload_all(engine.url)
    process = GatewayProcess(database_url=test_database_url, engine=engine)
    try:
        yield process
    finally:
        process.stop()
        _unload_all(engine.url)


# --- a real S3-compatible server (moto's server mode) ---------------------------------------------


@dataclass
class S3Server:
    endpoint: str
    bucket: str

    def environment(self) -> dict[str, str]:
        """What a process (worker, web) needs to use this bucket as artifact storage."""
        return {"TUNEPLEX_STORAGE": "s3", "TUNEPLEX_S3_BUCKET": self.bucket,
                "TUNEPLEX_S3_ENDPOINT_URL": self.endpoint, "TUNEPLEX_S3_REGION": "us-east-1",
                "TUNEPLEX_S3_PREFIX": "tuneplex", "AWS_ACCESS_KEY_ID": "tuneplex-test",
                "AWS_SECRET_ACCESS_KEY": "tuneplex-test"}

    def storages_setting(self) -> dict:
        artifacts = {"BACKEND": "storages.backends.s3.S3Storage", "OPTIONS": {
            "bucket_name": self.bucket, "endpoint_url": self.endpoint, "region_name": "us-east-1",
            "location": "tuneplex", "file_overwrite": False, "default_acl": None,
            "access_key": "tuneplex-test", "secret_key": "tuneplex-test"}}
        return {"default": artifacts, "artifacts": artifacts,
                "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"}}


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """moto's S3 server over HTTP on a free port, with one bucket; stopped after the session."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("s3") / "moto.log"
    with log_path.open("w") as log:
        process = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H",
                                    "127.0.0.1", "-p", str(port)], stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    try:
        endpoint = f"http://127.0.0.1:{port}"

        def answers() -> bool:
            assert process.poll() is None, log_path.read_text()[-2000:]
            try:
                return httpx.get(f"{endpoint}/", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(answers, timeout=30, message="the S3 server")
        server = S3Server(endpoint=endpoint, bucket="tuneplex-test")
        httpx.put(f"{endpoint}/{server.bucket}", timeout=5).raise_for_status()
        yield server
    finally:
        stop_process_group(process, timeout=10)


@pytest.fixture
def s3_artifacts(s3_server, settings):
    """Artifact storage is the S3 bucket for this test (this process; pass
    ``s3_server.environment()`` to the processes it starts)."""
    settings.STORAGES = s3_server.storages_setting()
    return s3_server
