"""Eval runs whose samples and judges come from the real vLLM replica on the embedded model,
through the gateway's own admission, routing and settlement, run by a real Celery worker.

Everything real: uvicorn (the API), a `celery worker` on the `evals` queue attached to the
replica, vLLM, PostgreSQL, Redis. The model is tiny: the items are built so that its answers
are checked by what they must be (an answer that cannot contain the reference fails), and a
judge cut off after one token cannot be parsed.
"""

from __future__ import annotations

import openai
import pytest
from django.conf import settings as django_settings

from tests.conftest import MODEL, REPLICA_SLOTS, WorkerProcess, wait_for
from tuneplex.inference.models import UsageDaily

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True),
              pytest.mark.filterwarnings("ignore:The Evals API is deprecated:DeprecationWarning")]

ITEM_SCHEMA = {"type": "object", "properties": {"question": {"type": "string"},
                                                "answer": {"type": "string"}},
               "required": ["question", "answer"]}
TEMPLATE = {"type": "template", "template": [
    {"role": "system", "content": "Answer in a few words."},
    {"role": "user", "content": "{{item.question}}"}]}


def start_worker(test_database_url, engine, name: str) -> WorkerProcess:
    return WorkerProcess(queues="evals", database_url=test_database_url, name=name, extra_env={
        "TUNEPLEX_ENGINE_MODE": "attach", "TUNEPLEX_ENGINE_URLS": engine.url,
        "TUNEPLEX_ENGINE_API_KEY": django_settings.ENGINE_API_KEY,
        "TUNEPLEX_ENGINE_LORA_SLOTS": str(REPLICA_SLOTS), "TUNEPLEX_ENGINE_LEASE_SECONDS": "6",
        "TUNEPLEX_EVAL_HEARTBEAT_SECONDS": "1", "TUNEPLEX_EVAL_CONCURRENCY": "4"})


@pytest.fixture(scope="module")
def evals_worker(engine, test_database_url):
    worker = start_worker(test_database_url, engine, "evals-engine")
    try:
        yield worker
    finally:
        worker.stop()


def sdk(gateway, tenant) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=tenant.owner_key, max_retries=0)


def finished(client, run, timeout: float = 240):
    def done():
        current = client.evals.runs.retrieve(run.id, eval_id=run.eval_id)
        return current if current.status not in ("queued", "in_progress") else None
    return wait_for(done, timeout=timeout, interval=1, message=f"run {run.id} to finish")


def completions(items: list[dict], **sampling) -> dict:
    return {"type": "completions", "model": MODEL, "input_messages": TEMPLATE,
            "sampling_params": {"temperature": 0, "max_completion_tokens": 16, **sampling},
            "source": {"type": "file_content", "content": [{"item": item} for item in items]}}


def test_the_model_answers_each_item_and_judges_grade_or_error(gateway, evals_worker, org_a,
                                                              default_model):
    client = sdk(gateway, org_a)
    made = client.evals.create(
        name="capitals",
        data_source_config={"type": "custom", "item_schema": ITEM_SCHEMA, "include_sample_schema": True},
        testing_criteria=[
            # The answer to "the capital of France" names Paris; no answer contains the
            # made-up word, so the second item fails whatever the model says.
            {"type": "string_check", "name": "names it", "input": "{{sample.output_text}}",
             "reference": "{{item.answer}}", "operation": "ilike"},
            {"type": "label_model", "name": "judge", "model": MODEL,
             "input": [{"role": "user", "content": "Is '{{sample.output_text}}' a correct answer "
                                                   "to '{{item.question}}'? Say yes or no."}],
             "labels": ["yes", "no"], "passing_labels": ["yes"]},
        ])
    run = client.evals.runs.create(made.id, data_source=completions([
        {"question": "What is the capital of France?", "answer": "paris"},
        {"question": "What is the capital of France?", "answer": "zqxjkvw"}]))
    done = finished(client, run)
    assert done.status == "completed", done.error
    items = {i.datasource_item_id: i for i in client.evals.runs.output_items.list(run.id, eval_id=made.id)}
    assert len(items) == 2
    first, second = items[0], items[1]
    assert "paris" in first.sample.output[0].content.lower()
    assert first.sample.usage.completion_tokens > 0 and first.sample.model == MODEL
    checks = {r.name: r for r in first.results}
    assert checks["names it"].passed and not {r.name: r for r in second.results}["names it"].passed
    # The judge (the same small model, held to the two labels) answered something parseable.
    judged = checks["judge"]
    assert judged.model_extra.get("error") is None and judged.score in (0.0, 1.0)
    assert judged.sample["output"] and judged.sample["usage"]["completion_tokens"] > 0
    # Tokens: the answers' and the judge's, per model, and counted against the organization.
    usage = {u.run_model_name: u for u in done.per_model_usage}
    assert usage[MODEL].invocation_count == 4  # two samples, two judge calls
    counted = wait_for(lambda: UsageDaily.objects.filter(organization=org_a.organization).first(),
                       timeout=15, message="the run's usage to be written")
    wait_for(lambda: UsageDaily.objects.get(pk=counted.pk).requests >= 4, timeout=15,
             message="every request of the run to be counted")
    total = UsageDaily.objects.get(pk=counted.pk)
    assert total.completion_tokens == usage[MODEL].completion_tokens


def test_a_judge_answer_that_cannot_be_parsed_is_an_errored_item(gateway, evals_worker, org_a,
                                                                default_model):
    client = sdk(gateway, org_a)
    made = client.evals.create(
        data_source_config={"type": "custom", "item_schema": ITEM_SCHEMA},
        testing_criteria=[{"type": "score_model", "name": "score", "model": MODEL,
                           "input": [{"role": "user", "content": "Rate '{{sample.output_text}}'."}],
                           "range": [0, 10], "pass_threshold": 5,
                           # One token: the judge's JSON is cut off before its score.
                           "sampling_params": {"max_completions_tokens": 1}}])
    run = client.evals.runs.create(made.id, data_source=completions(
        [{"question": "What is the capital of France?", "answer": "paris"}]))
    done = finished(client, run)
    assert done.status == "completed"  # the run carries on: the item is errored, not the run
    assert done.result_counts.errored == 1
    item = client.evals.runs.output_items.list(run.id, eval_id=made.id).data[0]
    assert item.status == "error"
    assert item.results[0].model_extra["error"]["code"] == "judge_unparseable"
