"""Background inference: the platform's own requests on an organization's behalf (an eval run's
samples and judges, a batch's requests), made so that they never crowd out interactive traffic.

:class:`BackgroundRequests` sends each request through the gateway's own admission, routing and
settlement (:func:`tuneplex.inference.gateway.complete_inside`): as the organization, under its
token budget and concurrency cap, counted in its usage, at a lower engine priority than the
tenants' own requests. On top of that it makes room for them: at most ``concurrency`` requests
in flight, and only ``beside_interactive`` while tenants' requests are being answered on the
same engines (counted by the gateway's admission in Redis, read at most every quarter second).
With the pace's ``preempt``, it also takes back what is already in flight: while a tenant's
request is being answered, the background requests sent last beyond ``beside_interactive`` are
stopped at the engine (the gateway settles the tokens they generated, counted against the
organization like any) and sent again once there is room. On a CPU engine a request shares
every decoding step with those beside it, so room made only for the next requests comes after
the tenant has waited through the ones in flight. A refusal for one of the organization's limits is waited out for as long as the gateway says;
an engine that does not answer is waited for up to ``engine_wait`` seconds, then
:class:`EngineGone` is raised.

:func:`keep_alive` is the heartbeat loop of such work: it beats until the beat says why to stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from django.conf import settings

from tuneplex.inference import ratelimit
from tuneplex.inference.gateway import Inside, complete_inside

# The organization's limits: waited out (the gateway says for how long), never the request's fault.
WAIT_CODES = {"rate_limit_exceeded", "token_budget_exceeded", "concurrency_limit_exceeded"}
UNAVAILABLE = {503}  # no replica, limits service down: waited for, not the request's fault


class EngineGone(Exception):
    """No engine answered for the pace's ``engine_wait`` seconds."""


@dataclass(frozen=True)
class Pace:
    """How hard background work may push: requests in flight at most, and while tenants' own
    requests are being answered on the same engines; how long an engine that does not answer is
    waited for, and the setting that says so (named in the error)."""

    concurrency: int
    beside_interactive: int
    engine_wait: float
    engine_wait_setting: str
    # How long ``beside_interactive`` still holds after the tenants' last request was seen: a
    # person reads an answer before asking again, and work that filled the engines meanwhile
    # would be in flight beside their next request.
    quiet: float = 0.0
    # Stop the requests in flight beyond ``beside_interactive`` when tenants' requests come
    # (their tokens are spent and counted) and send them again later. Not for work that must
    # reach an engine at most once (a batch's requests).
    preempt: bool = False


Hook = Callable[[], Awaitable[None]]


class BackgroundRequests:
    """One piece of background work's requests (one eval run's attempt, one batch's attempt)."""

    def __init__(self, inside: Inside, pace: Pace) -> None:
        self.inside, self.pace = inside, pace
        self.in_flight = 0
        self.room = asyncio.Condition()
        self.bases: set[str] = set()  # the base models whose engines the requests use
        self.interactive = (0.0, 0)  # (when counted, the tenants' requests in flight on them)
        self.interactive_seen = float("-inf")  # when some were last counted
        self.waiting_for = ""  # what the work waits for now, shown as its progress
        self.sent: dict[asyncio.Task, float] = {}  # requests at the engines → when sent
        self.preempted: set[asyncio.Task] = set()  # stopped to make room: sent again
        self.preemptions = 0  # how many times a request was stopped to make room

    @property
    def count_every(self) -> float:
        """How often the tenants' requests are counted: more often when the work gives back
        what is in flight for them, since each count is how soon it does."""
        return 0.1 if self.pace.preempt else 0.25

    async def allowed(self) -> int:
        """How many requests may be in flight now: the pace's concurrency, or its
        ``beside_interactive`` while tenants' own requests are being answered on the same
        engines (counted at most every quarter second), and for its ``quiet`` seconds after."""
        counted_at, count = self.interactive
        if time.monotonic() - counted_at > self.count_every:
            stale = settings.ENGINE_TIMEOUT + 60
            count = sum([await ratelimit.interactive_in_flight(base, stale_after=stale)
                         for base in self.bases])
            self.interactive = (time.monotonic(), count)
            if count:
                self.interactive_seen = time.monotonic()
        if count or time.monotonic() - self.interactive_seen < self.pace.quiet:
            return self.pace.beside_interactive
        return self.pace.concurrency

    @contextlib.asynccontextmanager
    async def slot(self):
        while True:
            allowed = await self.allowed()  # counted outside the condition's lock
            async with self.room:
                if self.in_flight < allowed:
                    self.in_flight += 1
                    break
                try:  # woken by a request that ends, or after a while to count again
                    await asyncio.wait_for(self.room.wait(), self.count_every)
                except TimeoutError:
                    pass
        try:
            yield
        finally:
            async with self.room:
                self.in_flight -= 1
                self.room.notify()

    async def call(self, endpoint: str, body: dict, *, sending: Hook | None = None,
                   held_back: Hook | None = None) -> tuple[int, dict]:
        """One plain completion of ``endpoint``: its status and JSON payload. Waits out the
        organization's limits and an engine that is down. ``sending`` is awaited in the
        request's slot right before each time it is sent; ``held_back`` when the gateway refused
        it for a limit before it reached an engine (it is sent again after the wait)."""
        down_since: float | None = None
        while True:
            async with self.slot():
                if sending is not None:
                    await sending()
                reply = await self._answer(endpoint, body)
            if reply is None:  # stopped at the engine to make room: sent again
                continue
            try:
                payload = json.loads(reply.body or b"{}")
            except ValueError:
                payload = {}
            code = (payload.get("error") or {}).get("code") if isinstance(payload, dict) else None
            if reply.status == 429 and code in WAIT_CODES:
                if held_back is not None:
                    await held_back()
                self.waiting_for = "the organization's inference limits"
                await asyncio.sleep(min(float(reply.headers.get("Retry-After") or 1), 30))
                continue
            if reply.status in UNAVAILABLE:
                down_since = down_since or time.monotonic()
                if time.monotonic() - down_since > self.pace.engine_wait:
                    raise EngineGone(f"No engine answered for {self.pace.engine_wait:g} s "
                                     f"({self.pace.engine_wait_setting}): "
                                     f"{(payload.get('error') or {}).get('message', '')}")
                self.waiting_for = "an engine replica"
                await asyncio.sleep(2)
                continue
            self.waiting_for = ""
            return reply.status, payload


    async def _answer(self, endpoint: str, body: dict):
        """The gateway's reply, or None when the request was stopped to make room."""
        task = asyncio.ensure_future(complete_inside(self.inside, endpoint, body))
        self.sent[task] = time.monotonic()
        try:
            while self.pace.preempt and not task.done():  # watched only when it may be stopped
                await asyncio.wait({task}, timeout=self.count_every)
                if not task.done():
                    await self._make_room()
            if task in self.preempted and task.cancelled():
                return None
            return await task
        finally:
            del self.sent[task]
            self.preempted.discard(task)
            if not task.done():  # the caller was cancelled: so is its request
                task.cancel()

    async def _make_room(self) -> None:
        """Stop the requests sent last beyond what may be in flight beside tenants' requests."""
        allowed = await self.allowed()
        running = [task for task in self.sent if task not in self.preempted and not task.done()]
        if len(running) <= allowed:
            return
        for task in sorted(running, key=self.sent.__getitem__)[allowed:]:
            self.preempted.add(task)
            self.preemptions += 1
            task.cancel()  # the gateway closes the engine's connection: the engine aborts it


async def keep_alive(every: float, beat: Callable[[], Awaitable[str | None]]) -> str:
    """Beat every ``every`` seconds until a beat answers why the work must stop (canceled,
    taken over by another attempt, past its time); that answer."""
    while True:
        await asyncio.sleep(every)
        reason = await beat()
        if reason:
            return reason
