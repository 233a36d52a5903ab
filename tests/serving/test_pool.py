"""The pool manager against a real vLLM CPU server with runtime LoRA loading."""

from __future__ import annotations

import httpx
import pytest

from serving.pool import AdapterLoadError, LoraPool


def complete(url: str, model: str, prompt: str = "The sea is") -> str:
    response = httpx.post(f"{url}/v1/completions", json={
        "model": model, "prompt": prompt, "max_tokens": 4, "temperature": 0}, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


@pytest.fixture
def pool(engine):
    pool = LoraPool([engine.url], slots=3)
    yield pool
    for name in list(pool.wanted):
        pool.undeploy(name)
    pool.client.close()


def test_a_deployed_adapter_answers_and_changes_the_output(pool, engine, adapters):
    base = complete(engine.url, "SmolLM2-135M-Instruct")
    url = pool.deploy("adapter-a", str(adapters["adapter-0"]))
    assert url == engine.url
    assert "adapter-a" in pool.engine_adapters(pool.replicas[0])
    assert complete(url, "adapter-a") != base


def test_eviction_at_the_slot_limit_and_lazy_reload(pool, engine, adapters):
    for index in range(3):
        pool.deploy(f"a{index}", str(adapters[f"adapter-{index}"]))
    assert list(pool.replicas[0].loaded) == ["a0", "a1", "a2"]
    pool.deploy("a3", str(adapters["adapter-3"]))  # full: a0, least recently used, goes
    on_engine = pool.engine_adapters(pool.replicas[0])
    assert "a0" not in on_engine and {"a1", "a2", "a3"} <= set(on_engine)
    assert pool.route("a0") == engine.url  # deployed, so loaded again on first use
    assert "a1" not in pool.engine_adapters(pool.replicas[0])
    complete(engine.url, "a0")


def test_a_pinned_adapter_is_never_evicted(pool, adapters):
    pool.deploy("keep", str(adapters["adapter-0"]), pinned=True)
    for index in range(1, 5):
        pool.deploy(f"b{index}", str(adapters[f"adapter-{index}"]))
    assert "keep" in pool.engine_adapters(pool.replicas[0])


def test_a_corrupt_adapter_fails_clearly_and_the_pool_keeps_serving(pool, engine, adapters):
    pool.deploy("good", str(adapters["adapter-1"]))
    with pytest.raises(AdapterLoadError, match="engine answered"):
        pool.deploy("broken", str(adapters["corrupt"]))
    assert "broken" not in pool.wanted and "broken" not in pool.replicas[0].loaded
    complete(engine.url, "good")


def test_undeploy_removes_it(pool, engine, adapters):
    pool.deploy("gone", str(adapters["adapter-2"]))
    pool.undeploy("gone")
    assert "gone" not in pool.engine_adapters(pool.replicas[0])
    with pytest.raises(KeyError):
        pool.route("gone")
    response = httpx.post(f"{engine.url}/v1/completions",
                          json={"model": "gone", "prompt": "x", "max_tokens": 2}, timeout=60)
    assert response.status_code == 404


def test_a_restarted_replica_gets_its_adapters_back(pool, engine, adapters):
    pool.deploy("survivor", str(adapters["adapter-3"]))
    engine.stop()
    engine.start()
    engine.wait_ready(timeout=300)
    assert "survivor" not in pool.engine_adapters(pool.replicas[0])  # the restart lost it
    assert pool.reconcile() == {engine.url: ["survivor"]}
    assert "survivor" in pool.engine_adapters(pool.replicas[0])
    complete(engine.url, "survivor")
