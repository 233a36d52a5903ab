"""Money when a request ends early: the tokens generated are counted, and the engine stops.

uvicorn + a real vLLM CPU replica + real Redis (the token budget and the in-flight slots), with
clients that go away mid-answer: a streaming API client, a plain (non-streamed) API client that
gives up, and a signed-in browser session.
"""

from __future__ import annotations

import json
import re

import httpx
import pytest
import redis

from tests.conftest import GatewayProcess, make_tenant, wait_for
from tuneplex.inference.models import UsageDaily
from serving.engine import auth_headers

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]
BASE = "SmolLM2-135M-Instruct"
QUESTION = [{"role": "user", "content": "Tell me a long story about the sea."}]
NO_EOS = {"0": -100, "2": -100}  # the end-of-text tokens: every answer runs to max_tokens
LONG = 400  # tokens asked for: far more than any test waits for (about 10 a second here)


@pytest.fixture(scope="module")
def budget_gateway(engine, test_database_url):
    """The gateway with a token budget and a concurrency cap, so that both are kept in Redis."""
    from django.conf import settings

    assert settings.REDIS_URL, "these tests check the budget kept in Redis"
    process = GatewayProcess(database_url=test_database_url, engine=engine, extra_env={
        "TUNEPLEX_ORG_INFERENCE_TOKENS_PER_MINUTE": "1000000",
        "TUNEPLEX_ORG_INFERENCE_CONCURRENCY": "8",
        "TUNEPLEX_INFERENCE_RATE_LIMIT": "0"})
    try:
        yield process
    finally:
        process.stop()


def _redis():
    from django.conf import settings

    return redis.Redis.from_url(settings.REDIS_URL)


def charged(organization) -> int:
    """What the organization's token budget counts now, over its windows."""
    client = _redis()
    return sum(int(client.get(key) or 0)
               for key in client.scan_iter(f"tuneplex:{{org:{organization.id}}}:tokens:*"))


def in_flight(organization) -> int:
    return _redis().zcard(f"tuneplex:{{org:{organization.id}}}:inflight")


def usage(organization) -> tuple[int, int, int] | None:
    row = UsageDaily.objects.filter(organization=organization, model=BASE).first()
    return None if row is None else (row.requests, row.prompt_tokens, row.completion_tokens)


def engine_running(engine) -> float:
    """vLLM's own count of requests it is generating for now."""
    text = httpx.get(f"{engine.engine_url}/metrics", headers=auth_headers(engine.api_key), timeout=10).text
    found = re.findall(r"^vllm:num_requests_running\{[^}]*\} ([0-9.e+]+)$", text, re.M)
    return sum(float(value) for value in found)


def engine_prompt_tokens(engine, messages) -> int:
    reply = httpx.post(f"{engine.engine_url}/tokenize", headers=auth_headers(engine.api_key),
                       json={"model": BASE, "messages": messages}, timeout=30)
    return reply.json()["count"]


def test_a_stream_dropped_midway_is_charged_what_it_was_sent_and_stops_the_engine(
        budget_gateway, engine, default_model):
    tenant = make_tenant("Dropper")
    prompt = engine_prompt_tokens(engine, QUESTION)
    received = 0
    with httpx.Client(base_url=f"{budget_gateway.url}/v1", timeout=120,
                      headers={"Authorization": f"Bearer {tenant.owner_key}"}) as client:
        with client.stream("POST", "/chat/completions", json={
                "model": BASE, "messages": QUESTION, "max_tokens": LONG, "temperature": 0,
                "logit_bias": NO_EOS, "stream": True}) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    chunk = json.loads(line[6:])
                    assert "usage" not in chunk  # the running usage asked for us is not passed on
                    if chunk["choices"][0]["delta"].get("content"):
                        received += 1
                if received == 5:
                    assert engine_running(engine) == 1  # positive control for the check below
                    assert in_flight(tenant.organization) == 1
                    break  # the client goes away: the connection closes here
    wait_for(lambda: engine_running(engine) == 0, timeout=10, message="the engine to abort the request")
    counted = wait_for(lambda: usage(tenant.organization), timeout=10, message="the usage to be written")
    requests, prompt_tokens, completion_tokens = counted
    assert (requests, prompt_tokens) == (1, prompt)
    assert 5 <= completion_tokens < LONG  # what it was sent (and what was on its way), not all
    assert charged(tenant.organization) == prompt_tokens + completion_tokens  # nothing refunded
    assert in_flight(tenant.organization) == 0


def test_a_plain_request_whose_client_gives_up_is_charged_what_was_generated(budget_gateway, engine, default_model):
    tenant = make_tenant("Quitter")
    prompt = engine_prompt_tokens(engine, QUESTION)
    with httpx.Client(base_url=f"{budget_gateway.url}/v1",
                      headers={"Authorization": f"Bearer {tenant.owner_key}"}) as client:
        try:  # it gives up after 4 s and closes the connection
            reply = client.post("/chat/completions", timeout=httpx.Timeout(30, read=4), json={
                "model": BASE, "messages": QUESTION, "max_tokens": LONG, "temperature": 0,
                "logit_bias": NO_EOS})
        except httpx.ReadTimeout:
            pass
        else:
            raise AssertionError(f"answered within 4 s: {reply.status_code} {reply.text[:300]}")
    wait_for(lambda: engine_running(engine) == 0, timeout=10, message="the engine to abort the request")
    requests, prompt_tokens, completion_tokens = wait_for(
        lambda: usage(tenant.organization), timeout=10, message="the usage to be written")
    assert (requests, prompt_tokens) == (1, prompt)
    assert 1 <= completion_tokens < LONG
    assert charged(tenant.organization) == prompt_tokens + completion_tokens
    assert in_flight(tenant.organization) == 0


def test_a_plain_answer_read_to_its_end_is_openais_shape_and_charged_exactly(budget_gateway, engine, default_model):
    tenant = make_tenant("Reader")
    with httpx.Client(base_url=f"{budget_gateway.url}/v1", timeout=120,
                      headers={"Authorization": f"Bearer {tenant.owner_key}"}) as client:
        reply = client.post("/chat/completions", json={
            "model": BASE, "messages": QUESTION, "max_tokens": 5, "temperature": 0.7, "seed": 1, "n": 2,
            "logit_bias": NO_EOS, "logprobs": True, "top_logprobs": 2}).json()
        completion = client.post("/completions", json={
            "model": BASE, "prompt": ["Once upon", "The sea"], "max_tokens": 3, "temperature": 0,
            "logit_bias": NO_EOS, "logprobs": 1}).json()
    assert reply.get("object") == "chat.completion", reply
    assert completion.get("object") == "text_completion", completion
    assert [c["index"] for c in reply["choices"]] == [0, 1]
    for choice in reply["choices"]:
        assert choice["message"]["role"] == "assistant" and choice["message"]["content"]
        assert choice["finish_reason"] == "length"
        assert len(choice["logprobs"]["content"]) == 5
    assert reply["usage"]["completion_tokens"] == 10
    assert completion["object"] == "text_completion" and len(completion["choices"]) == 2
    assert all(len(c["logprobs"]["tokens"]) == 3 and c["text"] for c in completion["choices"])
    assert completion["usage"]["completion_tokens"] == 6
    total = sum(r["usage"]["total_tokens"] for r in (reply, completion))
    wait_for(lambda: charged(tenant.organization) == total, timeout=10,
             message="the budget to hold exactly what the engine reported")


def test_a_browser_stream_dropped_midway_frees_its_slot_and_is_charged(budget_gateway, engine, default_model):
    """The dashboard's playground path (Django's view, session cookie): before, a dropped stream
    kept its concurrency slot (and lease) until it went stale, and was charged nothing."""
    tenant = make_tenant("Browser")
    tenant.owner.set_password("pw-123456789")
    tenant.owner.save()
    with httpx.Client(base_url=budget_gateway.url, timeout=120) as browser:
        browser.get("/login/")
        browser.post("/login/", data={"username": tenant.owner.username, "password": "pw-123456789",
                                      "csrfmiddlewaretoken": browser.cookies["csrftoken"]})
        with browser.stream("POST", "/v1/chat/completions", json={
                "model": BASE, "messages": QUESTION, "max_tokens": LONG, "temperature": 0,
                "logit_bias": NO_EOS, "stream": True},
                headers={"X-CSRFToken": browser.cookies["csrftoken"]}) as response:
            assert response.status_code == 200
            for index, _ in enumerate(response.iter_lines()):
                if index == 6:
                    assert in_flight(tenant.organization) == 1  # positive control
                    break
    wait_for(lambda: in_flight(tenant.organization) == 0, timeout=15,
             message="the browser stream's concurrency slot to be freed")
    wait_for(lambda: engine_running(engine) == 0, timeout=10, message="the engine to abort the request")
    requests, prompt_tokens, completion_tokens = wait_for(
        lambda: usage(tenant.organization), timeout=10, message="the usage to be written")
    assert requests == 1 and prompt_tokens > 0 and 1 <= completion_tokens < LONG
    assert charged(tenant.organization) == prompt_tokens + completion_tokens
