"""An eval run makes room for the tenants' own requests: while one is being answered on the
engines the run uses, the run keeps at most TUNEPLEX_EVAL_CONCURRENCY_BESIDE_INTERACTIVE
requests in flight (counted in Redis by the gateway's admission, settled with the request)."""

from __future__ import annotations

import asyncio

import pytest

from tuneplex.evals.executor import Execution
from tuneplex.evals.models import Eval, EvalRun
from tuneplex.inference import ratelimit

pytestmark = pytest.mark.django_db


def admitted(slot: str) -> ratelimit.Admission:
    limits = ratelimit.Limits(requester="key:x", organization="org:x", requests_per_minute=0,
                              tokens=10, tokens_per_minute=0, concurrency=0, stale_after=60)
    return ratelimit.Admission(None, ratelimit.Verdict(True, 0, 0, 0),
                               ratelimit.TokenVerdict(0, 0, 0, 0), limits, slot)


def test_an_eval_keeps_to_one_request_while_a_tenants_request_is_answered(org_a, settings):
    settings.EVAL_CONCURRENCY, settings.EVAL_CONCURRENCY_BESIDE_INTERACTIVE = 8, 1
    made = Eval.objects.create(organization=org_a.organization, data_source_config={},
                               testing_criteria=[])
    run = EvalRun.objects.create(organization=org_a.organization, eval=made, model="base-x",
                                 data_source={"type": "completions"}, items_blob="x")

    async def scenario() -> list[int]:
        requests = Execution(run, attempt=1).requests  # tuneplex.inference.background's
        requests.bases = {"base-x"}
        seen = [await requests.allowed()]  # nobody else: the whole concurrency
        chat = admitted("tenant-request")
        await ratelimit.interactive_begin(chat, "base-x")
        other = admitted("other-base")
        await ratelimit.interactive_begin(other, "base-y")  # another engine's: no matter
        requests.interactive = (0.0, 0)  # count again now (it does every quarter second)
        seen.append(await requests.allowed())
        await ratelimit.finish(chat, 10)  # answered and settled
        requests.interactive = (0.0, 0)
        seen.append(await requests.allowed())
        await ratelimit.finish(other, 10)
        await ratelimit.close_loop_client()
        return seen

    assert asyncio.run(scenario()) == [8, 1, 8]
