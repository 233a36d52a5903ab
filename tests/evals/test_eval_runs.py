"""Eval runs on a real Celery worker (the `evals` queue) over answers made elsewhere (a jsonl
source: no engine needed): items graded and stored, totals and statistics, a run resumed after
its worker went silent grades no item twice."""

from __future__ import annotations

import openai
import pytest

from tests.conftest import WorkerProcess, wait_for
from tuneplex.evals.executor import sweep
from tuneplex.evals.models import EvalOutputItem, EvalRun

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True),
              pytest.mark.filterwarnings("ignore:The Evals API is deprecated:DeprecationWarning")]

ITEM_SCHEMA = {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]}
CRITERIA = [
    {"type": "string_check", "name": "exact", "input": "{{sample.output_text}}",
     "reference": "{{item.answer}}", "operation": "eq"},
    {"type": "text_similarity", "name": "close", "input": "{{sample.output_text}}",
     "reference": "{{item.answer}}", "evaluation_metric": "fuzzy_match", "pass_threshold": 0.75},
    {"type": "json_check", "name": "json", "input": "{{sample.output_text}}"},
]


@pytest.fixture(scope="module")
def evals_worker(test_database_url):
    worker = WorkerProcess(queues="evals", database_url=test_database_url, name="evals",
                           extra_env={"TUNEPLEX_EVAL_HEARTBEAT_SECONDS": "1"})
    try:
        yield worker
    finally:
        worker.stop()


def sdk(live_server, tenant) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live_server.url}/v1", api_key=tenant.owner_key, max_retries=0)


def entries(outputs: list[tuple[str, str]]) -> dict:
    return {"type": "jsonl", "source": {"type": "file_content", "content": [
        {"item": {"answer": answer}, "sample": {"output_text": output}} for answer, output in outputs]}}


def finished(client, run):
    def done():
        current = client.evals.runs.retrieve(run.id, eval_id=run.eval_id)
        return current if current.status not in ("queued", "in_progress") else None
    return wait_for(done, timeout=60, message=f"run {run.id} to finish")


def test_a_jsonl_run_grades_every_item_and_reports_totals(live_server, org_a, evals_worker):
    client = sdk(live_server, org_a)
    made = client.evals.create(data_source_config={"type": "custom", "item_schema": ITEM_SCHEMA},
                               testing_criteria=CRITERIA)
    outputs = [('{"a": 1}', '{"a": 1}'),   # all three pass
               ('{"a": 1}', '{"a": 2}'),   # close and json pass, exact fails
               ("[1, 2]", "nonsense")]     # all three fail
    run = client.evals.runs.create(made.id, data_source=entries(outputs))
    done = finished(client, run)
    assert done.status == "completed", done.error
    assert done.result_counts.model_dump() == {"total": 3, "passed": 1, "failed": 2, "errored": 0}
    per = {r.testing_criteria: (r.passed, r.failed) for r in done.per_testing_criteria_results}
    assert per == {"exact": (1, 2), "close": (2, 1), "json": (2, 1)}
    statistics = done.model_extra["statistics"]
    exact = statistics["exact"]["pass_rate"]
    assert exact["n"] == 3 and exact["estimate"] == pytest.approx(1 / 3)
    assert exact["low"] < 1 / 3 < exact["high"]
    items = client.evals.runs.output_items.list(run.id, eval_id=made.id)
    assert [i.datasource_item_id for i in items] == [0, 1, 2]
    assert [i.status for i in items] == ["pass", "fail", "fail"]
    assert [r.name for r in items.data[0].results] == ["exact", "close", "json"]
    failing = client.evals.runs.output_items.list(run.id, eval_id=made.id, status="fail")
    assert [i.datasource_item_id for i in failing] == [1, 2]
    one = client.evals.runs.output_items.retrieve(items.data[1].id, eval_id=made.id, run_id=run.id)
    assert one.sample.output[0].content == '{"a": 2}' and one.datasource_item == {"answer": '{"a": 1}'}


def test_a_run_whose_worker_went_silent_resumes_after_its_stored_items(live_server, org_a,
                                                                     evals_worker, monkeypatch):
    """The first attempt is played by the test: it claims the run, stores two items and goes
    silent. The sweep queues the run again; the worker's attempt grades only the other items."""
    from tuneplex.evals import services
    from tuneplex.evals.worker_writes import eval_run_claim, eval_run_record_items

    client = sdk(live_server, org_a)
    made = client.evals.create(data_source_config={"type": "custom", "item_schema": ITEM_SCHEMA},
                               testing_criteria=CRITERIA[:1])
    outputs = [(str(i), str(i) if i % 2 else "x") for i in range(6)]
    # The run's message is held back (the live server runs in this process), so that the test's
    # attempt claims it first.
    monkeypatch.setattr(services, "enqueue_run", lambda run_id: None)
    run = client.evals.runs.create(made.id, data_source=entries(outputs))
    claimed = eval_run_claim(run_id=run.id)
    assert claimed is not None and claimed.attempts == 1
    stored = [{"datasource_item_id": i, "datasource_item": {"answer": str(i)},
               "sample": {"model": "", "output": [{"role": "assistant", "content": "planted"}]},
               "results": [{"name": "exact", "type": "string_check", "score": 0.0, "passed": False}],
               "status": "fail"} for i in (0, 3)]
    assert eval_run_record_items(run=claimed, attempt=claimed.attempts, outputs=stored)
    EvalRun.objects.filter(pk=run.id).update(heartbeat_at="2000-01-01T00:00:00Z")
    swept = sweep()
    assert run.id in swept["requeued"] and run.id in swept["resent"]
    done = finished(client, run)
    assert done.status == "completed"
    rows = EvalOutputItem.objects.filter(run_id=run.id)
    assert sorted(rows.values_list("datasource_item_id", flat=True)) == list(range(6))
    # The planted items were not graded again (their planted output is still there) ...
    assert rows.get(datasource_item_id=3).sample["output"][0]["content"] == "planted"
    # ... and the others were graded by the worker: odd ones pass.
    assert rows.get(datasource_item_id=5).status == "pass"
    assert rows.get(datasource_item_id=2).status == "fail"
    assert done.result_counts.total == 6 and done.result_counts.passed == 2
    assert EvalRun.objects.get(pk=run.id).attempts == 2
    # The worker's attempt answered only the four items it did not find stored.
    messages = [event["message"] for event in done.model_extra["events"]]
    assert "Attempt 2 resumes: 2 of 6 items were graded before." in messages
    assert messages[-1] == "Attempt 2 graded 4 items."
