"""For teams leaving OpenAI (issue 29; docs/openai-migration.md): the calls the issue added,
through the official `openai` SDK against the running platform: uvicorn in front of a real vLLM
CPU replica, real Celery workers (default, gpu, evals) on PostgreSQL and Redis.

- A 40 MB dataset uploaded in 8 parts, one of them cut off mid-body and sent again, trained on the
  embedded model; that job paused mid-training and resumed, finishing with the losses of an
  uninterrupted job of the same seed and data; both found by their metadata.
- The adapters, deployed when their jobs succeeded: the uninterrupted job's answers a batch of 200
  requests (sent while the paused job trains again; its usage counted against the organization),
  the resumed job's answers responses.create, plain and streamed.
- A batch whose lines cannot run, refused at their line numbers (when the file is uploaded and
  when the batch starts); an upload and a batch cancelled.

The helpers and fixtures are the area tests' own (uploads, pause, responses, batches). It runs
for minutes on two cores: each training start tokenizes the 40 MB, and the engine answers the
batch on the CPU; what can overlap does (the batch with the resumed training, the statistics with
the first job's start).
"""

from __future__ import annotations

import hashlib
import json

import openai
import pytest
from tuneplex.files.models import UploadPart
from tuneplex.finetuning.models import FineTuningJob

from tests.batches.conftest import (
    batches_worker,  # noqa: F401 - fixture: an evals-queue worker
    chat_line,
    finished,
    jsonl,
    sdk,
)
from tests.batches.conftest import upload as batch_file
from tests.conftest import MODEL, WorkerProcess, wait_for
from tests.files.test_uploads import cut, send_part_cut_off
from tests.finetuning.test_pause_e2e import (
    HYPERPARAMETERS,
    assert_resumed_with_the_same_losses,
    create_job,
    status_of,
)
from tests.finetuning.test_training_e2e import ready, wait_until_finished  # noqa: F401 - fixture
from tests.fixtures.datasets import lines_to_bytes, pirate_lines
from tests.serving.test_responses import CLOSING, OPENING, usage_of

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

DATASET_BYTES = 40_000_000
PARTS = 8
RETRIED_PART = 3  # its first attempt is cut off half way
# 40 MB in 2,000 examples whose answers go on for about 20 kB (cut to max_seq_len when trained).
# The trainer (at each start) and the statistics tokenize every example whole: few long examples
# cost less than many short ones, and a word that is one token of 16 bytes less than half as much
# as ordinary text.
ANSWER_TAIL = " notwithstanding"
STEPS = 8  # the job pauses after its second step is seen: six steps of margin
TRAINING = {**HYPERPARAMETERS, "max_steps": STEPS, "max_seq_len": 64}
QUESTION = "Tell me something about tea."
BATCH_REQUESTS = 200


def long_pirate_dataset(size: int) -> bytes:
    """At least ``size`` bytes of the pirate examples (answers start with "Arr!"), each answer
    going on for about 20 kB."""
    tail = ANSWER_TAIL * (20_000 // len(ANSWER_TAIL))
    examples = []
    for line in pirate_lines(size // 20_000 + 1):
        example = json.loads(line)
        example["messages"][-1]["content"] += tail
        examples.append(json.dumps(example))
    return lines_to_bytes(examples)


def upload_in_parts(client: openai.OpenAI, server_url: str, key: str, content: bytes):
    """``content`` as an upload of PARTS parts; the first attempt at RETRIED_PART drops its
    connection half way (nothing of it is kept) and the part is sent again. Returns the upload,
    completed with its md5."""
    upload = client.uploads.create(bytes=len(content), filename="pirate.jsonl",
                                   mime_type="text/jsonl", purpose="fine-tune")
    pieces = cut(content, *[len(content) // PARTS] * (PARTS - 1))
    assert len(pieces) == PARTS and b"".join(pieces) == content
    part_ids = []
    for index, piece in enumerate(pieces):
        if index == RETRIED_PART:
            reply = send_part_cut_off(server_url, key, upload.id, piece)
            assert not reply.startswith(b"HTTP/1.1 200"), reply[:300]
            assert UploadPart.objects.filter(upload_id=upload.id).count() == index
        part = client.uploads.parts.create(upload.id, data=piece)
        assert part.object == "upload.part" and part.upload_id == upload.id
        part_ids.append(part.id)
    assert UploadPart.objects.filter(upload_id=upload.id).count() == PARTS
    return client.uploads.complete(upload.id, part_ids=part_ids,
                                   md5=hashlib.md5(content).hexdigest())


@pytest.fixture
def statistics_apart(test_database_url):
    """A second worker of the default queue: production runs dataset statistics on a worker of
    their own (deploy/up.sh), and the 40 MB file's (tens of seconds of tokenizing on a CPU)
    would otherwise hold up its job's validation on the session's one worker."""
    worker = WorkerProcess(queues="default", database_url=test_database_url, name="default-2")
    try:
        yield worker
    finally:
        worker.stop()


def test_a_dataset_uploaded_in_parts_trains_pauses_resumes_and_its_adapter_answers(
        ready, statistics_apart, gpu_workers, gateway, batches_worker, org_a):  # noqa: F811
    # The GPU worker shares the web processes' serving settings: it deploys the adapters.
    gpu_workers(extra_env={"TUNEPLEX_ENGINE_MODE": "attach",
                           "TUNEPLEX_ENGINE_URLS": gateway.engine_url})
    client = sdk(gateway, org_a)

    # --- Uploads: 40 MB in 8 parts, one retried ------------------------------------------------
    content = long_pirate_dataset(DATASET_BYTES)
    done = upload_in_parts(client, gateway.url, org_a.owner_key, content)
    assert done.status == "completed" and done.bytes == len(content) >= DATASET_BYTES
    dataset = done.file
    assert dataset.status == "processed" and dataset.bytes == len(content)
    assert dataset.purpose == "fine-tune" and dataset.filename == "pirate.jsonl"
    assert dataset.model_extra["sha256"] == hashlib.sha256(content).hexdigest()
    assert dataset.model_extra["validation"]["examples"] == content.count(b"\n")

    # --- A job on it, paused mid-training; an uninterrupted one of the same seed and data -------
    paused = create_job(client, dataset.id, "paused", TRAINING)
    wait_for(lambda: FineTuningJob.objects.get(id=paused.id).step >= 2, timeout=900,
             message="the job's second step")
    assert client.fine_tuning.jobs.pause(paused.id).status == "pausing"
    wait_for(lambda: status_of(paused.id) == "paused", timeout=300, message="the pause")
    assert client.fine_tuning.jobs.retrieve(paused.id).status == "paused"
    at_step = FineTuningJob.objects.get(id=paused.id).events.get(
        message__startswith="Job paused.").data["resume_from_step"]
    assert 2 <= at_step < STEPS
    checkpoints = client.fine_tuning.jobs.checkpoints.list(paused.id).data
    assert at_step in [c.step_number for c in checkpoints]

    # One job at a time for the organization: this one runs because the paused one holds no slot.
    reference = create_job(client, dataset.id, "reference", TRAINING)
    assert wait_until_finished(reference.id, timeout=900).status == "succeeded"
    assert status_of(paused.id) == "paused"  # nothing resumed it meanwhile
    assert [j.id for j in client.fine_tuning.jobs.list(metadata={"run": "paused"})] == [paused.id]
    assert [j.id for j in client.fine_tuning.jobs.list(metadata={"run": "reference"})] == [
        reference.id]
    assert client.fine_tuning.jobs.resume(paused.id).status == "queued"

    # --- While it trains again: 200 requests in a batch, on the reference's adapter -------------
    reference_adapter = client.fine_tuning.jobs.retrieve(reference.id).fine_tuned_model
    assert reference_adapter.startswith(f"ft:{MODEL}:{org_a.organization.slug}:reference:")
    assert usage_of(org_a.organization, reference_adapter) is None  # nothing has used it yet
    requests = [chat_line(i, model=reference_adapter) for i in range(BATCH_REQUESTS)]
    body = "".join(json.dumps(line) + "\n" for line in requests).encode()
    input_file = client.uploads.upload_file_chunked(  # the SDK's helper for uploads in parts
        file=body, filename="requests.jsonl", bytes=len(body), mime_type="text/jsonl",
        purpose="batch", part_size=len(body) // 3 + 1).file
    assert input_file.status == "processed" and input_file.purpose == "batch"
    batch = client.batches.create(input_file_id=input_file.id, endpoint="/v1/chat/completions",
                                  completion_window="24h", metadata={"run": "reference"})
    # A second batch waits behind it (the worker runs one at a time): cancelled at once.
    waiting = client.batches.create(input_file_id=input_file.id,
                                    endpoint="/v1/chat/completions", completion_window="24h")
    cancelled = client.batches.cancel(waiting.id)
    assert cancelled.status == "cancelled" and cancelled.cancelled_at is not None
    assert client.batches.retrieve(waiting.id).request_counts.completed == 0
    assert [b.id for b in client.batches.list(limit=2).data] == [waiting.id, batch.id]

    # --- The resumed job ends with the losses it would have had --------------------------------
    finished_job = wait_until_finished(paused.id, timeout=900)
    assert finished_job.status == "succeeded", finished_job.error
    assert finished_job.attempts == 2
    assert finished_job.events.get(
        message__startswith="Resuming from the checkpoint").data["resumed_from_step"] == at_step
    assert_resumed_with_the_same_losses(client, paused.id, reference.id, steps=STEPS)

    # --- The batch: 200 output lines, its usage counted against the organization ----------------
    done_batch = finished(client, batch)
    assert done_batch.status == "completed", done_batch.errors
    assert done_batch.request_counts.model_dump() == {
        "total": BATCH_REQUESTS, "completed": BATCH_REQUESTS, "failed": 0}
    assert done_batch.model == reference_adapter and done_batch.error_file_id is None
    lines = jsonl(client, done_batch.output_file_id)
    assert [line["custom_id"] for line in lines] == [f"request-{i}" for i in range(BATCH_REQUESTS)]
    assert all(line["response"]["status_code"] == 200 and line["error"] is None
               and line["response"]["body"]["model"] == reference_adapter for line in lines)
    prompt = sum(line["response"]["body"]["usage"]["prompt_tokens"] for line in lines)
    completion = sum(line["response"]["body"]["usage"]["completion_tokens"] for line in lines)
    assert (done_batch.usage.input_tokens, done_batch.usage.output_tokens) == (prompt, completion)
    assert prompt > 0 and completion > 0
    # Counted against the organization, under the adapter's name, like any inference.
    wait_for(lambda: usage_of(org_a.organization, reference_adapter) == (
        BATCH_REQUESTS, prompt, completion), timeout=10, message="the batch's usage")

    # --- responses.create on the resumed job's adapter, plain and streamed ---------------------
    adapter = client.fine_tuning.jobs.retrieve(paused.id).fine_tuned_model
    assert adapter.startswith(f"ft:{MODEL}:{org_a.organization.slug}:paused:")
    assert {adapter, reference_adapter} <= {m.id for m in client.models.list()}  # deployed
    asked = {"input": QUESTION, "max_output_tokens": 8, "temperature": 0}
    answer = client.responses.create(model=adapter, **asked)
    chat = client.chat.completions.create(model=adapter, max_tokens=8, temperature=0,
                                          messages=[{"role": "user", "content": QUESTION}])
    base = client.responses.create(model=MODEL, **asked)
    assert answer.object == "response" and answer.model == adapter
    assert answer.output_text == chat.choices[0].message.content  # the same completion
    assert answer.output_text != base.output_text  # the adapter is applied
    assert answer.usage.input_tokens == chat.usage.prompt_tokens
    assert answer.usage.output_tokens == chat.usage.completion_tokens > 0
    with client.responses.create(model=adapter, stream=True, **asked) as stream:
        events = list(stream)
    kinds = [event.type for event in events]
    deltas = kinds.count("response.output_text.delta")
    assert deltas >= 1 and kinds == [*OPENING, *["response.output_text.delta"] * deltas,
                                     *CLOSING, f"response.{answer.status}"]
    assert [event.sequence_number for event in events] == list(range(len(events)))
    streamed = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert streamed == events[-1].response.output_text == answer.output_text
    assert events[-1].response.usage.output_tokens == answer.usage.output_tokens


def test_batch_lines_refused_at_their_numbers_and_a_cancelled_upload_takes_no_parts(
        gateway, batches_worker, org_a, default_model):  # noqa: F811
    client = sdk(gateway, org_a)
    # Malformed lines: the file is refused when it is uploaded, each problem at its line.
    malformed = batch_file(client, [chat_line(1), "{not json", {**chat_line(3), "method": "GET"},
                                    chat_line(4, custom_id="request-1")], name="malformed.jsonl")
    assert malformed.status == "error"
    assert [(e["line"], e["code"]) for e in malformed.model_extra["validation"]["errors"]] == [
        (2, "invalid_json"), (3, "invalid_method"), (4, "duplicate_custom_id")]
    with pytest.raises(openai.BadRequestError) as refused:
        client.batches.create(input_file_id=malformed.id, endpoint="/v1/chat/completions",
                              completion_window="24h")
    assert (refused.value.body["code"], refused.value.body["param"]) == (
        "invalid_file", "input_file_id")

    # Well-formed lines that cannot run: the batch fails when it starts, naming each line.
    unrunnable = batch_file(client, [
        chat_line(1),
        {**chat_line(2), "url": "/v1/completions"},  # not the batch's endpoint
        chat_line(3, max_tokens=10**9),
        chat_line(4, model="gpt-4o-mini"),  # OpenAI's model: not served here
        chat_line(5, store=True),  # not a field the gateway accepts
    ])
    assert unrunnable.status == "processed"
    failed = finished(client, client.batches.create(
        input_file_id=unrunnable.id, endpoint="/v1/chat/completions", completion_window="24h"))
    assert failed.status == "failed" and failed.request_counts.completed == 0
    assert [(e.line, e.code, e.param) for e in failed.errors.data] == [
        (2, "invalid_url", "url"), (3, "max_tokens_out_of_range", "body.max_tokens"),
        (4, "model_not_found", "body.model"), (5, "unknown_parameter", "body.store")]
    assert failed.output_file_id is None and failed.error_file_id is None
    assert usage_of(org_a.organization, MODEL) is None  # nothing ran (the test above: counted)

    # An upload cancelled takes no more parts and cannot be completed.
    content = lines_to_bytes(pirate_lines(12))
    upload = client.uploads.create(bytes=len(content), filename="c.jsonl",
                                   mime_type="text/jsonl", purpose="fine-tune")
    part = client.uploads.parts.create(upload.id, data=content)
    assert client.uploads.cancel(upload.id).status == "cancelled"
    for call in (lambda: client.uploads.parts.create(upload.id, data=content),
                 lambda: client.uploads.complete(upload.id, part_ids=[part.id])):
        with pytest.raises(openai.ConflictError) as raised:
            call()
        assert raised.value.body["code"] == "upload_cancelled"
