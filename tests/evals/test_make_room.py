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


class StandInGateway:
    """complete_inside in place of the gateway: each request runs until released, and says when
    it was started and when it was stopped (cancelled: the gateway aborts it at the engine)."""

    def __init__(self) -> None:
        self.started: list[int] = []
        self.stopped: list[int] = []
        self.release = asyncio.Event()

    async def __call__(self, inside, endpoint, body):
        from tuneplex.inference.gateway import Reply

        self.started.append(body["n"])
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.stopped.append(body["n"])
            raise
        return Reply(200, {}, b'{"n": %d}' % body["n"])


async def _until(predicate, timeout: float = 10) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


@pytest.mark.parametrize("preempt", [True, False])
def test_a_tenants_request_takes_back_the_eval_requests_in_flight_beyond_one(
        org_a, settings, monkeypatch, preempt):
    """With TUNEPLEX_EVAL_PREEMPT, the run's requests sent last beyond one are stopped as soon as
    a tenant's request is counted, and sent again once it is answered; without it (the control)
    they run on beside it."""
    from tuneplex.inference import background

    settings.EVAL_CONCURRENCY, settings.EVAL_CONCURRENCY_BESIDE_INTERACTIVE = 4, 1
    settings.EVAL_PREEMPT = preempt
    gateway = StandInGateway()
    monkeypatch.setattr(background, "complete_inside", gateway)
    made = Eval.objects.create(organization=org_a.organization, data_source_config={},
                               testing_criteria=[])
    run = EvalRun.objects.create(organization=org_a.organization, eval=made, model="base-x",
                                 data_source={"type": "completions"}, items_blob="x")

    async def scenario():
        requests = Execution(run, attempt=1).requests
        requests.bases = {"base-x"}
        calls = [asyncio.create_task(requests.call("chat", {"n": n})) for n in range(4)]
        await _until(lambda: len(gateway.started) == 4)
        chat = admitted("tenant-request")
        await ratelimit.interactive_begin(chat, "base-x")
        try:
            requests.interactive = (0.0, 0)  # counted again now: one beside it
            assert await requests.allowed() == 1
            if preempt:
                await _until(lambda: len(gateway.stopped) == 3)
            else:  # given the time the above takes many times over, nothing was stopped
                await asyncio.sleep(5 * requests.count_every)
            in_flight_beside = len(gateway.started) - len(gateway.stopped)
        finally:
            await ratelimit.finish(chat, 10)  # never left counted for the next test
        gateway.release.set()
        replies = await asyncio.gather(*calls)
        await ratelimit.close_loop_client()
        return in_flight_beside, replies, requests.preemptions

    in_flight_beside, replies, preemptions = asyncio.run(scenario())
    assert [payload["n"] for _, payload in replies] == [0, 1, 2, 3]  # every request answered once
    if preempt:
        assert in_flight_beside == 1 and preemptions == 3
        assert sorted(gateway.stopped) == [1, 2, 3]  # the ones sent last, not the first
        assert sorted(gateway.started) == [0, 1, 1, 2, 2, 3, 3]  # each stopped one sent again
    else:
        assert in_flight_beside == 4 and preemptions == 0 and gateway.stopped == []
