"""The gateway's limits, per request: one round trip to admit it, one to settle it.

Three limits, each 0 for unlimited:

- requests per API key (or signed-in user) per minute: a fixed one-minute window;
- tokens per organization per minute: a request reserves what it may cost (its prompt, estimated
  from its size, plus max_tokens x n x prompts) before it reaches the engine, and settles with the
  usage the engine reports when it ends, so an organization that saturates its budget is refused
  at the gateway (429) while the engine keeps serving the others;
- requests in flight per organization: members of a sorted set scored by start time, so the
  slots of a process that died free themselves after ``stale_after`` seconds.

With REDIS_URL the counters live in Redis, shared by every web process: :func:`admit` checks and
takes all three in one Lua script (atomic, one round trip), :func:`finish` settles the tokens and
frees the slot in another (once per request, however often it is retried). Both run on the event loop (redis' asyncio client), so a request
costs no thread hop here. Every key of an organization carries one hash tag (``{org:<id>}``), so
the script's keys lie in one slot of a Redis Cluster. On the embedded default the counters live
in this process, which is the only web process there.

When Redis cannot be reached, admission fails closed: :class:`LimitsUnavailable` (the gateway
answers 503 with Retry-After), since admitting without the shared counters would let every
process spend every budget. A settlement that cannot be written is kept and retried in the
background until it lands or its slot would have gone stale anyway, so a blink of Redis neither
refunds nor keeps a slot.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
import weakref
from dataclasses import dataclass

from django.conf import settings

log = logging.getLogger(__name__)

WINDOW = 60


class LimitsUnavailable(Exception):
    """The shared counters (Redis) cannot be reached: nothing may be admitted."""


@dataclass(frozen=True)
class Verdict:
    """The request limit's state for headers: ``limit`` 0 when there is none."""

    allowed: bool
    limit: int
    remaining: int
    reset_after: int  # seconds until the window ends


@dataclass(frozen=True)
class TokenVerdict:
    """The token budget's state for headers (``limit`` 0 when there is none) and the window the
    reservation was made in."""

    limit: int
    remaining: int
    reset_after: int
    window: int


@dataclass(frozen=True)
class Limits:
    """What one request asks for and the limits it is held to (0: unlimited)."""

    requester: str  # the key or user the request limit counts
    organization: str  # the subject of the token budget and the concurrency cap
    requests_per_minute: int
    tokens: int  # the reservation
    tokens_per_minute: int
    concurrency: int
    stale_after: float


@dataclass
class Admission:
    """The verdict on one request; ``refused_by`` is None when it was admitted, else which
    limit refused it ("requests", "tokens" or "concurrency"; nothing of it is held then)."""

    refused_by: str | None
    requests: Verdict
    tokens: TokenVerdict
    limits: Limits
    slot: str
    finished: bool = False
    interactive: str | None = None  # the base model, while counted as interactive in flight


REFUSALS = {1: "requests", 2: "tokens", 3: "concurrency"}

# KEYS: the key's request counter, the organization's token counter, its in-flight set.
# ARGV: request limit, tokens asked, token limit, concurrency limit, slot, now, stale before,
#       counter ttl, in-flight ttl.  Returns {refusal (0 = admitted), requests counted, tokens
#       counted for the organization before this request}.
_ADMIT = """
local requests, tokens, total = 0, tonumber(ARGV[2]), 0
if tonumber(ARGV[1]) > 0 then
  requests = redis.call('INCR', KEYS[1])
  redis.call('EXPIRE', KEYS[1], ARGV[8])
  if requests > tonumber(ARGV[1]) then return {1, requests, 0} end
end
if tonumber(ARGV[3]) > 0 then
  total = redis.call('INCRBY', KEYS[2], tokens)
  redis.call('EXPIRE', KEYS[2], ARGV[8])
  if total > tonumber(ARGV[3]) then
    redis.call('DECRBY', KEYS[2], tokens)
    return {2, requests, total - tokens}
  end
end
if tonumber(ARGV[4]) > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', ARGV[7])
  if redis.call('ZCARD', KEYS[3]) >= tonumber(ARGV[4]) then
    if tonumber(ARGV[3]) > 0 then redis.call('DECRBY', KEYS[2], tokens) end
    return {3, requests, total - tokens}
  end
  redis.call('ZADD', KEYS[3], ARGV[6], ARGV[5])
  redis.call('EXPIRE', KEYS[3], ARGV[9])
end
return {0, requests, total - tokens}
"""


def _prefix(limits: Limits) -> str:
    return "tuneplex:{" + limits.organization + "}"  # one Redis Cluster slot for the scripts' keys


def _keys(limits: Limits, window: int) -> tuple[str, str, str]:
    prefix = _prefix(limits)
    return (f"{prefix}:requests:{limits.requester}:{window}", f"{prefix}:tokens:{window}",
            f"{prefix}:inflight")


def _redis_errors() -> tuple[type[BaseException], ...]:
    import redis

    return (redis.RedisError, OSError, asyncio.TimeoutError)


async def admit(limits: Limits, *, now: float | None = None) -> Admission:
    """Count the request, reserve its tokens and take a concurrency slot, or none of these."""
    now = time.time() if now is None else now
    window = int(now // WINDOW)
    reset_after = int(WINDOW - now % WINDOW) + 1
    slot = uuid.uuid4().hex
    if limits.requests_per_minute <= 0 and limits.tokens_per_minute <= 0 and limits.concurrency <= 0:
        refusal, requests, before = 0, 0, 0  # nothing to count
    elif settings.REDIS_URL:
        keys = _keys(limits, window)
        _, script, _ = _async_redis(settings.REDIS_URL)
        try:
            refusal, requests, before = await script(keys=keys, args=[
                limits.requests_per_minute, limits.tokens, limits.tokens_per_minute,
                limits.concurrency, slot, now, now - limits.stale_after, WINDOW + 5,
                int(limits.stale_after) + 5])
        except _redis_errors() as exc:
            log.warning("admission: Redis cannot be reached (%s); refusing", type(exc).__name__)
            raise LimitsUnavailable() from None
    else:
        refusal, requests, before = _admit_in_memory(limits, window, slot, now)
    refused_by = REFUSALS.get(int(refusal))
    request_verdict = Verdict(refused_by != "requests", limits.requests_per_minute,
                              max(0, limits.requests_per_minute - int(requests)), reset_after)
    spent = int(before) + (limits.tokens if refused_by is None else 0)
    token_verdict = TokenVerdict(limits.tokens_per_minute,
                                 max(0, limits.tokens_per_minute - spent), reset_after, window)
    return Admission(refused_by, request_verdict, token_verdict, limits, slot,
                     finished=refused_by is not None)


async def finish(admission: Admission, actual_tokens: int) -> None:
    """Settle an admitted request's tokens with what the engine reported and free its slot (once).
    If Redis cannot take it now, the settlement is retried in the background (see module doc)."""
    if admission.finished:
        return
    admission.finished = True
    if admission.interactive is not None:
        await _interactive_end(admission)
    limits, window = admission.limits, admission.tokens.window
    delta = actual_tokens - limits.tokens if limits.tokens_per_minute > 0 else 0
    if not delta and limits.concurrency <= 0:
        return
    _, tokens_key, inflight_key = _keys(limits, window)
    if not settings.REDIS_URL:
        with _lock:
            if delta:
                _counters[tokens_key] = _counters.get(tokens_key, 0) + delta
            _slots.get(inflight_key, {}).pop(admission.slot, None)
        return
    settlement = _Settlement(tokens_key, delta, window, inflight_key,
                             f"{_prefix(limits)}:settled:{admission.slot}", admission.slot,
                             time.monotonic() + limits.stale_after)
    try:
        await settlement.write()
    except _redis_errors() as exc:
        log.warning("settling a request failed (%s); retrying in the background", type(exc).__name__)
        _retry_later(settlement)


@dataclass
class _Settlement:
    tokens_key: str
    delta: int
    window: int  # the budget window the tokens were reserved in
    inflight_key: str
    mark_key: str  # set once the settlement is written
    slot: str
    give_up_at: float  # monotonic: by then the slot has gone stale by itself

    async def write(self) -> None:
        """Once only, however often it is tried: an attempt that timed out here may still have
        reached Redis (its commands were sent), so the script marks the slot settled."""
        # A window that is over needs no settling (its counter expires with it); writing to it
        # would only leave a counter of the delta behind.
        delta = self.delta if self.window == int(time.time() // WINDOW) else 0
        _, _, settle = _async_redis(settings.REDIS_URL)
        await settle(keys=[self.tokens_key, self.inflight_key, self.mark_key],
                     args=[delta, self.slot, WINDOW + 5, WINDOW + 5])


_unsettled: list[_Settlement] = []
_retrier: asyncio.Task | None = None
RETRY_DELAYS = (0.2, 0.5, 1.0, 2.0, 5.0)  # then every 5 s


def _retry_later(settlement: _Settlement) -> None:
    global _retrier
    _unsettled.append(settlement)
    if _retrier is None or _retrier.done():
        _retrier = asyncio.get_running_loop().create_task(_retry_unsettled())


async def _retry_unsettled() -> None:
    attempt = 0
    while _unsettled:
        await asyncio.sleep(RETRY_DELAYS[min(attempt, len(RETRY_DELAYS) - 1)])
        attempt += 1
        for settlement in list(_unsettled):
            if time.monotonic() > settlement.give_up_at:
                log.error("a settlement of %+d tokens could not be written before its slot went "
                          "stale; dropped", settlement.delta)
                _unsettled.remove(settlement)
                continue
            try:
                await settlement.write()
            except _redis_errors():
                break  # still down: wait longer
            _unsettled.remove(settlement)
            attempt = 0


async def drain(timeout: float) -> None:
    """Wait (up to ``timeout`` seconds) for this loop's settlements still being retried: a loop
    made for one piece of work (an eval run) settles everything before it ends."""
    retrier = _retrier
    if retrier is None or retrier.done() or retrier.get_loop() is not asyncio.get_running_loop():
        return
    try:
        await asyncio.wait_for(asyncio.shield(retrier), timeout)
    except TimeoutError:
        log.error("%d settlements were still unwritten when their event loop ended", len(_unsettled))


async def close_loop_client() -> None:
    """Close this event loop's Redis client (before the loop ends)."""
    found = _clients.pop(asyncio.get_running_loop(), None)
    if found is not None:
        await found[0].aclose()


# --- interactive requests in flight, per base model ----------------------------------------------
# The tenants' own requests (not the platform's eval runs) being answered now, so that an eval
# run makes room for them (tuneplex.evals.executor). Advisory: a Redis error loses a count,
# never a request; an entry whose end was lost goes stale after the engine's timeout.

_interactive: dict[str, dict[str, float]] = {}  # without Redis: base model -> slot -> started


def _interactive_key(base_model: str) -> str:
    return "tuneplex:{interactive:" + base_model + "}:inflight"


async def interactive_begin(admission: Admission, base_model: str) -> None:
    admission.interactive = base_model
    now = time.time()
    if not settings.REDIS_URL:
        with _lock:
            _interactive.setdefault(base_model, {})[admission.slot] = now
        return
    client, _, _ = _async_redis(settings.REDIS_URL)
    key = _interactive_key(base_model)
    try:
        async with client.pipeline(transaction=False) as pipe:
            await pipe.zadd(key, {admission.slot: now}).expire(
                key, int(admission.limits.stale_after) + 5).execute()
    except _redis_errors() as exc:
        log.warning("counting an interactive request failed (%s)", type(exc).__name__)


async def _interactive_end(admission: Admission) -> None:
    base_model, admission.interactive = admission.interactive, None
    if not settings.REDIS_URL:
        with _lock:
            _interactive.get(base_model, {}).pop(admission.slot, None)
        return
    client, _, _ = _async_redis(settings.REDIS_URL)
    try:
        await asyncio.shield(client.zrem(_interactive_key(base_model), admission.slot))
    except _redis_errors() as exc:
        log.warning("uncounting an interactive request failed (%s)", type(exc).__name__)


async def interactive_in_flight(base_model: str, *, stale_after: float) -> int:
    """The tenants' requests for ``base_model`` being answered now (0 when Redis cannot tell)."""
    since = time.time() - stale_after
    if not settings.REDIS_URL:
        with _lock:
            return sum(1 for started in _interactive.get(base_model, {}).values() if started > since)
    client, _, _ = _async_redis(settings.REDIS_URL)
    try:
        return int(await client.zcount(_interactive_key(base_model), since, "+inf"))
    except _redis_errors():
        return 0


def unsettled() -> int:
    """Settlements of this process still waiting for Redis (for tests and metrics)."""
    return len(_unsettled)


async def hit(requester: str, organization: str, limit: int, *, now: float | None = None) -> Verdict:
    """Count one request of ``requester`` (of ``organization``) against its request limit only
    (for a request refused before its cost is known: a bad body, an unknown model)."""
    admission = await admit(Limits(requester, organization, limit, 0, 0, 0, 0), now=now)
    return admission.requests


# KEYS: the organization's token counter, its in-flight set, the slot's "settled" mark.
# ARGV: tokens to add (negative: given back), slot, counter ttl, mark ttl.
_SETTLE = """
if redis.call('SET', KEYS[3], '1', 'NX', 'EX', ARGV[4]) and tonumber(ARGV[1]) ~= 0 then
  redis.call('INCRBY', KEYS[1], ARGV[1])
  redis.call('EXPIRE', KEYS[1], ARGV[3])
end
redis.call('ZREM', KEYS[2], ARGV[2])
return 1
"""

# KEYS: the address's failure counter. ARGV: limit, ttl, count (1: count a failure, 0: only read).
_FAILURES = """
local failures = tonumber(redis.call('GET', KEYS[1]) or '0')
if tonumber(ARGV[3]) > 0 then
  failures = redis.call('INCR', KEYS[1])
  redis.call('EXPIRE', KEYS[1], ARGV[2])
end
return failures
"""


async def failed_authentications(address: str, limit: int, *, count: bool,
                                 now: float | None = None) -> Verdict:
    """The failed authentications of one client address this minute (one more if ``count``):
    ``allowed`` is False once there were ``limit`` of them (0: no limit)."""
    now = time.time() if now is None else now
    window = int(now // WINDOW)
    reset_after = int(WINDOW - now % WINDOW) + 1
    if limit <= 0:
        return Verdict(True, 0, 0, reset_after)
    key = f"tuneplex:{{auth:{address}}}:failures:{window}"
    if settings.REDIS_URL:
        client, _, _ = _async_redis(settings.REDIS_URL)
        try:
            failures = int(await client.eval(_FAILURES, 1, key, limit, WINDOW + 5, int(count)))
        except _redis_errors():
            raise LimitsUnavailable() from None
    else:
        with _lock:
            for stale in [k for k in _counters if not k.endswith(f":{window}")]:
                del _counters[stale]
            failures = _counters[key] = _counters.get(key, 0) + int(count)
    return Verdict(failures < limit, limit, max(0, limit - failures), reset_after)


# --- Redis ----------------------------------------------------------------------------------------

_clients: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # loop -> (client, scripts)


def _async_redis(url: str):
    """One asyncio client (and connection pool) per event loop of this process, with the
    admission and settlement scripts (run by EVALSHA; redis-py loads them again if the server
    lost them)."""
    import redis.asyncio

    loop = asyncio.get_running_loop()
    found = _clients.get(loop)
    if found is None:
        client = redis.asyncio.Redis.from_url(url, socket_timeout=2)
        found = _clients[loop] = (client, client.register_script(_ADMIT),
                                  client.register_script(_SETTLE))
    return found


# --- in this process (no REDIS_URL) ---------------------------------------------------------------

_lock = threading.Lock()
_counters: dict[str, int] = {}  # request and token counters of the current windows
_slots: dict[str, dict[str, float]] = {}  # in-flight set -> slot -> started


def _admit_in_memory(limits: Limits, window: int, slot: str, now: float) -> tuple[int, int, int]:
    requests_key, tokens_key, inflight_key = _keys(limits, window)
    with _lock:
        for stale in [k for k in _counters if not k.endswith(f":{window}")]:
            del _counters[stale]
        requests = 0
        if limits.requests_per_minute > 0:
            requests = _counters[requests_key] = _counters.get(requests_key, 0) + 1
            if requests > limits.requests_per_minute:
                return 1, requests, 0
        before = _counters.get(tokens_key, 0)
        if limits.tokens_per_minute > 0 and before + limits.tokens > limits.tokens_per_minute:
            return 2, requests, before
        if limits.concurrency > 0:
            held = _slots.setdefault(inflight_key, {})
            for old in [s for s, started in held.items() if started < now - limits.stale_after]:
                del held[old]
            if len(held) >= limits.concurrency:
                return 3, requests, before
            held[slot] = now
        if limits.tokens_per_minute > 0:
            _counters[tokens_key] = before + limits.tokens
        return 0, requests, before
