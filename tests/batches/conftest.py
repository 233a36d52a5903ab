"""Fixtures and helpers of the batch tests: the official SDK against the platform, a worker of
the `evals` queue (the queue of background inference) attached to the real replica."""

from __future__ import annotations

import json

import openai
import pytest
from django.conf import settings as django_settings

from tests.conftest import MODEL, REPLICA_SLOTS, WorkerProcess, wait_for

ENDED = ("completed", "failed", "expired", "cancelled")


def start_worker(test_database_url, engine, name: str, **env: str) -> WorkerProcess:
    return WorkerProcess(queues="evals", database_url=test_database_url, name=name, extra_env={
        "TUNEPLEX_ENGINE_MODE": "attach", "TUNEPLEX_ENGINE_URLS": engine.url,
        "TUNEPLEX_ENGINE_API_KEY": django_settings.ENGINE_API_KEY,
        "TUNEPLEX_ENGINE_LORA_SLOTS": str(REPLICA_SLOTS), "TUNEPLEX_ENGINE_LEASE_SECONDS": "6",
        "TUNEPLEX_BATCH_HEARTBEAT_SECONDS": "1", **env})


def sdk(server, tenant) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=tenant.owner_key, max_retries=0)


def chat_line(index: int, *, custom_id: str | None = None, max_tokens: int = 2,
              content: str | None = None, **body) -> dict:
    return {"custom_id": custom_id or f"request-{index}", "method": "POST",
            "url": "/v1/chat/completions", "body": {
                "model": MODEL, "temperature": 0, "max_tokens": max_tokens,
                "messages": [{"role": "user", "content": content or f"Say the number {index}."}],
                **body}}


def upload(client: openai.OpenAI, lines: list, name: str = "batch.jsonl"):
    """A file of purpose batch; ``lines`` are dicts (one JSON line each) or raw strings."""
    text = "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines)
    return client.files.create(file=(name, text.encode()), purpose="batch")


def finished(client: openai.OpenAI, batch, timeout: float = 900):
    def ended():
        current = client.batches.retrieve(batch.id)
        return current if current.status in ENDED else None
    return wait_for(ended, timeout=timeout, interval=0.5, message=f"batch {batch.id} to end")


def jsonl(client: openai.OpenAI, file_id: str | None) -> list[dict]:
    if file_id is None:
        return []
    return [json.loads(line) for line in client.files.content(file_id).text.splitlines()]


@pytest.fixture(scope="module")
def batches_worker(engine, test_database_url):
    worker = start_worker(test_database_url, engine, "batches")
    try:
        yield worker
    finally:
        worker.stop()
