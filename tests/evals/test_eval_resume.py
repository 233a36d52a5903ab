"""A killed eval worker's run is resumed by another, on the real replica, grading no item twice.

Its own module: no other worker of the `evals` queue may run meanwhile (an idle one, even
paused, is already waiting on the queue and takes the run's message first).
"""

from __future__ import annotations

import pytest

from tests.conftest import wait_for
from tests.evals.test_eval_engine import ITEM_SCHEMA, completions, finished, sdk, start_worker
from tuneplex.evals.executor import sweep
from tuneplex.evals.models import EvalOutputItem, EvalRun

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True),
              pytest.mark.filterwarnings("ignore:The Evals API is deprecated:DeprecationWarning")]


def test_a_killed_worker_is_resumed_by_another_without_regrading(gateway, org_a, default_model,
                                                                 engine, test_database_url):
    """Twelve long answers; the only worker is SIGKILLed once some are stored. The sweep queues
    the run again; a new worker grades only the rest: the items stored before stay as they
    were. (No other worker of the queue may run meanwhile: an idle one, even paused, would
    already be waiting on the queue and take the run's message.)"""
    client = sdk(gateway, org_a)
    made = client.evals.create(data_source_config={"type": "custom", "item_schema": ITEM_SCHEMA},
                               testing_criteria=[{"type": "string_check", "name": "x",
                                                  "input": "{{sample.output_text}}",
                                                  "reference": "{{item.answer}}", "operation": "like"}])
    victim = start_worker(test_database_url, engine, "evals-victim")
    replacement = None
    try:
        run = client.evals.runs.create(made.id, data_source=completions(
            [{"question": f"Tell me a story about the number {i}.", "answer": "x"}
             for i in range(12)], max_completion_tokens=48))
        wait_for(lambda: EvalOutputItem.objects.filter(run_id=run.id).count() >= 4, timeout=180,
                 interval=0.5, message="a first batch of items to be stored")
        victim.kill()
        replacement = start_worker(test_database_url, engine, "evals-replacement")
        before = {row.datasource_item_id: (row.id, row.sample["output"])
                  for row in EvalOutputItem.objects.filter(run_id=run.id)}
        assert 4 <= len(before) < 12
        EvalRun.objects.filter(pk=run.id).update(heartbeat_at="2000-01-01T00:00:00Z")  # its silence
        swept = sweep()
        assert run.id in swept["requeued"] and run.id in swept["resent"]
        done = finished(client, run)
        assert done.status == "completed"
        rows = {row.datasource_item_id: (row.id, row.sample["output"])
                for row in EvalOutputItem.objects.filter(run_id=run.id)}
        assert sorted(rows) == list(range(12))
        assert all(rows[index] == before[index] for index in before)
        messages = [event["message"] for event in done.model_extra["events"]]
        assert f"Attempt 2 resumes: {len(before)} of 12 items were graded before." in messages
        assert messages[-1] == f"Attempt 2 graded {12 - len(before)} items."
    finally:
        victim.stop()
        if replacement is not None:
            replacement.stop()
