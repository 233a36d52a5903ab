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
        return Principal(organization=self.organization, scopes=membership.scopes,
                         user=membership.user, membership=membership)


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
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()
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
    worker = WorkerProcess(queues="default", database_url=test_database_url, name="default")
    try:
        yield worker
    finally:
        worker.stop()


@pytest.fixture
def gpu_workers(test_database_url):
    """Starts real workers for the `gpu` queue on demand; all are stopped after the test."""
    started: list[WorkerProcess] = []

    def start(name: str = "gpu") -> WorkerProcess:
        worker = WorkerProcess(queues="gpu", database_url=test_database_url,
                               name=f"{name}{len(started)}")
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
