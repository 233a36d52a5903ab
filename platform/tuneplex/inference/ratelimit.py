"""Per-key request rate limit for the inference endpoints: a fixed one-minute window.

With REDIS_URL the counters live in Redis (shared by every web process: ``INCR`` + ``EXPIRE`` in
one round trip); on the embedded default they live in this process, which is the only web
process there.
"""

from __future__ import annotations

import functools
import threading
import time
from dataclasses import dataclass

from django.conf import settings

WINDOW = 60


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    limit: int
    remaining: int
    reset_after: int  # seconds until the window ends


_memory: dict[str, int] = {}
_memory_lock = threading.Lock()


@functools.cache
@functools.cache
def _redis(url: str):
    """One client (and connection pool) per process: a new client per call would open a TCP
    connection per call, several per request (redis-py's pool is thread-safe and fork-aware)."""
    import redis

    return redis.Redis.from_url(url, socket_timeout=2)


def hit(subject: str, limit: int) -> Verdict:
    """Count one request of ``subject`` (an API key id); ``limit`` 0 means unlimited."""
    if limit <= 0:
        return Verdict(True, 0, 0, 0)
    now = time.time()
    window = int(now // WINDOW)
    reset_after = int(WINDOW - now % WINDOW) + 1
    key = f"tuneplex:ratelimit:{subject}:{window}"
    if settings.REDIS_URL:
        with _redis(settings.REDIS_URL).pipeline(transaction=True) as pipe:
            count, _ = pipe.incr(key).expire(key, WINDOW + 5).execute()
    else:
        with _memory_lock:
            for stale in [k for k in _memory if not k.endswith(f":{window}")]:
                del _memory[stale]
            count = _memory[key] = _memory.get(key, 0) + 1
    return Verdict(count <= limit, limit, max(0, limit - count), reset_after)


# --- tokens and concurrency per organization --------------------------------------------------------
#
# Tokens: a fixed one-minute window per organization. A request reserves what it may cost
# (its prompt, estimated from its size, plus max_tokens x n x prompts) before it reaches the
# engine, and settles with the usage the engine reports when it ends, so an organization that
# saturates its budget is refused at the gateway (429) while the engine keeps serving the others.
# Concurrency: the organization's requests in flight, as members of a Redis sorted set scored by
# start time, so the slots of a process that died free themselves after ``stale_after`` seconds.


@dataclass(frozen=True)
class TokenVerdict:
    allowed: bool
    limit: int
    remaining: int
    reset_after: int
    window: int


def spend(subject: str, amount: int, limit: int, *, now: float | None = None) -> TokenVerdict:
    """Reserve ``amount`` tokens of ``subject``'s minute; refused (and not reserved) beyond ``limit``.
    ``limit`` 0 means unlimited."""
    now = time.time() if now is None else now
    window = int(now // WINDOW)
    reset_after = int(WINDOW - now % WINDOW) + 1
    if limit <= 0:
        return TokenVerdict(True, 0, 0, 0, window)
    key = f"tuneplex:tokens:{subject}:{window}"
    total = _add(key, amount)
    if total > limit:
        _add(key, -amount)
        return TokenVerdict(False, limit, max(0, limit - (total - amount)), reset_after, window)
    return TokenVerdict(True, limit, limit - total, reset_after, window)


def settle(subject: str, window: int, delta: int) -> None:
    """Correct a reservation made in ``window`` by ``delta`` tokens (actual - reserved)."""
    if delta:
        _add(f"tuneplex:tokens:{subject}:{window}", delta)


def _add(key: str, amount: int) -> int:
    if settings.REDIS_URL:
        with _redis(settings.REDIS_URL).pipeline(transaction=True) as pipe:
            total, _ = pipe.incrby(key, amount).expire(key, WINDOW + 5).execute()
        return int(total)
    with _memory_lock:
        window = key.rsplit(":", 1)[1]
        for stale in [k for k in _memory if k.startswith("tuneplex:tokens:")
                      and not k.endswith(f":{window}")]:
            del _memory[stale]
        _memory[key] = _memory.get(key, 0) + amount
        return _memory[key]


_slots: dict[str, dict[str, float]] = {}


def acquire_slot(subject: str, token: str, limit: int, *, stale_after: float) -> bool:
    """Take one of ``limit`` concurrent slots of ``subject`` for ``token``; 0 means unlimited."""
    if limit <= 0:
        return True
    now = time.time()
    if settings.REDIS_URL:
        key = f"tuneplex:inflight:{subject}"
        with _redis(settings.REDIS_URL).pipeline(transaction=True) as pipe:
            (pipe.zremrangebyscore(key, 0, now - stale_after).zadd(key, {token: now})
             .zcard(key).expire(key, int(stale_after) + 5))
            _, _, count, _ = pipe.execute()
        if count > limit:
            release_slot(subject, token)
            return False
        return True
    with _memory_lock:
        held = _slots.setdefault(subject, {})
        for old in [t for t, started in held.items() if started < now - stale_after]:
            del held[old]
        if len(held) >= limit:
            return False
        held[token] = now
        return True


def release_slot(subject: str, token: str) -> None:
    if settings.REDIS_URL:
        _redis(settings.REDIS_URL).zrem(f"tuneplex:inflight:{subject}", token)
        return
    with _memory_lock:
        _slots.get(subject, {}).pop(token, None)
