"""A replica's pool agent (the residency authority) against its real vLLM CPU engine.

The agent runs in `manage.py run_engine` beside the engine, stages adapters from artifact
storage into its own serving folder, and is driven here through its HTTP API, as gateways do.
"""

from __future__ import annotations

import httpx
import pytest

from serving.engine import auth_headers
from tests.conftest import MODEL, REPLICA_SLOTS, empty_replicas, wait_for
from tests.fixtures.adapter_rows import adapter_from_dir

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


class Agent:
    def __init__(self, replica) -> None:
        self.replica = replica
        self.client = httpx.Client(base_url=replica.url, headers=auth_headers(replica.api_key), timeout=120)

    def lease(self, adapter, *, wait: float = 1.0) -> httpx.Response:
        return self.client.post("/v1/leases", json={"adapter": adapter.name, "adapter_id": adapter.id,
                                                    "holder": "test", "wait": wait})

    def release(self, *leases: str) -> None:
        assert self.client.post("/v1/leases/release", json={"leases": list(leases)}).status_code == 200

    def state(self) -> dict:
        return self.client.get("/v1/state").json()


def complete(replica, model: str, prompt: str = "The sea is") -> str:
    response = httpx.post(f"{replica.engine_url}/v1/completions", headers=auth_headers(replica.api_key),
                          json={"model": model, "prompt": prompt, "max_tokens": 4, "temperature": 0},
                          timeout=120)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


@pytest.fixture
def agent(engine):
    agent = Agent(engine)
    yield agent
    agent.client.close()
    from tuneplex.adapters.models import Adapter

    Adapter.objects.update(deployed=False, pinned=False)
    empty_replicas(engine)  # the agent, following the database, unloads everything


@pytest.fixture
def rows(org_a, default_model, adapters):
    """Six adapter rows (the five adapter directories, one of them twice) of organization A."""
    return [adapter_from_dir(org_a.organization, adapters[f"adapter-{i % 5}"], suffix=f"p{i}",
                             base_model=default_model) for i in range(REPLICA_SLOTS + 2)]


def test_every_call_to_a_replica_needs_the_engine_key(engine):
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 2}
    assert httpx.post(f"{engine.engine_url}/v1/completions", json=body, timeout=30).status_code == 401
    wrong = {"Authorization": "Bearer not-the-key"}
    assert httpx.post(f"{engine.engine_url}/v1/completions", json=body, headers=wrong,
                      timeout=30).status_code == 401
    assert httpx.post(f"{engine.engine_url}/v1/load_lora_adapter", timeout=30, json={
        "lora_name": "x", "lora_path": "/tmp"}).status_code == 401
    assert httpx.get(f"{engine.url}/v1/state", timeout=10).status_code == 401
    assert httpx.post(f"{engine.url}/v1/leases", json={}, headers=wrong, timeout=10).status_code == 401
    assert complete(engine, MODEL)  # with the key it answers


def test_a_lease_stages_and_loads_the_adapter_from_storage(agent, engine, rows):
    base = complete(engine, MODEL)
    lease = agent.lease(rows[0])
    assert lease.status_code == 200, lease.text
    assert rows[0].name in engine.engine_adapters()
    # Staged from artifact storage into this replica's own serving folder, by its id.
    assert (engine.serving_dir / "adapters" / rows[0].id / "adapter_model.safetensors").is_file()
    assert complete(engine, rows[0].name) != base
    agent.release(lease.json()["lease"])


def test_eviction_takes_the_least_recently_used_unleased_adapter(agent, engine, rows):
    leases = [agent.lease(row).json()["lease"] for row in rows[:REPLICA_SLOTS]]
    assert agent.state()["loaded"] == [row.name for row in rows[:REPLICA_SLOTS]]
    # Every slot leased: a fifth adapter waits for a release, then is refused.
    refused = agent.lease(rows[REPLICA_SLOTS], wait=0.5)
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "slots_busy"
    agent.release(leases[1], leases[2])  # rows 1 and 2 unleased; 1 is the least recently used
    evictions = agent.state()["evictions"]
    taken = agent.lease(rows[REPLICA_SLOTS])
    assert taken.status_code == 200, taken.text
    on_engine = engine.engine_adapters()
    assert rows[1].name not in on_engine and {rows[0].name, rows[2].name, rows[3].name} <= on_engine
    assert agent.state()["evictions"] == evictions + 1
    agent.release(leases[0], leases[3], taken.json()["lease"])


def test_a_corrupt_adapter_is_refused_and_the_replica_keeps_serving(agent, engine, org_a, adapters,
                                                                    default_model, rows):
    broken = adapter_from_dir(org_a.organization, adapters["corrupt"], suffix="broken",
                              base_model=default_model)
    good = agent.lease(rows[0])
    refused = agent.lease(broken)
    assert refused.status_code == 422 and refused.json()["error"]["code"] == "adapter_corrupt"
    assert broken.name not in agent.state()["loaded"]
    complete(engine, rows[0].name)
    agent.release(good.json()["lease"])


def test_an_unknown_adapter_is_never_loaded(agent, rows):
    forged = agent.client.post("/v1/leases", json={"adapter": "ft:someone-else", "adapter_id": rows[0].id,
                                                   "holder": "test"})
    assert forged.status_code == 422 and forged.json()["error"]["code"] == "adapter_unknown"


def test_an_undeployed_adapter_is_unloaded_at_its_last_release(agent, engine, rows):
    lease = agent.lease(rows[0]).json()["lease"]
    answer = agent.client.post("/v1/adapters/unload", json={"adapter": rows[0].name}).json()
    assert answer == {"unloaded": False}  # a request holds it
    assert rows[0].name in engine.engine_adapters()
    agent.release(lease)
    assert rows[0].name not in engine.engine_adapters()


def test_a_lease_that_is_not_renewed_expires(agent, rows):
    lease = agent.lease(rows[0]).json()["lease"]
    assert rows[0].name in agent.state()["leased"]
    wait_for(lambda: rows[0].name not in agent.state()["leased"], timeout=20,
             message="the lease to expire (TUNEPLEX_ENGINE_LEASE_SECONDS=6)")
    assert agent.client.post("/v1/leases/renew", json={"leases": [lease]}).json() == {"unknown": [lease]}


def test_a_deployed_pinned_adapter_is_loaded_when_the_agent_reconciles(agent, engine, rows):
    from tuneplex.adapters.models import Adapter

    Adapter.objects.filter(pk=rows[0].pk).update(deployed=True, pinned=True)
    assert agent.client.post("/v1/reconcile").json()["loaded"] == [rows[0].name]
    assert rows[0].name in engine.engine_adapters()
    assert rows[0].name in agent.state()["pinned"]


def test_the_engines_metrics_reach_monitoring_without_adapter_names(agent, engine, rows):
    lease = agent.lease(rows[0])
    assert lease.status_code == 200, lease.text
    complete(engine, rows[0].name)
    agent.release(lease.json()["lease"])
    # vLLM itself names the adapter it ran (the name carries the organization's slug) ...
    raw = httpx.get(f"{engine.engine_url}/metrics", timeout=10).text
    assert rows[0].name in raw and "vllm:lora_requests_info" in raw
    # ... the agent serves the same metrics without it.
    served = httpx.get(f"{engine.url}/metrics/engine", timeout=10)
    assert served.status_code == 200
    assert "vllm:prompt_tokens" in served.text and "vllm:num_requests_running" in served.text
    assert rows[0].name not in served.text and "lora_requests_info" not in served.text
