"""README command 1, end to end: deploy/up.sh on the embedded default (SQLite, filesystem broker,
local files), then the web server, a real Celery worker and the login page, processes that die
and are started again alone by the supervisor, then a clean stop."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from django.conf import settings

from serving.engine import group_alive
from tests.conftest import free_port_pair, wait_for

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT = 480  # builds nothing here, but starts vLLM (about a minute)

pytestmark = pytest.mark.e2e


def _start(data_dir: Path) -> dict:
    """deploy/up.sh in a data folder of its own, waited for until it prints that it is ready."""
    port, engine_port = free_port_pair(), free_port_pair()
    environ = {k: v for k, v in os.environ.items()
               if not k.startswith(("TUNEPLEX_", "DATABASE_URL", "REDIS_URL", "DJANGO_"))}
    # Reuse the converted base model of the test run so the smoke test does not convert twice.
    environ.update(TUNEPLEX_DATA_DIR=str(data_dir), TUNEPLEX_PORT=str(port),
                   TUNEPLEX_ENGINE_PORT=str(engine_port), TUNEPLEX_MODELS_DIR=str(settings.MODELS_DIR))
    log = (data_dir / "up.log").open("w+")
    process = subprocess.Popen(["bash", "deploy/up.sh"], cwd=REPO, env=environ, stdout=log,
                               stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline and process.poll() is None and \
                "Tuneplex is ready at" not in (data_dir / "up.log").read_text():
            time.sleep(1)
        output = (data_dir / "up.log").read_text()
        assert "Tuneplex is ready at" in output, output[-4000:]
    except BaseException:
        _stop(process)
        raise
    key = re.search(r"api key:\s+(\S+)", output).group(1)
    password = re.search(r"password:\s+(\S+)", output).group(1)
    return {"url": f"http://127.0.0.1:{port}", "key": key, "password": password,
            "engine_url": f"http://127.0.0.1:{engine_port}",  # the replica's pool agent
            "vllm_url": f"http://127.0.0.1:{engine_port + 1}",
            "process": process, "data_dir": data_dir, "output": output}


@pytest.fixture(scope="module")
def running(tmp_path_factory):
    """The module's instance of command 1, started on first use and started again for the next
    test if one stopped it (Ctrl-C), so that every test stands alone, in any order."""
    started: list[dict] = []

    def current() -> dict:
        if not started or started[-1]["process"].poll() is not None:
            started.append(_start(tmp_path_factory.mktemp("embedded")))
        return started[-1]

    try:
        yield current
    finally:
        for instance in started:
            _stop(instance["process"])


@pytest.fixture
def embedded(running) -> dict:
    return running()


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


def test_it_serves_healthz_and_the_login_page(embedded):
    assert httpx.get(embedded["url"] + "/healthz").json() == {"status": "ok"}
    login = httpx.get(embedded["url"] + "/login/")
    assert login.status_code == 200 and "Sign in" in login.text
    htmx = httpx.get(embedded["url"] + "/static/vendor/htmx-2.0.11.min.js")
    assert htmx.status_code == 200 and "htmx" in htmx.text[:200]


def test_it_runs_on_sqlite_and_the_serverless_broker(embedded):
    ready = httpx.get(embedded["url"] + "/readyz").json()
    assert ready["status"] == "ok", ready
    assert ready["checks"]["serving"] == "ok"  # the replica command 1 started is up
    assert ready["database_engine"] == "sqlite3" and ready["broker"] == "filesystem"
    assert (embedded["data_dir"] / "db.sqlite3").is_file()
    assert (embedded["data_dir"] / "broker" / "queue").is_dir()


def _worker_answers(embedded) -> None:
    environ = {k: v for k, v in os.environ.items()
               if not k.startswith(("TUNEPLEX_", "DATABASE_URL", "REDIS_URL"))}
    environ["TUNEPLEX_DATA_DIR"] = str(embedded["data_dir"])
    result = subprocess.run([str(REPO / ".venv/bin/python"), "manage.py", "check_worker",
                             "--timeout", "60"], cwd=REPO, env=environ, capture_output=True,
                            text=True, timeout=90)
    assert result.returncode == 0, result.stderr
    assert "worker answered" in result.stdout and "Python 3." in result.stdout


def test_a_real_worker_consumes_the_queue(embedded):
    _worker_answers(embedded)


def test_the_printed_key_and_password_work(embedded):
    headers = {"Authorization": f"Bearer {embedded['key']}"}
    org = httpx.get(embedded["url"] + "/v1/organization", headers=headers)
    assert org.status_code == 200 and org.json()["name"] == "Demo"
    models = httpx.get(embedded["url"] + "/v1/base_models", headers=headers).json()
    assert [m["id"] for m in models["data"]] == ["SmolLM2-135M-Instruct"]
    with httpx.Client(base_url=embedded["url"]) as browser:
        browser.get("/login/")
        response = browser.post("/login/", data={
            "username": "demo", "password": embedded["password"],
            "csrfmiddlewaretoken": browser.cookies["csrftoken"]}, follow_redirects=True)
        assert response.status_code == 200 and "Demo" in response.text and "owner" in response.text


def test_a_new_user_can_chat_with_the_base_model_right_away(embedded):
    """Command 1 started a vLLM replica; the gateway serves the base model with the demo key."""
    assert "Inference: " + embedded["url"] + "/v1/chat/completions" in embedded["output"]
    headers = {"Authorization": f"Bearer {embedded['key']}"}
    models = httpx.get(embedded["url"] + "/v1/models", headers=headers).json()
    assert [m["id"] for m in models["data"]] == ["SmolLM2-135M-Instruct"]
    answer = httpx.post(embedded["url"] + "/v1/chat/completions", headers=headers, timeout=120, json={
        "model": "SmolLM2-135M-Instruct", "max_tokens": 8, "temperature": 0,
        "messages": [{"role": "user", "content": "What is the capital of France?"}]})
    assert answer.status_code == 200, answer.text
    assert "Paris" in answer.json()["choices"][0]["message"]["content"]
    assert answer.json()["usage"]["completion_tokens"] >= 1


def test_uploads_over_the_limit_are_refused_before_the_body_is_read(embedded):
    """The ASGI guard answers from Content-Length alone: no 5 GB spooled to disk first."""
    import socket as sockets
    from urllib.parse import urlsplit

    parts = urlsplit(embedded["url"])
    head = (f"POST /v1/files HTTP/1.1\r\nHost: {parts.netloc}\r\n"
            f"Authorization: Bearer {embedded['key']}\r\nContent-Type: multipart/form-data; "
            f"boundary=x\r\nContent-Length: {5 * 2**30}\r\n\r\n").encode()
    with sockets.create_connection((parts.hostname, parts.port), timeout=10) as sock:
        sock.sendall(head + b"--x\r\n")
        reply = b""
        while chunk := sock.recv(4096):  # headers and body may come in separate packets
            reply += chunk
        reply = reply.decode()
    assert reply.startswith("HTTP/1.1 413")
    assert '"code": "request_too_large"' in reply and "file size limit" in reply


def test_a_dataset_round_trips_and_an_interrupted_upload_leaves_nothing(embedded):
    from tests.files.test_interrupted_upload import send_upload
    from tests.fixtures.datasets import good_chat

    headers = {"Authorization": f"Bearer {embedded['key']}"}
    org_blobs = embedded["data_dir"] / "artifacts" / "orgs"

    def listed() -> list[dict]:
        return httpx.get(embedded["url"] + "/v1/files", headers=headers).json()["data"]

    def blobs() -> list[Path]:
        return list(org_blobs.rglob("*.jsonl")) if org_blobs.exists() else []

    content = good_chat(20_000)
    # Cut off mid-body; the server closing the connection is its signal that it is done with it.
    cut_off = send_upload(embedded["url"], embedded["key"], content, send_fraction=0.3)
    assert not cut_off.startswith(b"HTTP/1.1 2"), cut_off[:300]
    assert listed() == [] and blobs() == []
    # The positive control: the same upload, sent whole, leaves its file and its blob.
    completed = send_upload(embedded["url"], embedded["key"], content)
    assert completed.startswith(b"HTTP/1.1 200"), completed[:300]
    assert [f["bytes"] for f in listed()] == [len(content)] and len(blobs()) == 1

    created = httpx.post(embedded["url"] + "/v1/files", headers=headers,
                         data={"purpose": "fine-tune"}, files={"file": ("d.jsonl", good_chat(20))})
    assert created.status_code == 200 and created.json()["status"] == "processed"
    file_id = created.json()["id"]
    # The embedded worker (filesystem broker) computes statistics.
    state = wait_for(lambda: (s := httpx.get(f"{embedded['url']}/v1/files/{file_id}",
                                             headers=headers).json())["statistics_status"]
                     in ("ready", "failed") and s, timeout=120, interval=1,
                     message="the file's statistics")
    assert state["statistics_status"] == "ready", state
    assert state["statistics"]["examples"] == 20


def _supervised(embedded) -> dict:
    return json.loads((embedded["data_dir"] / "supervise.json").read_text())


def _replaced(embedded, name: str, old_pid: int) -> dict | None:
    state = _supervised(embedded)
    return state if state[name]["pid"] not in (None, old_pid) else None


def test_every_process_runs_on_its_own_under_the_supervisor(embedded):
    state = _supervised(embedded)
    assert set(state) == {"web", "beat", "worker-default", "worker-statistics", "worker-evals",
                          "worker-gpu", "worker-exports", "engine"}
    assert all(program["pid"] for program in state.values()), state


def test_a_killed_worker_is_started_again_alone(embedded):
    before = _supervised(embedded)
    victim = before["worker-default"]["pid"]
    os.killpg(victim, signal.SIGKILL)  # the worker and its pool child, like an OOM kill
    after = wait_for(lambda: _replaced(embedded, "worker-default", victim), timeout=60,
                     message="the supervisor to start the worker again")
    assert after["worker-default"]["restarts"] == before["worker-default"]["restarts"] + 1
    assert {n: p["pid"] for n, p in after.items() if n != "worker-default"} == \
        {n: p["pid"] for n, p in before.items() if n != "worker-default"}
    assert httpx.get(embedded["url"] + "/healthz").status_code == 200
    _worker_answers(embedded)  # the new worker answers


def test_a_killed_engine_is_started_again_alone_and_serves_again(embedded):
    before = _supervised(embedded)
    victim = before["engine"]["pid"]
    vllm = int(subprocess.run(["pgrep", "-P", str(victim)], capture_output=True, text=True).stdout.split()[0])
    os.kill(victim, signal.SIGKILL)  # the replica process; its vLLM is told to stop with it
    after = wait_for(lambda: _replaced(embedded, "engine", victim), timeout=60,
                     message="the supervisor to start the engine again")
    wait_for(lambda: not group_alive(vllm), timeout=30, message="the old vLLM and its engine core to stop")
    assert {n: p["pid"] for n, p in after.items() if n != "engine"} == \
        {n: p["pid"] for n, p in before.items() if n != "engine"}
    # The rest kept serving meanwhile; inference comes back once the new engine is up.
    assert httpx.get(embedded["url"] + "/login/").status_code == 200
    ready = httpx.get(embedded["url"] + "/readyz").json()
    assert ready["status"] in ("ok", "degraded") and ready["checks"]["database"] == "ok"
    headers = {"Authorization": f"Bearer {embedded['key']}"}

    def answered():
        reply = httpx.post(embedded["url"] + "/v1/chat/completions", headers=headers, timeout=120, json={
            "model": "SmolLM2-135M-Instruct", "max_tokens": 4,
            "messages": [{"role": "user", "content": "Hi"}]})
        return reply.status_code == 200

    wait_for(answered, timeout=400, interval=2, message="inference to work again")
    assert httpx.get(embedded["url"] + "/readyz").json()["checks"]["serving"] == "ok"


def test_ctrl_c_stops_every_process(embedded):
    process = embedded["process"]
    os.killpg(process.pid, signal.SIGINT)
    process.wait(timeout=30)
    time.sleep(1)
    with pytest.raises(ProcessLookupError):
        os.killpg(process.pid, 0)
    with pytest.raises(httpx.ConnectError):
        httpx.get(embedded["url"] + "/healthz", timeout=2)
    with pytest.raises(httpx.ConnectError):  # the replica's agent and engine are gone too
        httpx.get(embedded["engine_url"] + "/healthz", timeout=2)
    with pytest.raises(httpx.ConnectError):
        httpx.get(embedded["vllm_url"] + "/health", timeout=2)
