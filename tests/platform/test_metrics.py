"""/metrics on a web process: who may read it, and the platform state it reports."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import make_tenant
from tuneplex.asgi import application
from tuneplex.core.metrics import may_scrape

TOKEN = "t" * 32


@pytest.mark.parametrize("address,authorization,proxied,allowed", [
    ("127.0.0.1", None, False, True),
    ("::1", None, False, True),
    ("127.0.0.1", None, True, False),  # through a proxy: the client is somewhere else
    ("10.1.2.3", None, False, False),
    ("10.1.2.3", f"Bearer {TOKEN}", True, True),
    ("10.1.2.3", "Bearer " + "u" * 32, False, False),
    ("192.168.7.7", None, False, True),  # in TUNEPLEX_METRICS_NETWORKS below
    (None, None, False, False),
    ("not-an-address", None, False, False),
])
def test_only_the_monitoring_networks_or_the_token_may_scrape(settings, address, authorization,
                                                               proxied, allowed):
    import ipaddress

    settings.METRICS_TOKEN = TOKEN
    settings.METRICS_NETWORKS = tuple(ipaddress.ip_network(n) for n in
                                      ("127.0.0.0/8", "::1/128", "192.168.7.0/24"))
    assert may_scrape(address, authorization, proxied=proxied) is allowed


def test_without_a_token_no_bearer_opens_it(settings):
    settings.METRICS_TOKEN = None
    assert may_scrape("10.1.2.3", "Bearer ", proxied=False) is False
    assert may_scrape("10.1.2.3", "Bearer None", proxied=False) is False


def _get(path: str, *, client: tuple[str, int], headers: dict | None = None,
         method: str = "GET") -> httpx.Response:
    async def call():
        transport = httpx.ASGITransport(app=application, client=client)
        async with httpx.AsyncClient(transport=transport, base_url="http://10.0.0.9:8000") as http:
            return await http.request(method, path, headers=headers)
    return asyncio.run(call())


def _samples(text: str) -> dict:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


@pytest.mark.django_db(transaction=True)
def test_the_web_endpoint_refuses_strangers_and_reports_the_state(settings):
    settings.METRICS_TOKEN = TOKEN
    settings.ORG_STORAGE_QUOTA = 1000
    tenant = make_tenant("Metrics")
    from tuneplex.files.models import File

    File.objects.create(organization=tenant.organization, filename="a.jsonl", purpose="fine-tune",
                        bytes=250, sha256="0" * 64, blob_name="metrics-test/a.jsonl")
    refused = _get("/metrics", client=("10.9.9.9", 5000))
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "permission_denied"
    assert _get("/metrics", client=("127.0.0.1", 5000), method="POST").status_code == 405
    # Not through Django: a scrape by address needs no ALLOWED_HOSTS entry.
    answer = _get("/metrics", client=("10.9.9.9", 5000), headers={"Authorization": f"Bearer {TOKEN}"})
    assert answer.status_code == 200, answer.text
    samples = _samples(answer.text)
    assert samples[("tuneplex_storage_bytes", ())] == 250
    assert samples[("tuneplex_storage_quota_ratio_max", ())] == 0.25
    assert samples[("tuneplex_jobs", (("state", "queued"),))] == 0
    assert not any(name == "tuneplex_organization_storage_bytes" for name, _ in samples)

    settings.METRICS_ORG_LABELS = True
    samples = _samples(_get("/metrics", client=("127.0.0.1", 5000)).text)
    org = tenant.organization.id
    assert samples[("tuneplex_organization_storage_bytes", (("organization", org),))] == 250
    assert samples[("tuneplex_organization_storage_quota_bytes", (("organization", org),))] == 1000


@pytest.mark.django_db(transaction=True)
def test_the_gpu_slots_and_the_gpu_workers_registered_are_reported(settings):
    from datetime import timedelta

    from django.db.models.functions import Now

    from tuneplex.finetuning.models import GpuWorker

    settings.GPU_SLOTS = None  # from membership: the live workers' GPUs
    for name, gpus, silent_for in (("gpu0@a", 2, 0), ("gpu1@a", 1, 0), ("gpu0@gone", 4, 3600)):
        GpuWorker.objects.create(name=name, node=name.split("@")[1], gpus=gpus, started_at=Now(),
                                 heartbeat_at=Now() - timedelta(seconds=silent_for))
    samples = _samples(_get("/metrics", client=("127.0.0.1", 5000)).text)
    assert samples[("tuneplex_gpu_slots", ())] == 3 and samples[("tuneplex_gpu_workers", ())] == 2
    settings.GPU_SLOTS = 8  # the operator's override: the workers are still shown
    samples = _samples(_get("/metrics", client=("127.0.0.1", 5000)).text)
    assert samples[("tuneplex_gpu_slots", ())] == 8 and samples[("tuneplex_gpu_workers", ())] == 2
