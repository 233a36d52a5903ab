"""The pool agent's HTTP interface against its real process (`manage.py run_engine`).

The replica runs with a stand-in for vLLM (tests/serving/stub_engine.py as the engine's Python):
it records the environment it was started with, serves canned vLLM metrics and never becomes
ready, so the agent stays up in front of it for as long as a test needs. The agent is the real
one: its threads, deadlines, key check and bind address are what production runs.
"""

from __future__ import annotations

import json
import os
import selectors
import socket
import ssl
import stat
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from serving.engine import auth_headers, stop_process_group
from tests.conftest import REPO, free_port_pair, wait_for

pytestmark = pytest.mark.django_db  # the test database exists (the replica reads a base model)

THREADS = 4
READ_TIMEOUT = 2  # seconds
# What the agent's process holds that the engine must never see (item: the engine gets no secret).
PLATFORM_SECRETS = {
    "SECRET_KEY": "s" * 40,
    "AWS_ACCESS_KEY_ID": "platform-access-key",
    "AWS_SECRET_ACCESS_KEY": "platform-secret",
    "TUNEPLEX_AGENT_S3_SECRET_ACCESS_KEY": "agent-secret",
    "TUNEPLEX_AGENT_S3_ACCESS_KEY_ID": "agent-access-key",
    "TUNEPLEX_METRICS_TOKEN": "m" * 30,
    "TUNEPLEX_OIDC_CLIENT_SECRET": "oidc-secret",
    "HF_TOKEN": "hf_not_for_the_engine",
    "VLLM_API_KEY": "an-inherited-key-that-is-not-the-engines",
}
# ... and what it needs.
ENGINE_SETTINGS = {"OMP_NUM_THREADS": "2", "CUDA_VISIBLE_DEVICES": "0", "HF_HOME": "/tmp/hf-home",
                   "VLLM_LOGGING_LEVEL": "WARNING", "NCCL_DEBUG": "WARN", "LC_ALL": "C.UTF-8",
                   "ENGINE_EXTRA": "named-by-the-operator"}


class StubReplica:
    def __init__(self, tmp: Path, database_url: str, model: str, *, tls: dict | None = None,
                 environment: dict[str, str | None] | None = None) -> None:
        """``tls``: the certificate files (cert, key, ca) the replica serves https with;
        ``environment``: settings to add (a value of None removes one)."""
        self.port = free_port_pair()
        self.url = f"{'https' if tls else 'http'}://localhost:{self.port}"
        self.verify = ssl.create_default_context(cafile=tls["ca"]) if tls else True
        stub = tmp / "engine-python"
        stub.write_text(f"#!{sys.executable}\n" + (REPO / "tests/serving/stub_engine.py").read_text())
        stub.chmod(stub.stat().st_mode | stat.S_IXUSR)
        self.env_record = Path(f"{stub}.env.json")
        from django.conf import settings

        self.api_key = settings.ENGINE_API_KEY
        environ = {k: v for k, v in os.environ.items() if not k.startswith("TUNEPLEX_ENGINE_HOST")}
        environ.update(PLATFORM_SECRETS, **ENGINE_SETTINGS, DATABASE_URL=database_url,
                       TUNEPLEX_ENGINE_PYTHON=str(stub), TUNEPLEX_ENGINE_API_KEY=self.api_key,
                       TUNEPLEX_ENGINE_ENV_PASS="ENGINE_EXTRA",
                       TUNEPLEX_AGENT_THREADS=str(THREADS),
                       TUNEPLEX_AGENT_READ_TIMEOUT=str(READ_TIMEOUT),
                       TUNEPLEX_SERVING_DIR=str(tmp / "serving"))
        for name, value in (environment or {}).items():
            if value is None:
                environ.pop(name, None)
            else:
                environ[name] = value
        if tls:
            environ.update(TUNEPLEX_ENGINE_TLS_CERT=tls["cert"], TUNEPLEX_ENGINE_TLS_KEY=tls["key"],
                           SSL_CERT_FILE=tls["ca"])  # the CA the agent trusts for its vLLM
        self.log_path = tmp / "replica.log"
        self._log = self.log_path.open("a")
        self.process = subprocess.Popen(
            [sys.executable, "manage.py", "run_engine", "--model", model, "--port", str(self.port),
             "--timeout", "600", "--advertise", "localhost"],
            cwd=REPO, env=environ, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)

    def answers(self) -> bool:
        assert self.process.poll() is None, self.log_path.read_text()[-3000:]
        try:
            return httpx.get(f"{self.url}/healthz", timeout=2, verify=self.verify).status_code == 200
        except httpx.HTTPError:
            return False

    def raw(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=10)

    def stop(self) -> None:
        stop_process_group(self.process, timeout=10)
        self._log.close()


@pytest.fixture(scope="module")
def base_model_row(django_db_setup, django_db_blocker):
    """A base model row the replicas start for (the stand-in engine never reads its files)."""
    from tuneplex.basemodels.models import BaseModel

    with django_db_blocker.unblock():
        base = BaseModel.objects.create(name="agent-test-model", directory="/nonexistent",
                                        parameter_count=1, max_sequence_length=2048,
                                        has_chat_template=True)
    yield base.name
    with django_db_blocker.unblock():
        base.delete()


@contextmanager
def running(replica: StubReplica):
    try:
        wait_for(replica.answers, timeout=60, message=f"the pool agent ({replica.log_path})")
        wait_for(replica.env_record.exists, timeout=30, message="the engine to start")
        yield replica
    finally:
        replica.stop()


# S3 storage (never reached: the stand-in engine asks for no adapter).
S3 = {"TUNEPLEX_STORAGE": "s3", "TUNEPLEX_S3_BUCKET": "tuneplex",
      "TUNEPLEX_S3_ENDPOINT_URL": "http://127.0.0.1:9"}
NO_OWN_STORAGE_USER = "TUNEPLEX_AGENT_S3_ACCESS_KEY_ID is not set"


@pytest.fixture(scope="module")
def replica(base_model_row, test_database_url, tmp_path_factory):
    with running(StubReplica(tmp_path_factory.mktemp("agent"), test_database_url, base_model_row,
                             environment=S3)) as replica:
        yield replica


def read_response(sock: socket.socket) -> tuple[int, dict, bytes]:
    """Status, headers and body of one answer, read until the server closes the connection."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in header_lines)}
    return int(status_line.split()[1]), headers, body


ONE_GIB = 2**30


def test_an_unauthenticated_body_is_refused_before_it_is_read(replica):
    with replica.raw() as sock:
        started = time.monotonic()
        sock.sendall(b"POST /v1/leases HTTP/1.1\r\nHost: agent\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n{\"adapter\": " % ONE_GIB)
        status, headers, body = read_response(sock)  # while 1 GiB is still owed
    assert status == 401 and json.loads(body)["error"]["code"] == "unauthorized"
    assert time.monotonic() - started < READ_TIMEOUT  # answered, not cut off at the deadline
    assert headers["connection"] == "close"
    # A client that asks before sending its body (Expect: 100-continue) is told no instead of
    # "continue"; with the key, it is told to go on.
    with replica.raw() as sock:
        sock.sendall(b"POST /v1/leases HTTP/1.1\r\nHost: agent\r\nExpect: 100-continue\r\n"
                     b"Content-Length: %d\r\nAuthorization: Bearer wrong\r\n\r\n" % ONE_GIB)
        assert read_response(sock)[0] == 401
    with replica.raw() as sock:
        sock.sendall(b"POST /v1/leases/release HTTP/1.1\r\nHost: agent\r\nExpect: 100-continue\r\n"
                     b"Content-Length: 15\r\nAuthorization: Bearer %s\r\n\r\n" % replica.api_key.encode())
        assert sock.recv(100).startswith(b"HTTP/1.1 100 Continue")
        sock.sendall(b'{"leases": []} ')
        assert b"HTTP/1.1 200" in sock.recv(65536)


def test_a_body_over_the_limit_is_refused_from_its_length_unread(replica):
    with replica.raw() as sock:
        started = time.monotonic()
        sock.sendall(b"POST /v1/leases/renew HTTP/1.1\r\nHost: agent\r\nContent-Length: %d\r\n"
                     b"Authorization: Bearer %s\r\n\r\n" % (ONE_GIB, replica.api_key.encode()))
        status, _, body = read_response(sock)
    assert status == 413 and json.loads(body)["error"]["code"] == "body_too_large"
    assert time.monotonic() - started < READ_TIMEOUT
    # Bad lengths and bodies are precise 4xx answers.
    for head, expected in ((b"Content-Length: -5", 400), (b"Transfer-Encoding: chunked", 411)):
        with replica.raw() as sock:
            sock.sendall(b"POST /v1/leases HTTP/1.1\r\nHost: agent\r\n%s\r\nAuthorization: Bearer %s"
                         b"\r\n\r\n" % (head, replica.api_key.encode()))
            assert read_response(sock)[0] == expected, head
    answer = httpx.post(f"{replica.url}/v1/leases/renew", json={"leases": 5},
                        headers=auth_headers(replica.api_key))
    assert answer.status_code == 400 and answer.json()["error"]["code"] == "invalid_field"
    # A body within the limit is read and served.
    answer = httpx.post(f"{replica.url}/v1/leases/renew", json={"leases": ["x" * 100] * 1000},
                        headers=auth_headers(replica.api_key))
    assert answer.status_code == 200 and len(answer.json()["unknown"]) == 1000


def test_a_slow_client_is_cut_off_at_the_deadline_however_steadily_it_trickles(replica):
    request = (b"POST /v1/leases HTTP/1.1\r\nHost: agent\r\nAuthorization: Bearer "
               + replica.api_key.encode() + b"\r\nContent-Length: 2\r\n\r\n{}")
    with replica.raw() as sock:
        started = time.monotonic()
        cut_at = None
        for byte in request[:-1]:  # never the whole request; a byte every 0.25 s
            if closed_by_peer(sock, bytes([byte]), wait=0.25):
                cut_at = time.monotonic()
                break
    assert cut_at is not None, "the agent kept reading a trickling request"
    assert READ_TIMEOUT - 0.5 < cut_at - started < READ_TIMEOUT + 2
    # The same request, sent whole, is served.
    with replica.raw() as sock:
        sock.sendall(request)
        assert read_response(sock)[0] != 408


def closed_by_peer(sock: socket.socket, data: bytes, *, wait: float) -> bool:
    """Sends ``data``, then waits up to ``wait`` seconds: True once the agent has closed."""
    try:
        sock.sendall(data)
        with selectors.DefaultSelector() as selector:
            selector.register(sock, selectors.EVENT_READ)
            return bool(selector.select(wait)) and sock.recv(1) == b""
    except ConnectionError:  # reset by the agent
        return True


def test_the_thread_bound_holds_a_request_beyond_it_waits_for_a_free_thread(replica):
    """THREADS slow clients hold every thread; one more request is answered only once the
    deadline has freed a thread (unbounded threads would answer it at once)."""
    slow = [replica.raw() for _ in range(THREADS)]
    for sock in slow:
        sock.sendall(b"POST /v1/leases HTTP/1.1\r\n")  # and nothing more
    started = time.monotonic()
    health = replica.raw()
    health.sendall(b"GET /healthz HTTP/1.1\r\nHost: agent\r\n\r\n")
    first_cut = answered = None
    with selectors.DefaultSelector() as selector:
        for sock in [*slow, health]:
            selector.register(sock, selectors.EVENT_READ)
        while answered is None and time.monotonic() - started < 4 * READ_TIMEOUT:
            for key, _ in selector.select(0.5):
                if key.fileobj is health:
                    answered = time.monotonic()
                elif key.fileobj.recv(1) == b"":
                    first_cut = first_cut or time.monotonic()
                    selector.unregister(key.fileobj)
    assert answered is not None, "the request beyond the bound was never answered"
    assert first_cut is not None and first_cut <= answered
    assert answered - started >= READ_TIMEOUT - 0.5
    assert read_response(health)[0] == 200
    for sock in [*slow, health]:
        sock.close()


def test_the_agent_listens_on_loopback_unless_told_otherwise(replica):
    listening = {address for address, port in listeners() if port == replica.port}
    assert listening == {"127.0.0.1"}


def listeners() -> list[tuple[str, int]]:
    """(address, port) of every listening IPv4 TCP socket on this machine."""
    found = []
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        if state == "0A":  # LISTEN
            address, port = local.split(":")
            found.append((socket.inet_ntoa(bytes.fromhex(address)[::-1]), int(port, 16)))
    return found


def test_the_engine_process_gets_an_allow_listed_environment(replica):
    environment = json.loads(replica.env_record.read_text())
    for name in PLATFORM_SECRETS:
        assert name not in environment or name == "VLLM_API_KEY", name
    assert environment["VLLM_API_KEY"] == replica.api_key  # the engine's own key, from the spec
    for name in ("DATABASE_URL", "REDIS_URL", "DJANGO_SETTINGS_MODULE", "TUNEPLEX_DATA_DIR",
                 "PYTHONPATH"):
        assert name not in environment, name
    assert not [name for name in environment if name.startswith("TUNEPLEX_")]
    assert {k: environment.get(k) for k in ENGINE_SETTINGS} == ENGINE_SETTINGS
    assert environment["PATH"] and environment["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    assert environment["HF_HUB_OFFLINE"] == "1"


def test_engine_metrics_come_through_the_agent_without_adapter_names(replica):
    answer = httpx.get(f"{replica.url}/metrics/engine", timeout=10)
    assert answer.status_code == 200
    assert 'vllm:num_requests_running{engine="0",model_name="agent-test-model"} 1.0' in answer.text
    assert "lora_requests_info" not in answer.text and "acme" not in answer.text
    # The engine itself does name them (this is what the agent removed).
    engine = httpx.get(f"http://127.0.0.1:{replica.port + 1}/metrics", timeout=10).text
    assert "acme" in engine
    # Served by the same rule as /metrics: not through a proxy without the token.
    proxied = httpx.get(f"{replica.url}/metrics/engine", headers={"X-Forwarded-For": "203.0.113.9"})
    assert proxied.status_code == 403


def test_a_replica_without_its_own_storage_user_warns(replica, base_model_row, test_database_url,
                                                      tmp_path):
    assert NO_OWN_STORAGE_USER not in replica.log_path.read_text()  # it has one
    without = {**S3, "TUNEPLEX_AGENT_S3_ACCESS_KEY_ID": None,
               "TUNEPLEX_AGENT_S3_SECRET_ACCESS_KEY": None}
    with running(StubReplica(tmp_path, test_database_url, base_model_row,
                             environment=without)) as other:
        assert NO_OWN_STORAGE_USER in other.log_path.read_text()


# --- TLS on the replica ----------------------------------------------------------------------------

def certificates(folder: Path) -> dict[str, str]:
    """A private CA and a certificate it signed for localhost (openssl, as an operator would)."""
    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
            "-days", "1", "-subj", "/CN=Tuneplex test CA")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "engine.key", "-out", "engine.csr",
            "-subj", "/CN=localhost")
    (folder / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", "engine.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", "engine.pem", "-days", "1", "-extfile", "san.ext")
    return {"cert": str(folder / "engine.pem"), "key": str(folder / "engine.key"),
            "ca": str(folder / "ca.pem")}


def test_a_replica_with_a_certificate_serves_both_hops_over_tls(base_model_row, test_database_url,
                                                                 tmp_path, monkeypatch):
    tls = certificates(tmp_path)
    with running(StubReplica(tmp_path, test_database_url, base_model_row, tls=tls)) as replica:
        key = auth_headers(replica.api_key)
        state = httpx.get(f"{replica.url}/v1/state", headers=key, verify=replica.verify).json()
        assert state["engine_url"] == f"https://localhost:{replica.port + 1}"  # what gateways use
        # The agent reached its vLLM over TLS, verifying it (the stand-in serves https only).
        engine = httpx.get(f"{replica.url}/metrics/engine", verify=replica.verify)
        assert engine.status_code == 200 and "vllm:num_requests_running" in engine.text
        with pytest.raises(httpx.HTTPError):  # the same port in the clear: no answer
            httpx.get(f"http://localhost:{replica.port}/healthz", timeout=5)
        with pytest.raises(httpx.ConnectError):  # an untrusted certificate is refused
            httpx.get(f"{replica.url}/healthz", timeout=5)
        assert "Traceback" not in replica.log_path.read_text()  # routine: no log flood
        # A gateway's pool client, trusting the CA through SSL_CERT_FILE, routes to it over https.
        monkeypatch.setenv("SSL_CERT_FILE", tls["ca"])
        from serving.client import PoolClient

        pool = PoolClient([replica.url], api_key=replica.api_key, slots=4)
        try:
            pool.refresh()
            assert pool.replicas[0].engine_url == f"https://localhost:{replica.port + 1}"
        finally:
            pool.client.close()
