"""The per-tenant endpoints end to end: uvicorn + the pool + a real vLLM CPU server.

Deploys go through the REST API of the running gateway, exactly as a team would do it.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from tests.conftest import GatewayProcess, make_tenant, wait_for
from tests.fixtures.adapter_rows import adapter_from_dir
from tuneplex.inference.models import UsageDaily

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]
BASE = "SmolLM2-135M-Instruct"
QUESTION = [{"role": "user", "content": "Name a colour."}]
NO_EOS = {"0": -100, "2": -100}  # the end-of-text tokens: every answer runs to max_tokens


def api(gateway, key: str) -> httpx.Client:
    return httpx.Client(base_url=f"{gateway.url}/v1", timeout=120,
                        headers={"Authorization": f"Bearer {key}"})


def chat(client: httpx.Client, model: str, **extra) -> httpx.Response:
    return client.post("/chat/completions", json={
        "model": model, "messages": QUESTION, "max_tokens": 6, "temperature": 0, **extra})


@pytest.fixture
def two_orgs(db, default_model, adapters):
    a, b = make_tenant("Alpha"), make_tenant("Beta")
    a.adapter = adapter_from_dir(a.organization, adapters["adapter-0"], suffix="a0", base_model=default_model)
    a.other = adapter_from_dir(a.organization, adapters["adapter-1"], suffix="a1", base_model=default_model)
    b.adapter = adapter_from_dir(b.organization, adapters["adapter-2"], suffix="b0", base_model=default_model)
    return a, b


def deploy(client: httpx.Client, adapter, **body) -> httpx.Response:
    return client.post(f"/adapters/{adapter.id}/deploy", json=body)


def test_each_organization_reaches_only_its_own_adapters(gateway, two_orgs):
    a, b = two_orgs
    with api(gateway, a.owner_key) as client_a, api(gateway, b.owner_key) as client_b:
        assert deploy(client_a, a.adapter).json()["deployed"] is True
        assert deploy(client_b, b.adapter).status_code == 200
        base = chat(client_a, BASE).json()["choices"][0]["message"]["content"]
        tuned = chat(client_a, a.adapter.name)
        assert tuned.status_code == 200, tuned.text
        assert tuned.json()["model"] == a.adapter.name
        assert tuned.json()["choices"][0]["message"]["content"] != base  # the adapter is applied
        # B cannot use, see, deploy or undeploy A's adapter: the same 404 as a name that does not exist.
        refused = chat(client_b, a.adapter.name)
        assert refused.status_code == 404 and refused.json()["error"]["code"] == "model_not_found"
        unknown = chat(client_b, "ft:nothing:here")
        assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"
        assert [m["id"] for m in client_b.get("/models").json()["data"]] == [BASE, b.adapter.name]
        assert client_b.get(f"/models/{a.adapter.name}").status_code == 404
        assert deploy(client_b, a.adapter).status_code == 404
        assert client_b.post(f"/adapters/{a.adapter.id}/undeploy").status_code == 404
        models_a = {m["id"]: m for m in client_a.get("/models").json()["data"]}
        assert set(models_a) == {BASE, a.adapter.name}  # a.other is not deployed
        assert models_a[a.adapter.name]["owned_by"] == a.organization.slug
        assert chat(client_b, b.adapter.name).status_code == 200


def test_undeploy_then_404_and_usage_is_recorded(gateway, two_orgs):
    a, _ = two_orgs
    with api(gateway, a.owner_key) as client:
        deploy(client, a.adapter)
        answers = [chat(client, a.adapter.name).json() for _ in range(2)]
        undeployed = client.post(f"/adapters/{a.adapter.id}/undeploy")
        assert undeployed.status_code == 200 and undeployed.json()["deployed"] is False
        gone = chat(client, a.adapter.name)
        assert gone.status_code == 404 and gone.json()["error"]["code"] == "model_not_deployed"
        assert a.adapter.name not in [m["id"] for m in client.get("/models").json()["data"]]
    # The engine itself no longer has it either: its agent unloads it once this gateway's idle
    # lease on it is handed back (within seconds).
    replica = gateway.replicas[0]
    wait_for(lambda: a.adapter.name not in replica.engine_adapters(), timeout=20,
             message="the replica to unload the undeployed adapter")
    # Written by the gateway's usage writer within a second or so.
    usage = wait_for(lambda: UsageDaily.objects.filter(organization=a.organization,
                                                       model=a.adapter.name, requests=2).first(),
                     timeout=10, message="usage to be written")
    assert usage.adapter_id == a.adapter.id
    assert usage.prompt_tokens == sum(x["usage"]["prompt_tokens"] for x in answers)
    assert usage.completion_tokens == sum(x["usage"]["completion_tokens"] for x in answers)


def test_a_corrupt_adapter_is_refused_and_the_others_keep_answering(gateway, two_orgs, adapters,
                                                                   default_model):
    a, _ = two_orgs
    broken = adapter_from_dir(a.organization, adapters["corrupt"], suffix="broken", base_model=default_model)
    with api(gateway, a.owner_key) as client:
        assert deploy(client, a.adapter).status_code == 200
        refused = deploy(client, broken)
        assert refused.status_code == 422, refused.text
        assert refused.json()["error"]["code"] == "adapter_corrupt"
        assert "truncated" in refused.json()["error"]["message"]
        state = client.get(f"/adapters/{broken.id}").json()
        assert state["deployed"] is False and "truncated" in state["deploy_error"]
        assert chat(client, broken.name).json()["error"]["code"] == "model_not_deployed"
        assert chat(client, a.adapter.name).status_code == 200


def test_a_hot_swap_during_concurrent_streams_drops_none(gateway, two_orgs):
    a, _ = two_orgs
    with api(gateway, a.owner_key) as client:
        deploy(client, a.adapter)

    async def stream(model: str, on_engine: asyncio.Event) -> tuple[list[str], str | None, float]:
        async with httpx.AsyncClient(timeout=180) as session:
            async with session.stream("POST", f"{gateway.url}/v1/chat/completions", headers={
                    "Authorization": f"Bearer {a.owner_key}"}, json={
                    "model": model, "messages": QUESTION, "max_tokens": 64, "stream": True,
                    "logit_bias": NO_EOS}) as reply:
                on_engine.set()  # the gateway answers once the engine has taken the request
                assert reply.status_code == 200, await reply.aread()
                events, finish = [], None
                async for line in reply.aiter_lines():
                    if line.startswith("data: "):
                        events.append(line[6:])
                        if line != "data: [DONE]":
                            for choice in json.loads(line[6:])["choices"]:
                                finish = choice.get("finish_reason") or finish
                return events, finish, time.monotonic()

    async def scenario():
        on_engine = [asyncio.Event() for _ in range(6)]
        streams = [asyncio.create_task(stream(model, event))
                   for model, event in zip([a.adapter.name, BASE] * 3, on_engine)]
        # Every stream is on the engine: load a new adapter, then take it out.
        await asyncio.wait_for(asyncio.gather(*(event.wait() for event in on_engine)), timeout=120)
        async with httpx.AsyncClient(base_url=f"{gateway.url}/v1", timeout=120, headers={
                "Authorization": f"Bearer {a.owner_key}"}) as admin:
            assert (await admin.post(f"/adapters/{a.other.id}/deploy", json={})).status_code == 200
            assert (await admin.post(f"/adapters/{a.other.id}/undeploy")).status_code == 200
        swapped = time.monotonic()
        return await asyncio.gather(*streams), swapped

    results, swapped = asyncio.run(scenario())
    for events, finish, ended in results:
        assert ended > swapped  # it was still streaming when the swap was over
        assert events[-1] == "[DONE]" and finish == "length"
        assert len(events) > 3
        # The usage chunk the gateway asks for on the caller's behalf is not passed on.
        assert all('"usage":{' not in e for e in events[:-1])


def test_the_openai_sdk_chats_plain_and_streaming(gateway, two_orgs):
    a, _ = two_orgs
    with api(gateway, a.owner_key) as client:
        deploy(client, a.adapter)
    sdk = openai.OpenAI(api_key=a.owner_key, base_url=f"{gateway.url}/v1", max_retries=0)
    assert {m.id for m in sdk.models.list()} == {BASE, a.adapter.name}
    plain = sdk.chat.completions.create(model=a.adapter.name, messages=QUESTION, max_tokens=6)
    assert plain.choices[0].message.content and plain.usage.completion_tokens >= 1
    chunks = list(sdk.chat.completions.create(model=a.adapter.name, messages=QUESTION, max_tokens=6,
                                              stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text and chunks[-1].usage.completion_tokens >= 1  # asked for, so passed on
    completion = sdk.completions.create(model=BASE, prompt="The sea is", max_tokens=4)
    assert completion.choices[0].text
    with pytest.raises(openai.NotFoundError) as missing:
        sdk.chat.completions.create(model="ft:not:mine", messages=QUESTION)
    assert "does not exist" in str(missing.value)
    with pytest.raises(openai.BadRequestError):
        sdk.chat.completions.create(model=BASE, messages=QUESTION, max_tokens=10**6)


def test_a_pinned_adapter_is_pinned_in_the_pool_and_limited(gateway, two_orgs):
    a, b = two_orgs
    with api(gateway, a.owner_key) as client, api(gateway, b.owner_key) as client_b:
        pinned = deploy(client, a.adapter, pinned=True)
        assert pinned.status_code == 200 and pinned.json()["pinned"] is True
        # 4 slots in the test engine: at most 2 pinned across the pool.
        assert deploy(client_b, b.adapter, pinned=True).status_code == 200
        refused = deploy(client, a.other, pinned=True)
        assert refused.status_code == 409 and refused.json()["error"]["code"] == "pin_limit_reached"
        wait_for(lambda: client.get(f"/adapters/{a.adapter.id}").json()["loaded"], timeout=10,
                 message="the pinned adapter to show as loaded")


def test_a_signed_in_browser_session_chats_with_csrf(gateway, two_orgs):
    """The dashboard's playground path: Django's view, session cookie, CSRF token required."""
    a, _ = two_orgs
    a.owner.set_password("pw-123456789")
    a.owner.save()
    with httpx.Client(base_url=gateway.url, timeout=120) as browser:
        browser.get("/login/")
        signed_in = browser.post("/login/", data={
            "username": a.owner.username, "password": "pw-123456789",
            "csrfmiddlewaretoken": browser.cookies["csrftoken"]})
        assert signed_in.status_code in (200, 302)
        body = {"model": BASE, "messages": QUESTION, "max_tokens": 4}
        forged = browser.post("/v1/chat/completions", json=body)
        assert forged.status_code == 403 and forged.json()["error"]["code"] == "permission_denied"
        answer = browser.post("/v1/chat/completions", json=body,
                              headers={"X-CSRFToken": browser.cookies["csrftoken"]})
        assert answer.status_code == 200, answer.text
        assert answer.json()["choices"][0]["message"]["content"]
        assert browser.get("/v1/models").json()["data"][0]["id"] == BASE


def test_an_organization_saturating_its_token_budget_leaves_another_at_its_own_latency(
        engine, test_database_url, two_orgs):
    """Alpha floods the gateway far beyond its token budget; once it is saturated (each of its
    four clients' latest answer is a token-budget 429, so none of its requests is on the engine
    and no reservation is left to settle before the window ends), Beta's requests keep succeeding
    within 1.5x of the median latency they have alone (measured before and after the flood).

    The budget is a fixed one-minute window: when one ends, Alpha's budget comes back and its
    requests reach the engine again. So Beta is measured only inside one window in which Alpha
    was saturated before the measurement began and that has time enough left for it; a
    measurement the window's end overtakes anyway is discarded, and Alpha saturated again in the
    next window."""
    a, b = two_orgs
    budget = 800  # tokens a minute, per organization: Alpha is refused after ~17 requests; Beta
    # (~45 tokens a request) spends at most 16 requests in the window it is measured in
    gateway = GatewayProcess(database_url=test_database_url, engine=engine, extra_env={
        "TUNEPLEX_ORG_INFERENCE_TOKENS_PER_MINUTE": str(budget),
        "TUNEPLEX_INFERENCE_RATE_LIMIT": "0"})  # the per-key request limit would refuse first
    stop = threading.Event()
    sent: list[tuple[float, float, int, str | None]] = []  # Alpha's: sent, answered, status, code
    latest: dict[int, tuple[float, float, int, str | None]] = {}
    refused = (429, "token_budget_exceeded")

    def window(at: float) -> int:  # the gateway's budget window (ratelimit.WINDOW, same clock)
        return int(at // 60)

    def flood(index: int) -> None:  # up to ~5 requests a second from each of four threads
        # (20 a second in all; the refusals share the machine's 2 cores with Beta's engine, and
        # at 80 a second their own cost alone slowed Beta by half). 8 tokens each: the ~17 that
        # a window admits are answered within seconds, so Alpha saturates early in a window.
        with api(gateway, a.owner_key) as client:
            while not stop.is_set():
                started = time.time()
                reply = chat(client, BASE, max_tokens=8, logit_bias=NO_EOS)
                code = reply.json()["error"]["code"] if reply.status_code != 200 else None
                answer = (started, time.time(), reply.status_code, code)
                sent.append(answer)
                latest[index] = answer
                stop.wait(0.2)

    def saturated_in(current: int) -> bool:
        """Each client's latest answer is a refusal asked and answered in this window."""
        answers = list(latest.values())
        return len(answers) == 4 and all(
            (status, code) == refused and window(asked) == window(answered) == current
            for asked, answered, status, code in answers)

    beta_windows: set[int] = set()  # the windows Beta spent some of its own budget in

    def beta_latencies(client: httpx.Client, count: int) -> list[float]:
        timings = []
        for _ in range(count):
            started = time.perf_counter()
            beta_windows.add(window(time.time()))
            reply = chat(client, BASE, max_tokens=8, logit_bias=NO_EOS)
            timings.append(time.perf_counter() - started)
            beta_windows.add(window(time.time()))
            assert reply.status_code == 200, reply.text
            assert reply.json()["usage"]["completion_tokens"] == 8
        return timings

    measured, discarded = None, 0
    try:
        with api(gateway, b.owner_key) as client_b:
            beta_latencies(client_b, 2)  # warm: the key cache, the connection, the engine
            alone = beta_latencies(client_b, 8)
            needed = 2 * sum(alone) + 2  # seconds the eight measured requests may take, at most

            def measurable() -> int | None:
                now = time.time()
                current = window(now)
                fits = (current + 1) * 60 - now >= needed
                fresh = current > max(beta_windows)  # Beta's own budget untouched in it
                return current if fits and fresh and saturated_in(current) else None

            with ThreadPoolExecutor(4) as pool:
                floods = [pool.submit(flood, index) for index in range(4)]
                try:
                    while measured is None:
                        assert discarded < 3, "the budget window ended during every measurement"
                        current = wait_for(measurable, timeout=200, interval=0.2, message=(
                            f"every client of Alpha refused, early enough in a window ({needed:.0f} s"
                            " left) that Beta has not spent in"))
                        began = time.time()
                        contended = beta_latencies(client_b, 8)
                        ended = time.time()
                        if window(ended) == current:
                            measured = (current, began, ended)
                        else:
                            discarded += 1  # Alpha's budget came back meanwhile: measure again
                finally:
                    stop.set()
                    for job in floods:
                        job.result()
            alone += beta_latencies(client_b, 8)
    finally:
        gateway.stop()
    current, began, ended = measured
    admitted = [(asked, answered) for asked, answered, status, _ in sent if status == 200]
    # Alpha's share of the measured window ran on the engine before Beta was measured ...
    share = sum(1 for asked, answered in admitted if window(asked) == current and answered < began)
    # ... and none of its requests was admitted while Beta was measured: no answered 200 whose
    # time at the gateway overlaps the measurement (every request has been answered by now).
    during = sum(1 for asked, answered in admitted if asked < ended and answered > began)
    alone_p50, contended_p50 = statistics.median(alone), statistics.median(contended)
    refusals = sum(1 for *_, status, code in sent if (status, code) == refused)
    print(f"Beta's median alone {alone_p50 * 1000:.0f} ms, with Alpha saturated "
          f"{contended_p50 * 1000:.0f} ms ({contended_p50 / alone_p50:.2f}x), measured "
          f"{began % 60:.0f}-{ended % 60:.0f} s into a window ({discarded} discarded); Alpha: "
          f"{len(admitted)} admitted ({share} in the measured window), {refusals} refused")
    assert share >= 1 and refusals >= 20, (share, refusals)
    assert during == 0  # saturated: nothing of Alpha's reached the engine while Beta was measured
    assert {status for _, _, status, _ in sent} <= {200, 429}  # nothing failed any other way
    assert contended_p50 <= 1.5 * alone_p50, \
        f"Beta: {contended_p50:.3f} s with Alpha saturated, {alone_p50:.3f} s alone"
