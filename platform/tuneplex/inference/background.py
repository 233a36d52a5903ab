"""Background inference: the platform's own requests on an organization's behalf (an eval run's
samples and judges, a batch's requests), made so that they never crowd out interactive traffic.

:class:`BackgroundRequests` sends each request through the gateway's own admission, routing and
settlement (:func:`tuneplex.inference.gateway.complete_inside`): as the organization, under its
token budget and concurrency cap, counted in its usage, at a lower engine priority than the
tenants' own requests. On top of that it makes room for them: at most ``concurrency`` requests
in flight, and only ``beside_interactive`` while tenants' requests are being answered on the
same engines (counted by the gateway's admission in Redis, read at most every quarter second).
A refusal for one of the organization's limits is waited out for as long as the gateway says;
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

    async def allowed(self) -> int:
        """How many requests may be in flight now: the pace's concurrency, or its
        ``beside_interactive`` while tenants' own requests are being answered on the same
        engines (counted at most every quarter second), and for its ``quiet`` seconds after."""
        counted_at, count = self.interactive
        if time.monotonic() - counted_at > 0.25:
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
                    await asyncio.wait_for(self.room.wait(), 0.25)
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
                reply = await complete_inside(self.inside, endpoint, body)
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


async def keep_alive(every: float, beat: Callable[[], Awaitable[str | None]]) -> str:
    """Beat every ``every`` seconds until a beat answers why the work must stop (canceled,
    taken over by another attempt, past its time); that answer."""
    while True:
        await asyncio.sleep(every)
        reason = await beat()
        if reason:
            return reason
