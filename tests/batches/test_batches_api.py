"""The Batch API through the official SDK, without a worker: input files checked at upload with
their line numbers, every refusal of create a precise 4xx naming its field, the batch object in
OpenAI's shape, lists paged, a batch no worker has taken cancelled at once, another
organization's batches and files a 404."""

from __future__ import annotations

import json
import time

import openai
import pytest

from tests.batches.conftest import chat_line, sdk, upload
from tuneplex.batches.models import Batch

pytestmark = pytest.mark.django_db(transaction=True)


def test_an_input_file_is_checked_at_upload_with_each_bad_line_named(live_server, org_a):
    client = sdk(live_server, org_a)
    good = upload(client, [chat_line(1), chat_line(2)])
    assert good.purpose == "batch" and good.status == "processed"
    # Read back as the SDK reads a batch's results (it sends Accept: application/binary).
    assert [json.loads(line) for line in client.files.content(good.id).text.splitlines()] == [
        chat_line(1), chat_line(2)]
    bad = upload(client, [
        chat_line(1),
        "not json",
        {**chat_line(3), "method": "GET"},
        {**chat_line(4), "url": "/v1/embeddings"},
        chat_line(5, custom_id="request-1"),  # the first line's custom_id again
        {"custom_id": "x", "method": "POST", "url": "/v1/completions", "body": "text"},
        "",  # a blank line is counted, not a request
        {"method": "POST", "url": "/v1/completions", "body": {}},
    ])
    assert bad.status == "error"
    report = client.files.retrieve(bad.id).model_extra["validation"]
    assert [(e["line"], e["code"]) for e in report["errors"]] == [
        (2, "invalid_json"), (3, "invalid_method"), (4, "invalid_url"),
        (5, "duplicate_custom_id"), (6, "invalid_body"), (8, "invalid_custom_id")]
    assert report["examples"] == 1


def test_a_batch_output_file_cannot_be_uploaded(live_server, org_a):
    with pytest.raises(openai.BadRequestError) as refused:
        sdk(live_server, org_a).files.create(file=("x.jsonl", b"{}\n"), purpose="batch_output")
    assert refused.value.body["param"] == "purpose"


@pytest.mark.parametrize(("change", "param", "code"), [
    ({"endpoint": "/v1/embeddings"}, "endpoint", "invalid_value"),
    ({"completion_window": "48h"}, "completion_window", "invalid_value"),
    ({"metadata": {"k": 5}}, "metadata.k", "invalid_value"),
])
def test_each_wrong_field_is_a_400_naming_it(live_server, org_a, change, param, code):
    client = sdk(live_server, org_a)
    file = upload(client, [chat_line(1)])
    with pytest.raises(openai.BadRequestError) as refused:
        client.batches.create(**{"input_file_id": file.id, "endpoint": "/v1/chat/completions",
                                 "completion_window": "24h", **change})
    assert (refused.value.body["param"], refused.value.body["code"]) == (param, code)
    assert not Batch.objects.exists()


def test_the_input_must_be_a_processed_batch_file_of_the_organization(live_server, org_a, org_b):
    client = sdk(live_server, org_a)
    tuning = client.files.create(file=("t.jsonl", b'{"prompt": "a", "completion": "b"}\n' * 10),
                                 purpose="fine-tune")
    failed = upload(client, ["not json"])
    of_b = upload(sdk(live_server, org_b), [chat_line(1)])
    for file_id, error in ((tuning.id, openai.BadRequestError), (failed.id, openai.BadRequestError),
                           (of_b.id, openai.NotFoundError), ("file-nope", openai.NotFoundError)):
        with pytest.raises(error) as refused:
            client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions",
                                  completion_window="24h")
        assert refused.value.body["param"] == "input_file_id"
    assert not Batch.objects.exists()


def test_a_batch_in_openais_shape_is_listed_and_cancelled_at_once_before_a_worker_takes_it(
        live_server, org_a):
    client = sdk(live_server, org_a)
    file = upload(client, [chat_line(1), chat_line(2)])
    made = [client.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions",
                                  completion_window="24h", metadata={"run": str(i)})
            for i in range(3)]
    first = made[0]
    assert first.status == "validating" and first.object == "batch"
    assert first.input_file_id == file.id and first.metadata == {"run": "0"}
    assert first.expires_at - first.created_at == 24 * 3600
    assert abs(first.created_at - time.time()) < 60
    assert first.request_counts.model_dump() == {"total": 0, "completed": 0, "failed": 0}
    assert first.output_file_id is None and first.errors is None
    page = client.batches.list(limit=2)
    assert [b.id for b in page.data] == [made[2].id, made[1].id] and page.has_more
    rest = client.batches.list(limit=2, after=made[1].id)
    assert [b.id for b in rest.data] == [made[0].id] and not rest.has_more

    cancelled = client.batches.cancel(first.id)  # no worker took it: nothing ran
    assert cancelled.status == "cancelled" and cancelled.cancelled_at is not None
    assert client.batches.retrieve(first.id).status == "cancelled"
    again = client.batches.cancel(first.id)  # ended: left as it is
    assert again.status == "cancelled" and again.cancelled_at == cancelled.cancelled_at


def test_an_organization_has_at_most_its_active_batches(live_server, org_a, settings):
    settings.ORG_MAX_ACTIVE_BATCHES = 2
    client = sdk(live_server, org_a)
    file = upload(client, [chat_line(1)])
    made = [client.batches.create(input_file_id=file.id, endpoint="/v1/completions",
                                  completion_window="24h") for _ in range(2)]
    with pytest.raises(openai.RateLimitError) as refused:
        client.batches.create(input_file_id=file.id, endpoint="/v1/completions",
                              completion_window="24h")
    assert refused.value.body["code"] == "too_many_active_batches"
    client.batches.cancel(made[0].id)  # ended: room for one more
    client.batches.create(input_file_id=file.id, endpoint="/v1/completions", completion_window="24h")


def test_another_organizations_batch_is_a_404(live_server, org_a, org_b):
    theirs = sdk(live_server, org_b)
    batch = theirs.batches.create(input_file_id=upload(theirs, [chat_line(1)]).id,
                                  endpoint="/v1/chat/completions", completion_window="24h")
    client = sdk(live_server, org_a)
    for call in (client.batches.retrieve, client.batches.cancel):
        with pytest.raises(openai.NotFoundError):
            call(batch.id)
    assert client.batches.list().data == []
    assert theirs.batches.retrieve(batch.id).status == "validating"  # untouched
