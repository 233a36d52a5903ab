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


def _flush_through_deadlocks() -> None:
    """Let the TRUNCATE between transactional tests wait out a real worker's transaction.

    The session's Celery workers run on the test database and pick up what a test enqueued on
    commit (a dispatch after a job is paused, say) while the next test's teardown flushes every
    table in one TRUNCATE. Postgres then detects a deadlock between the two and may choose the
    TRUNCATE as its victim: that is the test's teardown failing, not the platform. Retry it."""
    import time

    from django.db import OperationalError
    from django.db.backends.postgresql.operations import DatabaseOperations

    flush = DatabaseOperations.execute_sql_flush
    retried_codes = {"40P01", "55P03"}  # deadlock_detected, lock_not_available

    def execute_sql_flush(self, sql_list):
        for attempt in range(1, 6):
            try:
                return flush(self, sql_list)
            except OperationalError as exc:
                if attempt == 5 or getattr(exc.__cause__, "sqlstate", None) not in retried_codes:
                    raise
                time.sleep(0.2 * attempt)

    DatabaseOperations.execute_sql_flush = execute_sql_flush


_flush_through_deadlocks()


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
    """A real worker for the `default` queue (statistics, job validation, dispatch) and the
    `exports` queue (an adapter's exports, converted on the CPU).

    Tests that use it must commit their rows (``@pytest.mark.django_db(transaction=True)``).
    """
    worker = WorkerProcess(queues="default,statistics,exports", database_url=test_database_url,
                           name="default")
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


def wait_for(predicate, *, timeout: float, interval: float = 0.3, message="condition"):
    """``message``: a text, or a function giving it when the time is up (what was last seen)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    text = message() if callable(message) else message
    raise AssertionError(f"timed out after {timeout}s waiting for {text}")


# --- real serving replicas (vLLM CPU + pool agent), and the gateway (uvicorn) in front of them --------

import shutil  # noqa: E402

from django.conf import settings as django_settings  # noqa: E402
import socket  # noqa: E402

from serving.engine import auth_headers, stop_process_group  # noqa: E402

MODEL = "SmolLM2-135M-Instruct"
REPLICA_SLOTS = 4  # adapters per replica in the tests (vLLM --max-cpu-loras), --max-loras 2


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def free_port_pair() -> int:
    """A port P with P + 1 free as well (a replica's agent and its engine)."""
    for _ in range(50):
        port = free_port()
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no two consecutive free ports")


@pytest.fixture(scope="session")
def model_dir() -> Path:
    path = django_settings.MODELS_DIR / MODEL
    if not (path / "config.json").exists():
        subprocess.run([str(django_settings.TRAINER_PYTHON), "-m", "jobs.training.gguf_convert",
                        "--out", str(path)], cwd=REPO, check=True, capture_output=True)
    return path


TEST_FLEET = f"tests-{os.getpid()}"  # the fleet the session's replicas register in


class ReplicaProcess:
    """`manage.py run_engine`: one vLLM CPU replica and its pool agent, on the test database, with
    a serving folder of its own (no shared volume). ``url`` is the agent (the replica's address),
    ``engine_url`` the vLLM server."""

    def __init__(self, *, database_url: str, name: str, serving_dir: Path) -> None:
        self.name = name
        self.port = free_port_pair()
        self.url = f"http://127.0.0.1:{self.port}"
        self.engine_url = f"http://127.0.0.1:{self.port + 1}"
        self.api_key = django_settings.ENGINE_API_KEY
        self.serving_dir = serving_dir
        self.environ = dict(os.environ, DATABASE_URL=database_url, TUNEPLEX_SERVING_DIR=str(serving_dir),
                            TUNEPLEX_ENGINE_API_KEY=self.api_key, TUNEPLEX_ENGINE_MAX_LORAS="2",
                            TUNEPLEX_ENGINE_LORA_SLOTS=str(REPLICA_SLOTS),
                            TUNEPLEX_ENGINE_MAX_MODEL_LEN="1024",
                            # Tests ask the agent to reconcile (POST /v1/reconcile) when they
                            # mean it, so its slots change only when a test expects it.
                            TUNEPLEX_ENGINE_RECONCILE_SECONDS="3600",
                            TUNEPLEX_ENGINE_LEASE_SECONDS="6",
                            # the session's own fleet: a replica another test (deploy/up.sh) starts
                            # on the same Redis is never one of these tests' members
                            TUNEPLEX_SERVING_FLEET=TEST_FLEET, TUNEPLEX_MEMBERSHIP_HEARTBEAT_SECONDS="1")
        self.log_path = Path(os.environ.get("TUNEPLEX_DATA_DIR", "/tmp")) / f"replica-{name}-{self.port}.log"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self._log = self.log_path.open("a")
        self.process = subprocess.Popen(
            [sys.executable, "manage.py", "run_engine", "--port", str(self.port), "--timeout", "400"],
            cwd=REPO, env=self.environ, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout: float = 400) -> None:
        wait_for(self.ready, timeout=timeout, interval=1, message=f"replica {self.name} ({self.log_path})")

    def ready(self) -> bool:
        assert self.process.poll() is None, self.log_path.read_text()[-3000:]
        return bool(self.state().get("ready"))

    def state(self) -> dict:
        try:
            response = httpx.get(f"{self.url}/v1/state", headers=auth_headers(self.api_key), timeout=5)
            return response.json() if response.status_code == 200 else {}
        except httpx.HTTPError:
            return {}

    def reconcile(self) -> dict:
        """Ask the agent to follow the deployed set now."""
        try:
            return httpx.post(f"{self.url}/v1/reconcile", headers=auth_headers(self.api_key),
                              timeout=120).json()
        except httpx.HTTPError:
            return {}

    def engine_adapters(self) -> set[str]:
        """What vLLM itself has loaded."""
        models = httpx.get(f"{self.engine_url}/v1/models", headers=auth_headers(self.api_key),
                           timeout=10).json()["data"]
        return {m["id"] for m in models if m.get("parent")}

    def engine_pid(self) -> int:
        """The vLLM API server's pid (the replica process's child)."""
        children = subprocess.run(["pgrep", "-P", str(self.process.pid)], capture_output=True,
                                  text=True).stdout.split()
        assert children, "the replica has no engine process"
        return int(children[0])

    def stop(self) -> None:
        if self.process is not None:
            stop_process_group(self.process)
            self._log.close()


@pytest.fixture(scope="session")
def registered_base_model(django_db_setup, django_db_blocker, model_dir):
    """Registers the embedded base model (committed) for a replica about to start: transactional
    tests flush the tables, so each start registers it again."""
    from django.core.management import call_command

    def register() -> None:
        with django_db_blocker.unblock():
            call_command("prepare_default_model")
    return register


from contextlib import contextmanager  # noqa: E402


@contextmanager
def _running_replica(name: str, test_database_url: str, tmp_path_factory, register):
    register()
    replica = ReplicaProcess(database_url=test_database_url, name=name,
                             serving_dir=tmp_path_factory.mktemp(f"serving-{name}"))
    replica.start()
    try:
        replica.wait_ready()
        yield replica
    finally:
        replica.stop()


@pytest.fixture(scope="session")
def engine(registered_base_model, test_database_url, tmp_path_factory):
    """The first serving replica, shared by every serving test of the session."""
    with _running_replica("a", test_database_url, tmp_path_factory, registered_base_model) as replica:
        yield replica


@pytest.fixture(scope="session")
def second_engine(engine, registered_base_model, test_database_url, tmp_path_factory):
    """A second replica (started when a test first needs two): with ``engine``, two at most."""
    with _running_replica("b", test_database_url, tmp_path_factory, registered_base_model) as replica:
        yield replica


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


def empty_replicas(*replicas: ReplicaProcess) -> None:
    """Wait until no replica holds an adapter: the tests' rows are gone (flushed), and each agent,
    asked to follow the database, unloads them once no lease holds them."""
    for replica in replicas:
        wait_for(lambda: replica.reconcile() and replica.state().get("ready")
                 and not replica.state().get("loaded") and not replica.engine_adapters(),
                 timeout=60, message=f"replica {replica.name} to unload every adapter")


class GatewayProcess:
    """The real ASGI app under uvicorn, on the test database, attached to the test replicas."""

    def __init__(self, *, database_url: str, engine: ReplicaProcess | None,
                 extra_env: dict | None = None, replicas: list[ReplicaProcess] | None = None,
                 port: int | None = None, workers: int = 1,
                 app: str = "tuneplex.asgi:application", fleet: bool = False):
        """With no engine (and no replicas) the platform runs with inference off, unless
        ``fleet``: then it serves the replicas registered in the session's fleet. ``workers``:
        uvicorn's worker processes (more than one wants PROMETHEUS_MULTIPROC_DIR in extra_env);
        ``app``: the ASGI application to serve (a test's variant of the platform's)."""
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.replicas = replicas or ([engine] if engine is not None else [])
        self.engine_url = ",".join(r.url for r in self.replicas)  # TUNEPLEX_ENGINE_URLS
        if fleet:
            serving = {"TUNEPLEX_ENGINE_MODE": "attach", "TUNEPLEX_SERVING_FLEET": TEST_FLEET}
        elif self.replicas:
            serving = {"TUNEPLEX_ENGINE_MODE": "attach", "TUNEPLEX_ENGINE_URLS": self.engine_url}
        else:
            serving = {"TUNEPLEX_ENGINE_MODE": "off"}
        environ = dict(os.environ, DATABASE_URL=database_url, **serving,
                       TUNEPLEX_ENGINE_API_KEY=django_settings.ENGINE_API_KEY,
                       TUNEPLEX_ENGINE_LORA_SLOTS=str(REPLICA_SLOTS),
                       TUNEPLEX_ENGINE_LEASE_SECONDS="6", **(extra_env or {}))
        self.log_path = Path(os.environ.get("TUNEPLEX_DATA_DIR", "/tmp")) / f"gateway-{self.port}.log"
        self._log = self.log_path.open("w")
        self.process = subprocess.Popen(
            [str(Path(sys.executable).parent / "uvicorn"), app,
             "--host", "127.0.0.1", "--port", str(self.port), "--no-access-log",
             *(["--workers", str(workers)] if workers > 1 else [])],
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
    """uvicorn serving the platform for this module's tests, on the first replica."""
    process = GatewayProcess(database_url=test_database_url, engine=engine)
    try:
        yield process
    finally:
        process.stop()
        empty_replicas(engine)


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
        return {"default": artifacts, "artifacts": artifacts, "serving": artifacts,
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


# --- a real MLflow tracking server (experiment tracking) -----------------------------------------

MLFLOW_SERVER = REPO / ".venv-mlflow" / "bin" / "mlflow"


@dataclass
class MlflowServer:
    url: str
    root: Path  # its backend store (SQLite) and proxied artifacts


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """`mlflow server` from its own environment (deploy/setup.sh --with-tests builds
    .venv-mlflow) on a free port, with a SQLite backend store and the artifacts it proxies in a
    temporary folder; its process group is stopped after the session, whatever the tests did."""
    assert MLFLOW_SERVER.exists(), "run deploy/setup.sh --with-tests: it builds .venv-mlflow"
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    log_path = root / "server.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [str(MLFLOW_SERVER), "server", "--host", "127.0.0.1", "--port", str(port),
             "--workers", "1", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
             "--artifacts-destination", str(root / "artifacts")],
            cwd=root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"

        def answers() -> bool:
            assert process.poll() is None, log_path.read_text()[-3000:]
            try:
                return httpx.get(f"{url}/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(answers, timeout=180, interval=0.5, message="the MLflow tracking server")
        yield MlflowServer(url=url, root=root)
    finally:
        stop_process_group(process, timeout=15)
