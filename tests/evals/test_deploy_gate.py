"""Eval-gated deploys end to end: a job's adapter goes through its family's gate (two eval runs
on the real replica, run by a real worker) and is deployed only if it beats the incumbent.

Both adapters are built on purpose from one random adapter: ``clean`` (its B matrices zeroed:
the base model's answers) and ``wrecked`` (B multiplied by 40: answers that no longer name the
capital). The eval asks for the capital of France.
"""

from __future__ import annotations

import httpx
import pytest
from django.utils import timezone

from tests.conftest import MODEL, wait_for
from tests.fixtures.adapter_rows import adapter_from_dir
from tuneplex.adapters.models import Adapter
from tuneplex.evals.gates import after_training
from tuneplex.evals.models import GateDecision
from tuneplex.finetuning.models import JobEvent

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

QUESTIONS = ["What is the capital of France?", "Name the capital city of France.",
             "Which city is the capital of France?", "France's capital is which city?"]


def api(gateway, tenant) -> httpx.Client:
    return httpx.Client(base_url=f"{gateway.url}/v1", timeout=60,
                        headers={"Authorization": f"Bearer {tenant.owner_key}"})


def gate(client: httpx.Client, suffix: str) -> dict:
    made = client.post("/evals", json={
        "name": "capital", "data_source_config": {"type": "custom", "item_schema": {
            "type": "object", "properties": {"question": {"type": "string"}}}},
        "testing_criteria": [{"type": "string_check", "name": "names Paris", "operation": "ilike",
                              "input": "{{sample.output_text}}", "reference": "paris"}]})
    assert made.status_code == 200, made.text
    created = client.post("/deploy_gates", json={
        "eval_id": made.json()["id"], "base_model": MODEL, "suffix": suffix, "data_source": {
            "source": {"type": "file_content", "content": [{"item": {"question": q}} for q in QUESTIONS]},
            "input_messages": {"type": "template", "template": [
                {"role": "user", "content": "{{item.question}}"}]},
            "sampling_params": {"temperature": 0, "max_completion_tokens": 12}}})
    assert created.status_code == 200, created.text
    return created.json()


def decided(adapter: Adapter) -> GateDecision:
    return wait_for(lambda: GateDecision.objects.filter(adapter=adapter).exclude(
        status=GateDecision.Status.EVALUATING).first(), timeout=300, interval=1,
        message=f"the gate's decision on {adapter.name}")


def events(adapter: Adapter) -> list[str]:
    return list(JobEvent.objects.filter(job=adapter.job).order_by("created_at")
                .values_list("message", flat=True))


def test_the_gate_refuses_a_worse_adapter_and_deploys_a_better_one(gateway, gate_worker, org_a,
                                                                   default_model, built, engine,
                                                                   settings):
    client = api(gateway, org_a)
    shown = gate(client, suffix="capitals")
    # 1. A wrecked adapter against the base model (no adapter of the family is deployed).
    worse = adapter_from_dir(org_a.organization, built["wrecked"], suffix="capitals",
                             base_model=default_model)
    # What the GPU worker does once a job of the family succeeded (this process plays it: it is
    # attached to the replica like one); the gate's runs go to the evals worker.
    settings.ENGINE_REPLICAS = {MODEL: [engine.url]}
    assert after_training(worse.id) == "evaluating"
    decision = decided(worse)
    assert decision.status == GateDecision.Status.REFUSED, decision.figures
    assert decision.incumbent == MODEL
    assert decision.figures["candidate"]["estimate"] < decision.figures["incumbent"]["estimate"]
    assert not Adapter.objects.get(pk=worse.pk).deployed
    assert any(m.startswith(f"Not deployed: {worse.name} is not better") for m in events(worse))
    # 2. The wrecked one serving the family (deployed by hand), and a clean candidate.
    Adapter.objects.filter(pk=worse.pk).update(deployed=True, deployed_at=timezone.now())
    better = adapter_from_dir(org_a.organization, built["clean"], suffix="capitals",
                              base_model=default_model)
    assert after_training(better.id) == "evaluating"
    decision = decided(better)
    assert decision.status == GateDecision.Status.DEPLOYED, decision.figures
    assert decision.incumbent == worse.name
    assert decision.figures["difference"] > 0
    wait_for(lambda: Adapter.objects.get(pk=better.pk).deployed, timeout=60,
             message="the better adapter to be deployed")
    assert any(m.startswith(f"Deploy gate passed, deploying {better.name}") for m in events(better))
    # The gate's decisions, as the API shows them.
    listed = client.get(f"/deploy_gates/{shown['id']}").json()["decisions"]
    assert [(d["adapter"], d["status"]) for d in listed] == [(better.name, "deployed"),
                                                             (worse.name, "refused")]
