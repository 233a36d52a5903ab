"""The serving fleet in Redis: which replicas there are and what each holds, pushed by them.

Each replica's pool agent (``manage.py run_engine``) runs a :class:`Heartbeat`. It writes the
replica's entry (its address and its state: ready, slots, adapters loaded, the engine's URL) with
a time to live of three beats, renews it every ``TUNEPLEX_MEMBERSHIP_HEARTBEAT_SECONDS``, and
deletes it when the replica stops. Whenever the state changes (an adapter loaded or unloaded, the
engine down or up again: looked at ten times a second, in memory) it writes the entry at once and
publishes it on the fleet's channel. A replica that dies stops beating and its entry expires:
Redis's clock decides, so the nodes' clocks need not agree.

Gateways (``pools``) learn the changes from the channel as they happen (:class:`Watcher`, one
subscription per process) and read every entry of a base model once per heartbeat as the safety
net (:func:`entries`, one round trip whatever the number of replicas), which also drops the
replicas whose entry expired. Nothing here polls the replicas: the cost is one Redis read per
gateway process per beat and the changes themselves, not gateways × replicas requests a second.

The Redis is ``TUNEPLEX_FLEET_REDIS_URL`` (REDIS_URL by default; on engine nodes a user that may
touch these keys only). Keys and channel, under the fleet's name (``TUNEPLEX_SERVING_FLEET``):

    tuneplex:fleet:{fleet}:replicas:{base_model}        set of agent URLs ever registered
    tuneplex:fleet:{fleet}:replica:{base_model}:{url}   the live entry (JSON), expiring
    tuneplex:fleet:{fleet}:changes                      channel: an entry that changed, or left

A URL in the set whose entry has expired is removed by the next reader.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable

import redis
from django.conf import settings

log = logging.getLogger(__name__)

BEATS_TO_LIVE = 3  # an entry outlives two missed heartbeats
LOOK_EVERY = 0.1  # seconds between two looks at the replica's own state (in memory)


def _client() -> redis.Redis:
    return redis.Redis.from_url(settings.FLEET_REDIS_URL, socket_timeout=2, socket_connect_timeout=2)


def _prefix() -> str:
    return f"tuneplex:fleet:{settings.SERVING_FLEET}"


def _set_key(base_model: str) -> str:
    return f"{_prefix()}:replicas:{base_model}"


def _entry_key(base_model: str, url: str) -> str:
    return f"{_prefix()}:replica:{base_model}:{url}"


def channel() -> str:
    return f"{_prefix()}:changes"


def register(client: redis.Redis, base_model: str, url: str, *, ttl_seconds: float,
             state: dict | None = None, publish: bool = False) -> None:
    """Write the replica's entry (and, with ``publish``, tell the gateways at once)."""
    entry = json.dumps({"url": url, "base_model": base_model, "host": socket.gethostname(),
                        "pid": os.getpid(), "beat_at": time.time(), "state": state})
    with client.pipeline(transaction=False) as pipe:
        pipe.set(_entry_key(base_model, url), entry, px=int(ttl_seconds * 1000))
        pipe.sadd(_set_key(base_model), url)
        if publish:
            pipe.publish(channel(), entry)
        pipe.execute()


def leave(client: redis.Redis, base_model: str, url: str) -> None:
    with client.pipeline(transaction=False) as pipe:
        pipe.delete(_entry_key(base_model, url))
        pipe.srem(_set_key(base_model), url)
        pipe.publish(channel(), json.dumps({"url": url, "base_model": base_model, "left": True}))
        pipe.execute()


def entries(base_model: str, client: redis.Redis | None = None) -> dict[str, dict | None]:
    """The replicas of ``base_model`` registered now: agent URL -> its last state (None when it
    published none). Raises redis.RedisError (or OSError) when Redis does not answer: the
    caller keeps what it knew."""
    client = client or _shared_client()
    urls = sorted(url.decode() for url in client.smembers(_set_key(base_model)))
    if not urls:
        return {}
    raw = client.mget([_entry_key(base_model, url) for url in urls])
    gone = [url for url, entry in zip(urls, raw) if entry is None]
    if gone:
        client.srem(_set_key(base_model), *gone)
    return {url: json.loads(entry).get("state") for url, entry in zip(urls, raw) if entry is not None}


def members(base_model: str, client: redis.Redis | None = None) -> list[str]:
    """The agent URLs of the replicas of ``base_model`` registered now."""
    return list(entries(base_model, client))


_shared: dict[str, redis.Redis] = {}  # this process's client (and connection pool) per URL


def _shared_client() -> redis.Redis:
    client = _shared.get(settings.FLEET_REDIS_URL)
    if client is None:
        client = _shared[settings.FLEET_REDIS_URL] = _client()
    return client


def _routing_view(state: dict | None) -> tuple | None:
    """The part of a replica's state the gateways route by: a change in it is published."""
    if state is None:
        return None
    return (state.get("ready"), state.get("slots"), tuple(sorted(state.get("loaded", ()))),
            state.get("engine_url"))


class Heartbeat:
    """Keeps one replica registered until :meth:`stop`, which deregisters it, and publishes its
    state (``state()``, cheap and local) when what the gateways route by changes. A write that
    fails (Redis down) is logged once and tried again; the replica keeps serving the gateways
    that still know it."""

    def __init__(self, base_model: str, url: str, *, state: Callable[[], dict] | None = None,
                 every: float | None = None) -> None:
        self.base_model, self.url = base_model, url.rstrip("/")
        self.state = state or (lambda: None)
        self.every = every or settings.MEMBERSHIP_HEARTBEAT_SECONDS
        self.client = _client()
        self._stopped = threading.Event()
        self._failing = False
        self._published: tuple | None = None
        self._thread = threading.Thread(target=self._run, name="fleet-heartbeat", daemon=True)

    def start(self) -> Heartbeat:
        self._write(first=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        due = time.monotonic() + self.every
        while not self._stopped.wait(LOOK_EVERY):
            changed = _routing_view(self.state()) != self._published
            # While Redis does not answer, it is tried once a beat, not at every look.
            if (changed and not self._failing) or time.monotonic() >= due:
                self._write()
                due = time.monotonic() + self.every

    def _write(self, *, first: bool = False) -> None:
        state = self.state()
        view = _routing_view(state)
        try:
            register(self.client, self.base_model, self.url, state=state,
                     ttl_seconds=self.every * BEATS_TO_LIVE,
                     publish=first or view != self._published)
        except (redis.RedisError, OSError) as exc:
            if not self._failing:
                log.warning("could not register replica %s in the fleet (trying again): %s",
                            self.url, exc)
            self._failing = True
            return
        if first or self._failing:
            log.info("replica %s of %s is in fleet %s", self.url, self.base_model,
                     settings.SERVING_FLEET)
        self._failing = False
        self._published = view

    def stop(self) -> None:
        """Leave the fleet (once; again is nothing)."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        self._thread.join(timeout=5)
        try:
            leave(self.client, self.base_model, self.url)
        except (redis.RedisError, OSError) as exc:
            log.warning("could not deregister replica %s (it expires by itself): %s", self.url, exc)
        self.client.close()


class Watcher:
    """A gateway process's subscription to the fleet's changes: each message (a replica's new
    entry, or its leaving) goes to ``on_change(base_model, url, state)`` (state None: it left).
    Reconnects by itself; what it misses meanwhile the pools' periodic read catches up."""

    def __init__(self, on_change: Callable[[str, str, dict | None], None]) -> None:
        self.on_change = on_change
        self._stopped = threading.Event()
        self.subscribed = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fleet-watcher", daemon=True)

    def start(self) -> Watcher:
        self._thread.start()
        return self

    def _run(self) -> None:
        backoff = 0.5
        while not self._stopped.is_set():
            client = redis.Redis.from_url(settings.FLEET_REDIS_URL, socket_connect_timeout=2,
                                          health_check_interval=10)
            try:
                with client.pubsub(ignore_subscribe_messages=True) as pubsub:
                    pubsub.subscribe(channel())
                    self.subscribed.set()
                    backoff = 0.5
                    while not self._stopped.is_set():
                        message = pubsub.get_message(timeout=1.0)
                        if message is not None:
                            self._apply(message["data"])
            except (redis.RedisError, OSError) as exc:
                self.subscribed.clear()
                log.warning("fleet changes: subscription lost (%s); again in %.1f s", exc, backoff)
                self._stopped.wait(backoff)
                backoff = min(backoff * 2, 10.0)
            finally:
                client.close()

    def _apply(self, data: bytes) -> None:
        try:
            entry = json.loads(data)
            base, url = str(entry["base_model"]), str(entry["url"])
        except (ValueError, KeyError, TypeError):
            log.warning("fleet changes: a message that is not an entry, ignored")
            return
        state = None if entry.get("left") else (entry.get("state") or {})
        try:
            self.on_change(base, url, state)
        except Exception:  # noqa: BLE001 - one bad message must not end the subscription
            log.exception("fleet changes: applying %s of %s failed", url, base)

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join(timeout=5)
