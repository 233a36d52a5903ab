"""A killed batch worker's batch is resumed by another, on the real replica, sending no line twice.

Its own module: no other worker of the `evals` queue may run meanwhile (an idle one, even paused,
is already waiting on the queue and takes the batch's message first).
"""

from __future__ import annotations

import re

import httpx
import pytest

from serving.engine import auth_headers
from tests.batches.conftest import chat_line, finished, jsonl, sdk, start_worker, upload
from tests.conftest import wait_for
from tuneplex.batches.executor import sweep
from tuneplex.batches.models import Batch, BatchRequest

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

LINES = 40


def engine_metric(engine, name: str) -> float:
    """The sum of vLLM's own series of ``name`` (every label)."""
    text = httpx.get(f"{engine.engine_url}/metrics", headers=auth_headers(engine.api_key),
                     timeout=10).text
    return sum(float(v) for v in re.findall(rf"^{re.escape(name)}\{{[^}}]*\}} ([0-9.e+]+)$",
                                            text, re.M))


def engine_idle(engine) -> bool:
    return engine_metric(engine, "vllm:num_requests_running") + engine_metric(
        engine, "vllm:num_requests_waiting") == 0


def test_a_killed_worker_is_resumed_by_another_without_sending_a_line_twice(
        gateway, org_a, default_model, engine, test_database_url):
    """Forty long answers; the only worker is SIGKILLed once some are recorded. The sweep
    releases the batch; a new worker sends only the lines never sent: those answered before
    keep their answers, those in flight at the kill are reported interrupted (never sent
    again), and the engine gets exactly the rest."""
    client = sdk(gateway, org_a)
    file = upload(client, [chat_line(i, max_tokens=24, content=f"Tell a story about {i}.")
                           for i in range(LINES)])
    victim = start_worker(test_database_url, engine, "batches-victim")
    replacement = None
    try:
        batch = client.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions",
                                      completion_window="24h")
        wait_for(lambda: BatchRequest.objects.filter(batch_id=batch.id, state="succeeded")
                 .count() >= 4, timeout=300, interval=0.2, message="a few recorded answers")
        victim.kill()
        rows = {row.line: row for row in BatchRequest.objects.filter(batch_id=batch.id)}
        answered = {line: row for line, row in rows.items() if row.state == "succeeded"}
        in_flight = {line for line, row in rows.items() if row.state == "in_flight"}
        assert len(answered) >= 4 and in_flight and len(rows) < LINES
        wait_for(lambda: engine_idle(engine), timeout=60, message="the engine to drop the "
                 "killed worker's requests")
        served_before = engine_metric(engine, "vllm:request_success_total")

        replacement = start_worker(test_database_url, engine, "batches-replacement")
        Batch.objects.filter(pk=batch.id).update(heartbeat_at="2000-01-01T00:00:00Z")  # silent
        swept = sweep()
        assert batch.id in swept["requeued"] and batch.id in swept["resent"]
        done = finished(client, batch)
        assert done.status == "completed", done.errors

        lines = {line["custom_id"]: line for line in
                 jsonl(client, done.output_file_id) + jsonl(client, done.error_file_id)}
        assert sorted(lines) == sorted(f"request-{i}" for i in range(LINES))
        for number, row in answered.items():  # kept as recorded, not asked again
            line = lines[f"request-{number - 1}"]
            assert line["id"] == row.id and line["response"]["body"] == row.response
        for number in in_flight:  # maybe answered: never sent again
            line = lines[f"request-{number - 1}"]
            assert line["response"] is None
            assert line["error"]["code"] == "batch_request_interrupted"
        # The replacement sent each line that had never been sent, once, and nothing else.
        assert engine_metric(engine, "vllm:request_success_total") - served_before == \
            LINES - len(rows)
        assert done.request_counts.completed == LINES - len(in_flight)
        assert done.request_counts.failed == len(in_flight)
    finally:
        victim.stop()
        if replacement is not None:
            replacement.stop()
