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
def _redis(url: str):
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
