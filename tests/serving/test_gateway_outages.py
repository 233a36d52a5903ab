"""Floods and outages at the gateway's admission: bad keys, and Redis that blinks.

The address limit and the outage run against the real ASGI app under uvicorn and a real Redis
(a private redis-server for the outage, stopped and continued with signals: a blink keeps its
data); the look-up pools and the refusal cache are checked in-process, where the pools can be
filled on purpose.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import threading
import time
import uuid

import httpx
import pytest
import redis

from tests.conftest import GatewayProcess, free_port, make_tenant, wait_for

pytestmark = pytest.mark.django_db(transaction=True)
BASE = "SmolLM2-135M-Instruct"
QUESTION = [{"role": "user", "content": "Tell me a long story about the sea."}]
NO_EOS = {"0": -100, "2": -100}


def ask(url: str, key: str, address: str, model: str = "no-such-model") -> httpx.Response:
    """A chat request as if from ``address`` (uvicorn trusts X-Forwarded-For from loopback)."""
    return httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
        "model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1},
        headers={"Authorization": f"Bearer {key}", "X-Forwarded-For": address})


def _start_of_a_minute() -> None:
    """The address limit counts per wall-clock minute: run inside one."""
    if time.time() % 60 > 45:
        time.sleep(60 - time.time() % 60 + 0.2)


@pytest.mark.e2e
def test_an_address_that_keeps_failing_is_answered_429_and_no_one_else_is(test_database_url):
    tenant = make_tenant("Known")
    gateway = GatewayProcess(database_url=test_database_url, engine=None, extra_env={
        "TUNEPLEX_INFERENCE_AUTH_FAILURES_PER_MINUTE": "5"})
    try:
        _start_of_a_minute()
        flooder, neighbour = "127.0.0.21", "127.0.0.22"
        assert ask(gateway.url, tenant.owner_key, flooder).json()["error"]["code"] == "model_not_found"
        for _ in range(5):
            refused = ask(gateway.url, f"tpx_{uuid.uuid4().hex}", flooder)
            assert refused.json()["error"]["code"] == "invalid_api_key"
        limited = ask(gateway.url, f"tpx_{uuid.uuid4().hex}", flooder)
        assert limited.status_code == 429, limited.text
        assert limited.json()["error"]["code"] == "too_many_failed_authentications"
        assert 1 <= int(limited.headers["Retry-After"]) <= 61
        # A key this process already knows is not held back, nor is another address.
        assert ask(gateway.url, tenant.owner_key, flooder).json()["error"]["code"] == "model_not_found"
        assert ask(gateway.url, f"tpx_{uuid.uuid4().hex}", neighbour).status_code == 401
    finally:
        gateway.stop()


def _complete(key: str, model: str = "no-such-model"):
    from tuneplex.inference.gateway import CHAT, complete

    raw = json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}]}).encode()
    return complete(CHAT, authorization=f"Bearer {key}", raw=raw, address="127.0.0.31")


def test_a_flood_of_unknown_keys_does_not_hold_back_the_keys_already_known(settings):
    """Unknown keys are looked up on a pool of their own: with it full, a known key whose cached
    entry expired is looked up again at once; a key never seen waits for the flood (positive
    control), and gets through once the flood drains."""
    from tuneplex.inference import cache, gateway

    settings.INFERENCE_AUTH_FAILURES_PER_MINUTE = 0
    known, new = make_tenant("Known"), make_tenant("New")
    release = threading.Event()

    async def scenario() -> None:
        assert json.loads((await _complete(known.owner_key)).body)["error"]["code"] == "model_not_found"
        cache.principals._entries = {k: (0.0, v) for k, v in cache.principals._entries.items()}  # expired
        flood = gateway._lookup_pool("unknown")
        for _ in range(settings.INFERENCE_LOOKUP_THREADS):
            flood.submit(release.wait, 60)
        reply = await asyncio.wait_for(_complete(known.owner_key), timeout=20)
        assert json.loads(reply.body)["error"]["code"] == "model_not_found"
        waiting = asyncio.ensure_future(_complete(new.owner_key))
        done, _ = await asyncio.wait({waiting}, timeout=1)
        assert not done  # queued behind the flood
        release.set()
        assert json.loads((await asyncio.wait_for(waiting, 20)).body)["error"]["code"] == "model_not_found"

    try:
        asyncio.run(scenario())
    finally:
        release.set()


def test_a_refused_key_is_remembered_so_a_flood_of_it_asks_the_database_once(settings, monkeypatch):
    from tuneplex.apikeys.authentication import ApiKeyAuthentication

    settings.INFERENCE_AUTH_FAILURES_PER_MINUTE = 0
    looked_up = []
    real = ApiKeyAuthentication.authenticate
    monkeypatch.setattr(ApiKeyAuthentication, "authenticate",
                        lambda self, request: looked_up.append(1) or real(self, request))

    async def flood() -> list[int]:
        bad = f"tpx_{uuid.uuid4().hex}"
        replies = [await _complete(bad) for _ in range(5)]
        replies.append(await _complete(f"tpx_{uuid.uuid4().hex}"))  # another: looked up
        return [reply.status for reply in replies]

    assert asyncio.run(flood()) == [401] * 6
    assert len(looked_up) == 2


class PrivateRedis:
    """A redis-server of this test's own, so that it can be paused (SIGSTOP) like a blink."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no"], stdout=subprocess.DEVNULL, start_new_session=True)
        wait_for(self._up, timeout=20, message="the private redis-server")

    def _up(self) -> bool:
        try:
            return redis.Redis.from_url(self.url).ping()
        except redis.RedisError:
            return False

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url)

    def pause(self) -> None:
        os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.process.pid, signal.SIGCONT)

    def stop(self) -> None:
        self.resume()
        self.process.terminate()
        self.process.wait(timeout=20)


@pytest.mark.e2e
def test_redis_blinking_is_a_503_and_a_settlement_waits_for_it(engine, test_database_url,
                                                                 default_model):
    """Before: a Redis error was a 500 for every request, and a settlement that failed kept the
    organization's concurrency slot (and its reserved tokens) until they went stale."""
    tenant = make_tenant("Blink")
    store = PrivateRedis()
    gateway = GatewayProcess(database_url=test_database_url, engine=engine, extra_env={
        "REDIS_URL": store.url, "TUNEPLEX_ORG_INFERENCE_CONCURRENCY": "8",
        "TUNEPLEX_ORG_INFERENCE_TOKENS_PER_MINUTE": "1000000", "TUNEPLEX_INFERENCE_RATE_LIMIT": "0"})
    inflight = f"tuneplex:{{org:{tenant.organization.id}}}:inflight"
    headers = {"Authorization": f"Bearer {tenant.owner_key}"}
    try:
        # The token counts below are read from one budget window: start near a window's start.
        if time.time() % 60 > 20:
            time.sleep(60 - time.time() % 60 + 0.2)
        started = int(time.time())
        assert ask(gateway.url, tenant.owner_key, "127.0.0.41", BASE).status_code == 200
        with httpx.Client(base_url=gateway.url, timeout=120, headers=headers) as client:
            with client.stream("POST", "/v1/chat/completions", json={
                    "model": BASE, "messages": QUESTION, "max_tokens": 400, "temperature": 0,
                    "logit_bias": NO_EOS, "stream": True}) as response:
                assert response.status_code == 200
                for index, _ in enumerate(response.iter_lines()):
                    if index == 4:
                        assert store.client().zcard(inflight) == 1  # positive control
                        store.pause()  # Redis blinks as the client goes away
                        break
        wait_for(lambda: "settling a request failed" in gateway.log_path.read_text(), timeout=30,
                 message="the gateway to fail to settle")
        refused = ask(gateway.url, tenant.owner_key, "127.0.0.41", BASE)
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"]["code"] == "limits_unavailable"
        assert refused.headers["Retry-After"] == "1"
        store.resume()
        wait_for(lambda: store.client().zcard(inflight) == 0, timeout=30,
                 message="the settlement to land once Redis is back")
        window = int(time.time() // 60)
        tokens = sum(int(store.client().get(key)) for key in
                     store.client().scan_iter(f"tuneplex:{{org:{tenant.organization.id}}}:tokens:*"))
        assert window == started // 60, "the budget window rolled over: the machine was too slow"
        # what the two requests used (prompts of about 40 tokens, a few generated), not the 400
        # that the stream reserved
        assert 40 < tokens < 300
        assert ask(gateway.url, tenant.owner_key, "127.0.0.41", BASE).status_code == 200
    finally:
        gateway.stop()
        store.stop()
