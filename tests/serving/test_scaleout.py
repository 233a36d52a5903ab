"""Scale-out serving: two gateway processes and two vLLM CPU replicas, each with its pool agent.

Everything real: uvicorn gateways, `manage.py run_engine` replicas (vLLM + agent) with their own
serving folders, PostgreSQL. The replica-killing test comes last in the module: its replica needs
half a minute or more to come back.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import threading
import time
from urllib.parse import urlsplit

import httpx
import pytest

from serving.engine import group_alive
from tests.conftest import MODEL, GatewayProcess, empty_replicas, wait_for
from tests.fixtures.adapter_rows import adapter_from_dir

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]
QUESTION = [{"role": "user", "content": "Tell me about the sea."}]
NO_EOS = {"0": -100, "2": -100}  # the end-of-text tokens: every answer runs to max_tokens


@pytest.fixture(scope="module")
def replicas(engine, second_engine):
    return [engine, second_engine]


@pytest.fixture(scope="module")
def gateways(replicas, test_database_url):
    started = []
    try:
        for _ in range(2):
            started.append(GatewayProcess(database_url=test_database_url, engine=replicas[0],
                                          replicas=replicas))
        yield started
    finally:
        for gateway in started:
            gateway.stop()
        empty_replicas(*replicas)


@pytest.fixture
def tenant(db, default_model, adapters):
    from tests.conftest import make_tenant

    tenant = make_tenant("Scale")
    # Ten adapters (the five directories twice) for 2 x 4 slots.
    tenant.rows = [adapter_from_dir(tenant.organization, adapters[f"adapter-{i % 5}"], suffix=f"s{i}",
                                    base_model=default_model) for i in range(10)]
    return tenant


def api(gateway, key: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=f"{gateway.url}/v1", timeout=300,
                             headers={"Authorization": f"Bearer {key}"})


async def stream(gateway, key: str, model: str, max_tokens: int = 8,
                 on_engine: asyncio.Event | None = None, **extra) -> dict:
    """One streamed chat; what came back, and when it ran. ``on_engine`` is set when the gateway
    answers, which it does once an engine has taken the request (its adapter's lease held)."""
    started = time.monotonic()
    async with api(gateway, key) as client:
        async with client.stream("POST", "/chat/completions", json={
                "model": model, "messages": QUESTION, "max_tokens": max_tokens, "stream": True,
                **extra}) as reply:
            if on_engine is not None:
                on_engine.set()
            if reply.status_code != 200:
                return {"model": model, "status": reply.status_code, "body": (await reply.aread()).decode()}
            events, first = [], None
            async for line in reply.aiter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    first = first or time.monotonic()  # it runs on an engine: its lease is held
    return {"model": model, "status": 200, "events": events, "started": first or started,
            "ended": time.monotonic()}


class Sampler(threading.Thread):
    """Polls both agents: which adapters each holds, every 100 ms."""

    def __init__(self, replicas) -> None:
        super().__init__(daemon=True)
        self.replicas = replicas
        self.samples: list[tuple[float, set[str]]] = []
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            loaded = set()
            for replica in self.replicas:
                state = replica.state()
                loaded |= set(state.get("loaded", ())) | set(state.get("loading", ()))
            self.samples.append((time.monotonic(), loaded))
            self.halt.wait(0.1)


LONG = 48  # tokens a stream: seconds on these CPUs, long enough to be sampled while it runs


def test_streams_over_more_adapters_than_slots_with_deploys_and_undeploys(gateways, replicas, tenant):
    rows, key = tenant.rows, tenant.owner_key
    first, late, dropped = rows[:8], rows[8:], rows[0]

    async def scenario():
        async with api(gateways[0], key) as admin:
            for row in first:
                assert (await admin.post(f"/adapters/{row.id}/deploy", json={})).status_code == 200
        evictions = sum(r.state()["evictions"] for r in replicas)
        # Streams over the eight through both gateways (long ones: 48 tokens each); the one of
        # the adapter to be undeployed starts last and runs longest (96 tokens), so that it is
        # surely still streaming when the undeploy is done (the first ones may have ended while
        # the last waited for a slot). Then two more adapters are deployed (every slot may be
        # leased then: they are staged, and loaded once a slot comes free) and streamed from.
        on_engine = [asyncio.Event() for _ in first]
        tasks = [asyncio.create_task(stream(gateways[i % 2], key, row.name, LONG,
                                            on_engine[i], logit_bias=NO_EOS))
                 for i, row in enumerate(first) if row is not dropped]
        await asyncio.wait_for(asyncio.gather(*(on_engine[i].wait() for i, row in enumerate(first)
                                                if row is not dropped)), timeout=120)
        tasks.insert(0, asyncio.create_task(stream(gateways[0], key, dropped.name, 2 * LONG,
                                                   on_engine[0], logit_bias=NO_EOS)))
        await asyncio.wait_for(on_engine[0].wait(), timeout=120)
        async with api(gateways[1], key) as admin:
            # The undeploy first, while its adapter's stream runs (a single quick call: the
            # deploys below may take longer than a stream lasts on a busy machine).
            assert (await admin.post(f"/adapters/{dropped.id}/undeploy")).status_code == 200
            changed = time.monotonic()
            for row in late:
                assert (await admin.post(f"/adapters/{row.id}/deploy", json={})).status_code == 200
            tasks += [asyncio.create_task(stream(gateways[i % 2], key, row.name, LONG,
                                                 logit_bias=NO_EOS))
                      for i, row in enumerate(late * 2)]
        results = await asyncio.gather(*tasks)
        return results, evictions, changed

    sampler = Sampler(replicas)
    sampler.start()
    try:
        results, evictions_before, changed = asyncio.run(scenario())
    finally:
        sampler.halt.set()
        sampler.join()
    # The undeployed adapter's stream: on an engine before the undeploy began, and still
    # streaming once it was done (it ends cleanly below, like every other).
    assert results[0]["model"] == dropped.name
    assert results[0]["status"] == 200 and results[0]["ended"] > changed, results[0]
    for result in results:
        assert result["status"] == 200, result
        assert result["events"][-1] == "[DONE]", result
        assert not any('"error"' in e for e in result["events"]), result
        # While a stream ran, a replica held its adapter the whole time: never evicted while leased.
        during = [loaded for at, loaded in sampler.samples
                  if result["started"] + 0.3 < at < result["ended"] - 0.3]
        assert during and all(result["model"] in loaded for loaded in during), result["model"]
    # Ten adapters on eight slots: the pools had to evict to serve them all.
    assert sum(r.state()["evictions"] for r in replicas) > evictions_before
    wait_for(lambda: all(dropped.name not in r.engine_adapters() for r in replicas), timeout=30,
             message="the undeployed adapter to leave every replica")


def _metrics(replica) -> tuple[float, float]:
    text = httpx.get(f"{replica.engine_url}/metrics", timeout=10).text
    running = waiting = 0.0
    for line in text.splitlines():
        if line.startswith("vllm:num_requests_running{"):
            running += float(line.rsplit(" ", 1)[1])
        elif line.startswith("vllm:num_requests_waiting{"):
            waiting += float(line.rsplit(" ", 1)[1])
    return running, waiting


def _engines_busy(replicas) -> float:
    return sum(sum(_metrics(r)) for r in replicas)


def _post_and_hang_up(gateway, key: str, body: dict, replicas, *, read_first_chunk: bool) -> None:
    """Send a request over a raw socket, wait until an engine works on it, then close the socket."""
    raw = json.dumps(body).encode()
    parts = urlsplit(gateway.url)
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: {parts.netloc}\r\nAuthorization: Bearer {key}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(raw)}\r\n\r\n").encode()
    sock = socket.create_connection((parts.hostname, parts.port), timeout=60)
    try:
        sock.sendall(head + raw)
        if read_first_chunk:
            assert sock.recv(4096).startswith(b"HTTP/1.1 200")
        wait_for(lambda: _engines_busy(replicas) > 0, timeout=60, interval=0.2,
                 message="an engine to run the request")
    finally:
        sock.close()


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_hangs_up_frees_the_engine(gateways, replicas, tenant, stream):
    # Eight prompts of up to 500 tokens each: minutes of work for these CPUs if nobody cancels it.
    # The end-of-text tokens (0 and 2) are banned through OpenAI's logit_bias, so every sequence
    # runs to max_tokens (vLLM's own ignore_eos is not one of the fields the gateway forwards).
    body = {"model": MODEL, "prompt": ["Write a long story about the sea."] * 8, "max_tokens": 500,
            "logit_bias": {"0": -100, "2": -100}, "stream": stream}
    wait_for(lambda: _engines_busy(replicas) == 0, timeout=60, message="idle engines")
    hung_up = time.monotonic()
    _post_and_hang_up(gateways[0], tenant.owner_key, body, replicas, read_first_chunk=stream)
    wait_for(lambda: _engines_busy(replicas) == 0, timeout=15, interval=0.2,
             message="the engine to abort the abandoned request")
    assert time.monotonic() - hung_up < 60


def test_a_replica_killed_mid_stream_ends_its_streams_cleanly_and_comes_back(gateways, replicas, tenant):
    key = tenant.owner_key
    pinned = tenant.rows[0]
    with httpx.Client(base_url=f"{gateways[0].url}/v1", timeout=120,
                      headers={"Authorization": f"Bearer {key}"}) as admin:
        assert admin.post(f"/adapters/{pinned.id}/deploy", json={"pinned": True}).status_code == 200
    wait_for(lambda: all(pinned.name in r.engine_adapters() for r in replicas), timeout=30,
             message="the pinned adapter on both replicas")
    victim = replicas[1]
    engine_pid = victim.engine_pid()

    async def scenario():
        # Four long base-model streams over the two gateways: each gateway spreads its two.
        tasks = [asyncio.create_task(stream(gateways[i % 2], key, MODEL, max_tokens=200))
                 for i in range(4)]
        await asyncio.to_thread(wait_for, lambda: sum(_metrics(victim)) >= 1, timeout=60,
                                interval=0.2, message="a stream on the victim")
        os.kill(engine_pid, signal.SIGKILL)  # the engine dies; its agent stays
        return await asyncio.gather(*tasks)

    results = asyncio.run(scenario())
    errors = 0
    for result in results:
        assert result["status"] == 200, result
        assert result["events"][-1] == "[DONE]", result
        if any('"error"' in e for e in result["events"]):
            error = json.loads(next(e for e in result["events"] if '"error"' in e))["error"]
            assert error["code"] == "engine_error" and "127.0.0.1" not in error["message"]
            errors += 1
    assert errors >= 1
    # The next requests, through either gateway, succeed on the other replica.
    for gateway in gateways:
        for model in (MODEL, pinned.name):
            reply = httpx.post(f"{gateway.url}/v1/chat/completions", timeout=120,
                               headers={"Authorization": f"Bearer {key}"},
                               json={"model": model, "messages": QUESTION, "max_tokens": 4})
            assert reply.status_code == 200, reply.text
    # The old engine's whole process group is gone (no orphaned engine core) ...
    wait_for(lambda: not group_alive(engine_pid), timeout=30, message="the old engine's group to end")
    # ... and the agent starts it again and loads its pinned adapter back.
    wait_for(lambda: victim.state().get("ready"), timeout=400, interval=2, message="the engine to restart")
    wait_for(lambda: pinned.name in victim.engine_adapters(), timeout=30,
             message="the restarted engine to get its adapter back")
    assert victim.engine_pid() != engine_pid

