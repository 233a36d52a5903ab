"""Batches answered by the real vLLM replica, through the gateway's own admission, routing and
settlement, by a real Celery worker of the `evals` queue, driven through the official SDK.

Everything real: uvicorn (the API), the worker attached to the replica, vLLM, PostgreSQL, Redis.
max_tokens stays tiny: the engine shares two cores with everything else.
"""

from __future__ import annotations

import pytest
from django.db.models.functions import Now

from tests.batches.conftest import chat_line, finished, jsonl, sdk, upload
from tests.conftest import MODEL, wait_for
from tuneplex.batches.models import Batch, BatchRequest
from tuneplex.inference.models import UsageDaily

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]
LINES = 50


def usage(organization) -> tuple[int, int, int]:
    row = UsageDaily.objects.filter(organization=organization, model=MODEL).first()
    return (0, 0, 0) if row is None else (row.requests, row.prompt_tokens, row.completion_tokens)


def test_a_batch_answers_every_line_and_counts_its_usage(gateway, batches_worker, org_a,
                                                         default_model):
    """50 lines here; the issue's 200-request batch runs in tests/e2e/test_openai_migration.py."""
    client = sdk(gateway, org_a)
    file = upload(client, [chat_line(i) for i in range(LINES)])
    batch = client.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions",
                                  completion_window="24h", metadata={"purpose": "test"})
    seen = wait_for(lambda: (b := client.batches.retrieve(batch.id)).request_counts.completed
                    and b, timeout=300, message="the first answers to be counted")
    assert seen.status in ("in_progress", "finalizing", "completed")
    done = finished(client, batch)
    assert done.status == "completed", done.errors
    assert done.request_counts.model_dump() == {"total": LINES, "completed": LINES, "failed": 0}
    assert done.in_progress_at <= done.finalizing_at <= done.completed_at
    assert done.model == MODEL and done.error_file_id is None

    lines = jsonl(client, done.output_file_id)
    assert [line["custom_id"] for line in lines] == [f"request-{i}" for i in range(LINES)]
    assert len({line["id"] for line in lines}) == LINES
    assert all(line["id"].startswith("batch_req_") and line["error"] is None
               and line["response"]["status_code"] == 200
               and line["response"]["request_id"].startswith("req_")
               and line["response"]["body"]["object"] == "chat.completion"
               and line["response"]["body"]["usage"]["completion_tokens"] <= 2 for line in lines)
    output = client.files.retrieve(done.output_file_id)
    assert output.purpose == "batch_output" and output.filename == f"{batch.id}_output.jsonl"

    # The usage of the answers, as the batch sums it and as the organization was charged.
    prompt = sum(line["response"]["body"]["usage"]["prompt_tokens"] for line in lines)
    completion = sum(line["response"]["body"]["usage"]["completion_tokens"] for line in lines)
    assert done.usage.input_tokens == prompt > 0 and done.usage.output_tokens == completion > 0
    assert done.usage.total_tokens == prompt + completion
    assert usage(org_a.organization) == (LINES, prompt, completion)
    assert not BatchRequest.objects.filter(batch_id=batch.id).exists()  # the files hold them now


def test_lines_that_cannot_run_fail_the_batch_at_their_numbers_and_nothing_runs(
        gateway, batches_worker, org_a, default_model):
    client = sdk(gateway, org_a)
    file = upload(client, [
        chat_line(1),
        {**chat_line(2), "url": "/v1/completions"},  # not the batch's endpoint
        chat_line(3, max_tokens=10**9),  # above the gateway's cap
        {**chat_line(4), "body": {**chat_line(4)["body"], "model": "no-such-model"}},
        chat_line(5, stream=True),
        {**chat_line(6), "body": {**chat_line(6)["body"], "temperature": "hot"}},
        chat_line(7),
    ])
    batch = client.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions",
                                  completion_window="24h")
    done = finished(client, batch)
    assert done.status == "failed" and done.failed_at is not None
    assert done.errors.object == "list"
    assert [(e.line, e.code, e.param) for e in done.errors.data] == [
        (2, "invalid_url", "url"),
        (3, "max_tokens_out_of_range", "body.max_tokens"),
        (4, "model_not_found", "body.model"),
        (5, "invalid_value", "body.stream"),
        (6, "invalid_type", "body.temperature"),
    ]
    assert all(e.message for e in done.errors.data)
    assert done.output_file_id is None and done.error_file_id is None
    assert done.request_counts.completed == 0 and done.in_progress_at is None
    assert usage(org_a.organization) == (0, 0, 0)  # nothing ran


def test_a_cancelled_batch_stops_and_keeps_what_was_answered(gateway, batches_worker, org_a,
                                                             default_model):
    client = sdk(gateway, org_a)
    file = upload(client, [chat_line(i, max_tokens=24, content=f"Tell a story about {i}.")
                           for i in range(60)])
    batch = client.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions",
                                  completion_window="24h")
    wait_for(lambda: client.batches.retrieve(batch.id).request_counts.completed >= 2,
             timeout=300, message="a few answers")
    cancelling = client.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled") and cancelling.cancelling_at
    done = finished(client, batch)
    assert done.status == "cancelled" and done.cancelled_at >= done.cancelling_at
    counts = done.request_counts
    assert 2 <= counts.completed < 60 and counts.completed + counts.failed == 60
    answered, errors = jsonl(client, done.output_file_id), jsonl(client, done.error_file_id)
    assert len(answered) == counts.completed
    assert {e["error"]["code"] for e in errors} == {"batch_cancelled"}
    assert sorted(line["custom_id"] for line in answered + errors) == sorted(
        f"request-{i}" for i in range(60))
    assert usage(org_a.organization)[0] < 60  # it stopped sending


def test_a_batch_past_its_window_expires_with_the_rest_in_the_error_file(gateway, batches_worker,
                                                                         org_a, default_model):
    client = sdk(gateway, org_a)
    file = upload(client, [chat_line(i, max_tokens=24, content=f"Tell a story about {i}.")
                           for i in range(60)])
    batch = client.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions",
                                  completion_window="24h")
    wait_for(lambda: client.batches.retrieve(batch.id).request_counts.completed >= 2,
             timeout=300, message="a few answers")
    Batch.objects.filter(pk=batch.id).update(expires_at=Now())  # its window ends now
    done = finished(client, batch)
    assert done.status == "expired" and done.expired_at is not None
    counts = done.request_counts
    assert 2 <= counts.completed < 60 and counts.completed + counts.failed == 60
    answered, errors = jsonl(client, done.output_file_id), jsonl(client, done.error_file_id)
    assert len(answered) == counts.completed and len(errors) == counts.failed
    assert {e["error"]["code"] for e in errors} == {"batch_expired"}
    assert all(e["response"] is None for e in errors)
