"""OpenAI's Responses API (POST /v1/responses), stateless: a chat completion underneath.

The translation itself (pure), the refusals of every field it does not honour (the real views
in-process, no engine), and the official SDK against uvicorn + a real vLLM CPU replica + Redis:
plain and streamed answers on the base model and on an adapter, the event sequence, usage and
the organization's budget, another organization's adapter, and a client that goes away.
"""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest
from django.test import Client

from tests.conftest import GatewayProcess, empty_replicas, make_tenant, wait_for
from tests.fixtures.adapter_rows import adapter_from_dir, adapter_row
from tests.serving.test_settlement import charged, engine_prompt_tokens, engine_running, in_flight
from tuneplex.inference import ratelimit
from tuneplex.inference.models import UsageDaily
from tuneplex.inference.responses import Events, answer, chat_body

BASE = "SmolLM2-135M-Instruct"
INSTRUCTIONS = "Answer in a few words."
QUESTION = "Name a colour."
STORY = "Tell me a long story about the sea."
LONG = 400  # tokens asked for: far more than the disconnect test waits for


# --- the translation (pure) -----------------------------------------------------------------------

def test_a_request_becomes_the_chat_completion_it_means():
    body = chat_body({
        "model": BASE, "instructions": INSTRUCTIONS, "max_output_tokens": 7, "temperature": 0.5,
        "top_p": 0.9, "user": "u1", "store": True, "metadata": {"ticket": "42"}, "tools": [],
        "previous_response_id": None, "text": {"format": {
            "type": "json_schema", "name": "colour", "schema": {"type": "object"}, "strict": True}},
        "input": [{"role": "user", "content": [{"type": "input_text", "text": "Hi."},
                                               {"type": "input_text", "text": "Colour?"}]},
                  {"type": "message", "id": "msg_1", "status": "completed", "role": "assistant",
                   "content": [{"type": "output_text", "text": "Blue.", "annotations": []}]},
                  {"role": "developer", "content": "Again."}]}, max_tokens=100)
    assert dict(body) == {
        "model": BASE, "max_tokens": 7, "temperature": 0.5, "top_p": 0.9, "user": "u1",
        "messages": [{"role": "system", "content": INSTRUCTIONS},
                     {"role": "user", "content": [{"type": "text", "text": "Hi."},
                                                  {"type": "text", "text": "Colour?"}]},
                     {"role": "assistant", "content": [{"type": "text", "text": "Blue."}]},
                     {"role": "developer", "content": "Again."}],
        "response_format": {"type": "json_schema", "json_schema": {
            "name": "colour", "schema": {"type": "object"}, "strict": True}}}
    plain = chat_body({"model": BASE, "input": QUESTION}, max_tokens=100)
    assert dict(plain) == {"model": BASE, "max_tokens": 100,
                           "messages": [{"role": "user", "content": QUESTION}]}
    assert json.loads(json.dumps(plain)) == dict(plain)  # what the engine gets: no request inside

    made = answer({"choices": [{"message": {"content": "Red"}, "finish_reason": "stop"}],
                   "usage": {"prompt_tokens": 9, "completion_tokens": 2,
                             "prompt_tokens_details": {"cached_tokens": 4}}}, request=body.request)
    assert made["object"] == "response" and made["id"].startswith("resp_")
    assert made["status"] == "completed" and made["incomplete_details"] is None
    assert made["store"] is False and made["metadata"] == {"ticket": "42"}
    assert (made["instructions"], made["max_output_tokens"], made["temperature"]) == (INSTRUCTIONS, 7, 0.5)
    assert made["output"] == [{"id": body.request.message_id, "type": "message", "role": "assistant",
                               "status": "completed", "content": [{"type": "output_text", "text": "Red",
                                                                   "annotations": [], "logprobs": []}]}]
    assert made["usage"] == {"input_tokens": 9, "input_tokens_details": {"cached_tokens": 4},
                             "output_tokens": 2, "output_tokens_details": {"reasoning_tokens": 0},
                             "total_tokens": 11}


def sse(raw: bytes) -> list[dict]:
    """The events of a Responses stream, each checked to name its type in ``event:`` too."""
    events = []
    for block in raw.decode().split("\n\n"):
        if block:
            kind, data = block.split("\n")
            event = json.loads(data.removeprefix("data: "))
            assert kind == f"event: {event['type']}"
            events.append(event)
    return events


OPENING = ["response.created", "response.in_progress", "response.output_item.added",
           "response.content_part.added"]
CLOSING = ["response.output_text.done", "response.content_part.done", "response.output_item.done"]


def test_engine_chunks_become_openais_events_in_order():
    events = Events(chat_body({"model": BASE, "input": QUESTION, "stream": True},
                              max_tokens=3).request)
    running = {"prompt_tokens": 5, "completion_tokens": 1}
    raw = events.opening() + b"".join(events.add(chunk) for chunk in [
        {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}], "usage": running},
        {"choices": [{"index": 0, "delta": {"content": "Deep"}}], "usage": running},
        {"choices": [{"index": 0, "delta": {"content": " blue"}, "finish_reason": "length"}],
         "usage": running},
        {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 3}}]) + events.closing()
    got = sse(raw)
    assert [e["type"] for e in got] == [*OPENING, "response.output_text.delta",
                                        "response.output_text.delta", *CLOSING, "response.incomplete"]
    assert [e["sequence_number"] for e in got] == list(range(len(got)))
    assert got[0]["response"]["status"] == "in_progress" and got[0]["response"]["output"] == []
    assert [e["delta"] for e in got[4:6]] == ["Deep", " blue"]
    assert got[6]["text"] == got[7]["part"]["text"] == "Deep blue"
    final = got[-1]["response"]
    assert final["status"] == "incomplete" and final["incomplete_details"] == {"reason": "max_output_tokens"}
    assert final["output"] == [got[8]["item"]] and final["output"][0]["status"] == "incomplete"
    assert final["usage"]["total_tokens"] == 8 and final["usage"]["output_tokens"] == 3
    assert events.closing() == b""  # ended once

    broken = Events(chat_body({"model": BASE, "input": QUESTION}, max_tokens=3).request)
    failed = sse(broken.opening() + broken.add({"choices": [{"index": 0, "delta": {"content": "Hi"}}]})
                 + broken.failed("The engine replica failed during the answer; retry the request."))
    assert [e["type"] for e in failed] == [*OPENING, "response.output_text.delta", "response.failed"]
    assert failed[-1]["response"]["status"] == "failed"
    assert failed[-1]["response"]["error"]["code"] == "server_error"
    assert broken.closing() == b""  # no completed after failed

    for status, said in ((400, "This model's maximum context length is 1024 tokens."),
                         (500, "The engine failed on this request.")):
        refused = Events(chat_body({"model": BASE, "input": QUESTION}, max_tokens=3).request)
        refused.opening()
        ended = sse(refused.add({"error": {"message": "This model's maximum context length is "
                                                      "1024 tokens.", "code": status}}))
        assert [e["type"] for e in ended] == ["response.failed"]
        assert ended[0]["response"]["error"]["message"] == said  # an engine failure's is not shown


# --- refusals (the real views in-process; no engine) ----------------------------------------------

def post(key: str | None, body, path: str = "/v1/responses"):
    headers = {"HTTP_AUTHORIZATION": f"Bearer {key}"} if key else {}
    return Client().post(path, data=json.dumps(body), content_type="application/json", **headers)


def error(response) -> tuple[int, str, str | None]:
    body = response.json()["error"]
    return response.status_code, body["code"], body["param"]


@pytest.mark.django_db
@pytest.mark.parametrize("extra,param", [
    ({"previous_response_id": "resp_123"}, "previous_response_id"),
    ({"conversation": "conv_1"}, "conversation"),
    ({"tools": [{"type": "function", "name": "add", "parameters": {}}]}, "tools"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"max_tool_calls": 2}, "max_tool_calls"),
    ({"reasoning": {"effort": "low"}}, "reasoning"),
    ({"background": True}, "background"),
    ({"include": ["message.output_text.logprobs"]}, "include"),
    ({"truncation": "auto"}, "truncation"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"prompt": {"id": "pmpt_1"}}, "prompt"),
    ({"prompt_cache_key": "k"}, "prompt_cache_key"),
    ({"safety_identifier": "u"}, "safety_identifier"),
    ({"service_tier": "flex"}, "service_tier"),
    ({"text": {"verbosity": "low"}}, "text.verbosity"),
    ({"stream": True, "stream_options": {"include_obfuscation": True}},
     "stream_options.include_obfuscation"),
])
def test_fields_it_does_not_honour_are_refused_by_name(org_a, extra, param):
    response = post(org_a.owner_key, {"model": BASE, "input": QUESTION, **extra})
    assert error(response) == (400, "unsupported_parameter", param)
    assert "not supported" in response.json()["error"]["message"]


@pytest.mark.django_db
@pytest.mark.parametrize("extra,expected", [
    ({"input": None}, (400, "invalid_input", "input")),
    ({"input": 5}, (400, "invalid_input", "input")),
    ({"input": []}, (400, "invalid_input", "input")),
    ({"input": [{"role": "robot", "content": "hi"}]}, (400, "invalid_input", "input[0].role")),
    ({"input": [{"role": "user"}]}, (400, "invalid_input", "input[0].content")),
    ({"input": [{"role": "user", "content": "hi"}, "hi"]}, (400, "invalid_input", "input[1]")),
    ({"input": [{"type": "function_call_output", "call_id": "c", "output": "4"}]},
     (400, "unsupported_value", "input[0].type")),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
     (400, "unsupported_value", "input[0].content[0].type")),
    ({"input": [{"role": "user", "content": [{"type": "input_text"}]}]},
     (400, "invalid_type", "input[0].content[0].text")),
    ({"input": [{"role": "user", "content": "hi", "name": "x"}]},
     (400, "unknown_parameter", "input[0].name")),
    ({"input": [{"role": "user", "content": "hi", "status": "done"}]},
     (400, "invalid_value", "input[0].status")),
    ({"model": 7}, (400, "invalid_type", "model")),
    ({"model": "\u0000\u0006"}, (400, "invalid_value", "model")),  # found by the fuzzer: a 500
    ({"instructions": 5}, (400, "invalid_type", "instructions")),
    ({"max_output_tokens": 0}, (400, "max_output_tokens_out_of_range", "max_output_tokens")),
    ({"max_output_tokens": 10**6}, (400, "max_output_tokens_out_of_range", "max_output_tokens")),
    ({"max_output_tokens": True}, (400, "invalid_type", "max_output_tokens")),
    ({"temperature": 3}, (400, "temperature_out_of_range", "temperature")),
    ({"top_p": "x"}, (400, "invalid_type", "top_p")),
    ({"stream": "yes"}, (400, "invalid_type", "stream")),
    ({"store": "yes"}, (400, "invalid_type", "store")),
    ({"user": ["u"]}, (400, "invalid_type", "user")),
    ({"parallel_tool_calls": 1}, (400, "invalid_type", "parallel_tool_calls")),
    ({"stream_options": {"include_obfuscation": False}}, (400, "invalid_value", "stream_options")),
    ({"metadata": [1]}, (400, "invalid_type", "metadata")),
    ({"metadata": {str(i): "v" for i in range(17)}}, (400, "too_many_metadata_keys", "metadata")),
    ({"metadata": {"k": 5}}, (400, "invalid_type", "metadata.k")),
    ({"metadata": {"k": "v" * 513}}, (400, "string_too_long", "metadata.k")),
    ({"text": {"format": {"type": "yaml"}}}, (400, "invalid_value", "text.format.type")),
    ({"text": {"format": {"type": "json_schema", "schema": {}}}}, (400, "invalid_value", "text.format.name")),
    ({"text": {"format": {"type": "json_schema", "name": "x", "schema": {}, "strict": "y"}}},
     (400, "invalid_type", "text.format.strict")),
    ({"text": {"colour": "red"}}, (400, "unknown_parameter", "text.colour")),
    ({"temperature_hint": 1}, (400, "unknown_parameter", "temperature_hint")),
    ({"cache_salt": "guess"}, (400, "unknown_parameter", "cache_salt")),
])
def test_every_field_of_the_wrong_type_or_range_is_a_400_naming_it(org_a, extra, expected):
    assert error(post(org_a.owner_key, {"model": BASE, "input": QUESTION, **extra})) == expected


@pytest.mark.django_db
def test_what_it_accepts_reaches_the_engine_and_other_methods_say_post(org_a, org_b, settings,
                                                                       default_model):
    """The positive control of the refusals above: OpenAI's nulls and do-nothing values, and
    store true (answered false), pass the checks and are admitted; with no engine listening the
    answer is the documented 503 after admission. Another organization's adapter is a 404."""
    settings.ENGINE_REPLICAS = {BASE: ["http://127.0.0.1:9"]}  # served (nothing listens there)
    admitted = post(org_a.owner_key, {
        "model": BASE, "input": [{"role": "user", "content": QUESTION}], "instructions": None,
        "store": True, "previous_response_id": None, "reasoning": None, "tools": [],
        "tool_choice": "auto", "include": [], "truncation": "disabled", "background": False,
        "service_tier": "auto", "parallel_tool_calls": True, "metadata": {"k": "v"},
        "stream": True, "stream_options": {"include_obfuscation": False},
        "text": {"format": {"type": "text"}, "verbosity": None}})
    assert error(admitted)[:2] == (503, "engine_unavailable")
    theirs = adapter_row(org_b.organization, default_model, deployed=True)
    assert error(post(org_a.owner_key, {"model": theirs.name, "input": QUESTION})) == (
        404, "model_not_found", "model")
    assert error(post(None, {"model": BASE, "input": QUESTION}))[:2] == (401, "unauthenticated")
    # The model check is chat's own: a NUL in a name was a 500 there too (the database lookup).
    nul = post(org_a.owner_key, {"model": "a\u0000b", "messages": [{"role": "user", "content": "hi"}]},
               "/v1/chat/completions")
    assert error(nul) == (400, "invalid_value", "model")
    refused = Client().get("/v1/responses")
    assert refused.status_code == 405 and refused["Allow"] == "POST"
    assert Client().delete("/v1/responses")["Allow"] == "POST"


# --- the official SDK against the real engine -----------------------------------------------------

def usage_of(organization, model: str) -> tuple[int, int, int] | None:
    row = UsageDaily.objects.filter(organization=organization, model=model).first()
    return None if row is None else (row.requests, row.prompt_tokens, row.completion_tokens)


@pytest.fixture(scope="module")
def budget_gateway(engine, test_database_url):
    """The gateway with a token budget and a concurrency cap, both kept in Redis."""
    from django.conf import settings

    assert settings.REDIS_URL, "these tests check the budget kept in Redis"
    process = GatewayProcess(database_url=test_database_url, engine=engine, extra_env={
        "TUNEPLEX_ORG_INFERENCE_TOKENS_PER_MINUTE": "1000000",
        "TUNEPLEX_ORG_INFERENCE_CONCURRENCY": "8", "TUNEPLEX_INFERENCE_RATE_LIMIT": "0"})
    try:
        yield process
    finally:
        process.stop()
        empty_replicas(engine)


def sdk(gateway, key: str) -> openai.OpenAI:
    return openai.OpenAI(api_key=key, base_url=f"{gateway.url}/v1", max_retries=0, timeout=120)


@pytest.mark.e2e
@pytest.mark.django_db(transaction=True)
def test_the_sdk_answers_plain_and_streamed_on_the_base_model_and_an_adapter(
        budget_gateway, engine, default_model, adapters):
    a, b = make_tenant("Alpha"), make_tenant("Beta")
    adapter = adapter_from_dir(a.organization, adapters["adapter-0"], suffix="resp",
                               base_model=default_model)
    with httpx.Client(base_url=f"{budget_gateway.url}/v1", timeout=120,
                      headers={"Authorization": f"Bearer {a.owner_key}"}) as rest:
        assert rest.post(f"/adapters/{adapter.id}/deploy", json={}).status_code == 200
    client = sdk(budget_gateway, a.owner_key)
    messages = [{"role": "system", "content": INSTRUCTIONS}, {"role": "user", "content": QUESTION}]
    prompt = engine_prompt_tokens(engine, messages)
    asked = {"instructions": INSTRUCTIONS, "input": QUESTION, "max_output_tokens": 6, "temperature": 0}
    answers, chats = [], []
    # The budget's counters live one minute: the first answer is checked against them, sent
    # early enough in a window to be settled within it.
    wait_for(lambda: time.time() % ratelimit.WINDOW < 45, timeout=20, message="a fresh budget window")
    for model in (BASE, adapter.name):
        response = client.responses.create(model=model, metadata={"ticket": "42"}, **asked)
        if model == BASE:  # charged to the organization exactly as a chat completion is
            wait_for(lambda: charged(a.organization) == response.usage.total_tokens, timeout=10,
                     message="the budget to hold exactly what the engine reported")
        chat = client.chat.completions.create(model=model, messages=messages, max_tokens=6,
                                              temperature=0)
        answers.append(response)
        chats.append(chat)
        assert response.object == "response" and response.model == model
        assert response.output_text == chat.choices[0].message.content  # the same completion
        assert response.output[0].type == "message" and response.output[0].role == "assistant"
        assert response.output[0].content[0].type == "output_text"
        finished = chat.choices[0].finish_reason
        assert response.status == ("incomplete" if finished == "length" else "completed")
        assert response.usage.input_tokens == prompt == chat.usage.prompt_tokens
        assert response.usage.output_tokens == chat.usage.completion_tokens
        assert response.usage.total_tokens == prompt + response.usage.output_tokens
        assert response.metadata == {"ticket": "42"} and response.instructions == INSTRUCTIONS
    assert answers[0].output_text != answers[1].output_text  # the adapter is applied

    with client.responses.create(model=adapter.name, stream=True, **asked) as stream:
        events = list(stream)
    kinds = [event.type for event in events]
    deltas = kinds.count("response.output_text.delta")
    assert deltas >= 1
    assert kinds == [*OPENING, *["response.output_text.delta"] * deltas, *CLOSING,
                     f"response.{answers[1].status}"]
    assert [event.sequence_number for event in events] == list(range(len(events)))
    final = events[-1].response
    text = "".join(event.delta for event in events if event.type == "response.output_text.delta")
    assert text == events[len(OPENING) + deltas].text == final.output_text == answers[1].output_text
    assert final.usage.output_tokens == answers[1].usage.output_tokens
    assert final.usage.input_tokens == prompt

    # Counted in the organization's usage with its chat completions, the engine's counts.
    def adapter_usage() -> tuple[int, int, int] | None:  # two answers and a chat completion
        found = usage_of(a.organization, adapter.name)
        return found if found is not None and found[0] == 3 else None

    _, prompt_tokens, completion_tokens = wait_for(adapter_usage, timeout=10,
                                                   message="the adapter's usage to be written")
    assert (prompt_tokens, completion_tokens) == (
        3 * prompt, answers[1].usage.output_tokens * 2 + chats[1].usage.completion_tokens)
    assert in_flight(a.organization) == 0

    # Another organization cannot use the adapter: the 404 of a name that does not exist.
    with pytest.raises(openai.NotFoundError) as refused:
        sdk(budget_gateway, b.owner_key).responses.create(model=adapter.name, input=QUESTION)
    assert refused.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as unsupported:
        client.responses.create(model=BASE, input=QUESTION, previous_response_id=final.id)
    assert unsupported.value.body["param"] == "previous_response_id"


@pytest.mark.e2e
@pytest.mark.django_db(transaction=True)
def test_a_response_stream_dropped_midway_is_charged_what_was_generated_and_stops_the_engine(
        budget_gateway, engine, default_model):
    tenant = make_tenant("Dropper")
    prompt = engine_prompt_tokens(engine, [{"role": "user", "content": STORY}])
    client = sdk(budget_gateway, tenant.owner_key)
    deltas = 0
    with client.responses.create(model=BASE, input=STORY, max_output_tokens=LONG, temperature=0,
                                 stream=True) as stream:
        for event in stream:
            deltas += event.type == "response.output_text.delta"
            if deltas == 5:
                assert engine_running(engine) == 1  # positive control for the check below
                assert in_flight(tenant.organization) == 1
                break  # the client goes away: leaving the block closes the connection
    wait_for(lambda: engine_running(engine) == 0, timeout=10, message="the engine to abort the request")
    requests, prompt_tokens, completion_tokens = wait_for(
        lambda: usage_of(tenant.organization, BASE), timeout=10, message="the usage to be written")
    assert (requests, prompt_tokens) == (1, prompt)
    assert 5 <= completion_tokens < LONG  # what it was sent (and what was on its way), not all
    assert charged(tenant.organization) == prompt_tokens + completion_tokens  # nothing refunded
    assert in_flight(tenant.organization) == 0
