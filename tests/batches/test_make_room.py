"""A batch makes room for the tenants' own requests as an eval run does (the same background
inference), and keeps it for TUNEPLEX_BATCH_INTERACTIVE_QUIET_SECONDS after the last one: a
person reads an answer before asking again, and a batch that filled the engines meanwhile would
be in flight beside their next request."""

from __future__ import annotations

import asyncio

import pytest

from tests.evals.test_make_room import admitted
from tuneplex.batches.executor import Execution
from tuneplex.batches.models import Batch
from tuneplex.inference import ratelimit

pytestmark = pytest.mark.django_db


def test_a_batch_keeps_to_one_request_beside_a_tenants_and_a_while_after(org_a, settings):
    settings.BATCH_CONCURRENCY, settings.BATCH_CONCURRENCY_BESIDE_INTERACTIVE = 8, 1
    settings.BATCH_INTERACTIVE_QUIET_SECONDS = 5
    batch = Batch.objects.create(organization=org_a.organization, input_file_id="file-x",
                                 endpoint="/v1/chat/completions", expires_at="2999-01-01T00:00:00Z")

    async def scenario() -> list[int]:
        requests = Execution(batch, attempt=1).requests
        requests.bases = {"base-x"}
        seen = [await requests.allowed()]  # nobody else: the whole concurrency
        chat = admitted("tenant-request")
        await ratelimit.interactive_begin(chat, "base-x")
        requests.interactive = (0.0, 0)  # count again now (it does every quarter second)
        seen.append(await requests.allowed())
        await ratelimit.finish(chat, 10)  # answered: the person reads it
        requests.interactive = (0.0, 0)
        seen.append(await requests.allowed())
        requests.interactive_seen -= 6  # ... for longer than the quiet period
        requests.interactive = (0.0, 0)
        seen.append(await requests.allowed())
        await ratelimit.close_loop_client()
        return seen

    assert asyncio.run(scenario()) == [8, 1, 1, 8]
