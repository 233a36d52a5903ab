"""A pairwise run on the real replica: two models answer each item, a judge reads both answers
in both orders, and the run reports the first model's win rate with its interval, ties and
unreadable verdicts counted apart."""

from __future__ import annotations

import httpx
import pytest
from django.utils import timezone

from tests.conftest import MODEL, wait_for
from tests.fixtures.adapter_rows import adapter_from_dir
from tuneplex.adapters.models import Adapter

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

QUESTIONS = ["What is the capital of France?", "What is the capital of Italy?",
             "What is the capital of Spain?", "What is the capital of Germany?"]
JUDGE = [{"role": "user", "content": (
    "Question: {{item.question}}\nFirst answer: {{sample.first.output_text}}\n"
    "Second answer: {{sample.second.output_text}}\nWhich answer is better: first, second or tie?")}]


def test_a_pairwise_run_reports_a_win_rate_from_both_orders(gateway, gate_worker, org_a,
                                                             default_model, built):
    wrecked = adapter_from_dir(org_a.organization, built["wrecked"], suffix="pair",
                               base_model=default_model)
    Adapter.objects.filter(pk=wrecked.pk).update(deployed=True, deployed_at=timezone.now())
    client = httpx.Client(base_url=f"{gateway.url}/v1", timeout=60,
                          headers={"Authorization": f"Bearer {org_a.owner_key}"})
    made = client.post("/evals", json={"name": "base vs wrecked", "data_source_config": {
        "type": "custom", "item_schema": {"type": "object"}},
        "testing_criteria": [{"type": "json_check", "name": "unused", "input": "{}"}]})
    assert made.status_code == 200, made.text
    made = made.json()
    data_source = {
        "type": "pairwise", "models": [MODEL, wrecked.name],
        "input_messages": {"type": "template", "template": [
            {"role": "user", "content": "{{item.question}}"}]},
        "sampling_params": {"temperature": 0, "max_completion_tokens": 12},
        "judge": {"model": MODEL, "input": JUDGE, "sampling_params": {"max_completions_tokens": 16}},
        "source": {"type": "file_content", "content": [{"item": {"question": q}} for q in QUESTIONS]}}
    refused = client.post(f"/evals/{made['id']}/runs", json={
        "data_source": {**data_source, "models": [MODEL, MODEL]}})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "data_source.models"
    created = client.post(f"/evals/{made['id']}/runs", json={"data_source": data_source})
    assert created.status_code == 200, created.text
    run = created.json()
    done = wait_for(lambda: (lambda r: r if r["status"] not in ("queued", "in_progress") else None)(
        client.get(f"/evals/{made['id']}/runs/{run['id']}").json()), timeout=300, interval=1,
        message="the pairwise run to finish")
    assert done["status"] == "completed", done["error"]
    pairwise = done["statistics"]["pairwise"]
    assert pairwise["models"] == [MODEL, wrecked.name]
    assert pairwise["wins"] + pairwise["losses"] + pairwise["ties"] + pairwise["errored"] == 4
    rate = pairwise["win_rate"]
    if pairwise["wins"] + pairwise["losses"]:
        assert rate["low"] <= rate["estimate"] <= rate["high"]
    items = client.get(f"/evals/{made['id']}/runs/{run['id']}/output_items").json()["data"]
    assert len(items) == 4
    for item in items:
        result = item["results"][0]
        assert item["sample"]["model"] == MODEL and item["sample"]["compare"]["model"] == wrecked.name
        assert item["sample"]["output"] and item["sample"]["compare"]["output"]
        if result["error"] is None:
            # Two readings, one per order; a winner only where both agree.
            assert len(result["verdicts"]) == 2 and set(result["verdicts"]) <= {"first", "second", "tie"}
            expected = {("first", "second"): "a", ("second", "first"): "b"}.get(
                tuple(result["verdicts"]), "tie")
            assert result["winner"] == expected
            assert item["status"] == {"a": "pass", "b": "fail", "tie": "tie"}[expected]
        else:
            assert item["status"] == "error"
    usage = {u["model_name"]: u for u in done["per_model_usage"]}
    assert usage[wrecked.name]["invocation_count"] == 4
    assert usage[MODEL]["invocation_count"] == 4 + 2 * 4  # its answers and the judge's readings
