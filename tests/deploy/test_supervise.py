"""deploy/supervise.py: command 1's supervisor, with real processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from serving.engine import group_alive
from tests.conftest import wait_for

REPO = Path(__file__).resolve().parents[2]
# A program that starts a helper in its own process group (like a worker's pool child, or vLLM's
# engine core) and then waits.
WITH_HELPER = (f"{sys.executable} -c \"import subprocess, time; "
               f"subprocess.Popen(['sleep', '600']); time.sleep(600)\"")


@pytest.fixture
def supervisor(tmp_path):
    state = tmp_path / "state.json"
    process = subprocess.Popen(
        [sys.executable, str(REPO / "deploy/supervise.py"), "--logs", str(tmp_path / "logs"),
         "--state", str(state), f"steady={WITH_HELPER}", f"victim={WITH_HELPER}"],
        stdout=(tmp_path / "supervise.log").open("w"), stderr=subprocess.STDOUT, start_new_session=True)

    def read() -> dict:
        try:
            return json.loads(state.read_text())
        except (FileNotFoundError, ValueError):
            return {}

    try:
        wait_for(lambda: all(p.get("pid") for p in read().values()) and len(read()) == 2, timeout=30,
                 message="both programs to start")
        yield process, read, tmp_path
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def test_a_program_that_dies_is_started_again_alone(supervisor):
    process, read, tmp_path = supervisor
    before = read()
    victim = before["victim"]["pid"]
    os.kill(victim, signal.SIGKILL)  # its helper stays behind in its group, orphaned
    after = wait_for(lambda: (s := read())["victim"]["pid"] not in (None, victim) and s, timeout=30,
                     message="the victim to be started again")
    assert after["victim"]["restarts"] == 1 and after["victim"]["exits"] == [-signal.SIGKILL]
    assert after["steady"]["pid"] == before["steady"]["pid"] and after["steady"]["restarts"] == 0
    assert not group_alive(victim)  # the orphaned helper was ended with its group
    assert "victim exited with status -9; starting it again in 1s" in (tmp_path / "supervise.log").read_text()


def test_sigterm_stops_every_program_and_its_helpers(supervisor):
    process, read, _ = supervisor
    groups = [p["pid"] for p in read().values()]
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 0
    assert not any(group_alive(pgid) for pgid in groups)
