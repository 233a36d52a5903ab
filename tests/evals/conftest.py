"""Fixtures of the evaluation tests that use the real replica."""

from __future__ import annotations

import subprocess

import pytest
from django.conf import settings as django_settings

from tests.conftest import REPLICA_SLOTS, REPO, WorkerProcess


@pytest.fixture(scope="module")
def built(adapters, tmp_path_factory) -> dict:
    """Two adapters made on purpose from one random adapter: ``clean`` (B zeroed: the base
    model's own answers) and ``wrecked`` (B times 40: answers that no longer make sense)."""
    out = tmp_path_factory.mktemp("gate-adapters")
    made = {}
    for name, scale in (("clean", "0"), ("wrecked", "40")):
        subprocess.run([str(django_settings.TRAINER_PYTHON), str(REPO / "tests/fixtures/scale_adapter.py"),
                        str(adapters["adapter-1"]), str(out / name), scale], check=True,
                       capture_output=True)
        made[name] = out / name
    return made


@pytest.fixture(scope="module")
def gate_worker(engine, test_database_url):
    """A worker of the evals queue (the gate's runs and its decision), attached to the replica."""
    process = WorkerProcess(queues="evals", database_url=test_database_url, name="gate",
                            extra_env={"TUNEPLEX_ENGINE_MODE": "attach", "TUNEPLEX_ENGINE_URLS": engine.url,
                                       "TUNEPLEX_ENGINE_API_KEY": django_settings.ENGINE_API_KEY,
                                       "TUNEPLEX_ENGINE_LORA_SLOTS": str(REPLICA_SLOTS),
                                       "TUNEPLEX_ENGINE_LEASE_SECONDS": "6",
                                       "TUNEPLEX_EVAL_HEARTBEAT_SECONDS": "1"})
    try:
        yield process
    finally:
        process.stop()
