"""The residency authority of one vLLM replica: which adapters it holds, and which are leased.

Design: **a pool agent beside each replica** (``serving/agent.py``, run by ``manage.py
run_engine`` in the same process that supervises the engine). Of the two candidates (this, or
pool state and leases in Redis) it is the one that needs no shared disk and no shared server:

- staging must happen on the replica's own node (vLLM reads ``lora_path`` from its local disk),
  so something must run there anyway; the agent is that thing, and it is also the only writer of
  its replica's slots, so "which adapter is loaded where" has exactly one owner per replica and
  needs no distributed lock;
- the embedded default has no Redis: an agent works the same on one machine (SQLite, filesystem
  broker) as on many;
- a restarted engine is noticed by the process that restarted it, which loads its adapters again.

Gateways (any number, on any node) ask the agent for a **lease** on an adapter: the agent loads
it if needed (evicting the least recently used adapter that is neither pinned nor leased) and
answers with a lease id. A leased adapter is never evicted or unloaded. A gateway holds one lease
per adapter while its requests on it run, renews it every few seconds and releases it when idle;
a lease that is not renewed expires after ``lease_seconds``, so a gateway that died pins nothing.

Rules kept here: the lock guards only in-memory decisions; staging (artifact storage) and every
call to the engine happen outside it, with the adapter marked as *loading* or *unloading* so
that concurrent requests for it wait for the outcome instead of doing the work twice. No Django:
the platform passes in ``stage`` (adapter id -> local path, validated) and the deployed set.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import httpx

from serving.engine import auth_headers

log = logging.getLogger(__name__)


class AdapterLoadError(RuntimeError):
    """The adapter cannot be served: staging/validation refused it, or the engine did."""

    def __init__(self, message: str, code: str = "adapter_load_failed") -> None:
        super().__init__(message)
        self.code = code


class NoReplicaAvailable(RuntimeError):
    """No replica can take the request now (down, or every slot pinned or leased)."""


class SlotsBusy(NoReplicaAvailable):
    pass


class EngineDown(NoReplicaAvailable):
    pass


@dataclass
class Lease:
    id: str
    adapter: str
    holder: str
    expires: float  # time.monotonic()


class EngineClient:
    """The engine's runtime LoRA API, with the install's key."""

    def __init__(self, url: str, api_key: str, timeout: float = 60.0) -> None:
        self.url = url.rstrip("/")
        self.client = httpx.Client(timeout=timeout, headers=auth_headers(api_key))

    def adapters(self) -> dict[str, str]:
        """LoRA name -> path (``root``), as the engine reports them."""
        response = self.client.get(f"{self.url}/v1/models", timeout=5)
        response.raise_for_status()
        return {m["id"]: m.get("root", "") for m in response.json()["data"] if m.get("parent")}

    def load(self, name: str, path: str) -> None:
        response = self.client.post(f"{self.url}/v1/load_lora_adapter",
                                    json={"lora_name": name, "lora_path": path})
        if response.status_code == 400 and "already" in response.text.lower():
            return  # the engine has it: adopt it
        if response.status_code != 200:
            raise AdapterLoadError(_engine_message(response))

    def unload(self, name: str) -> None:
        response = self.client.post(f"{self.url}/v1/unload_lora_adapter", json={"lora_name": name})
        if response.status_code not in (200, 404):
            log.warning("unloading %s: %s", name, _engine_message(response))

    def close(self) -> None:
        self.client.close()


Stage = Callable[[str, str], str]  # (adapter id, name) -> local path; raises AdapterLoadError


class ReplicaPool:
    """Slots, LRU order, pins and leases of one replica; the only code that loads or unloads."""

    def __init__(self, engine: EngineClient, *, slots: int, stage: Stage,
                 lease_seconds: float = 15.0, wait_seconds: float = 30.0,
                 on_load: Callable[[float, bool], None] | None = None) -> None:
        """``on_load(seconds, ok)`` is told each load's duration (staging included) and outcome,
        outside the lock (the platform records it as a metric)."""
        self.engine = engine
        self.slots = slots
        self.stage_adapter = stage
        self.lease_seconds = lease_seconds
        self.wait_seconds = wait_seconds  # how long an acquire waits for a slot to be released
        self.ready = False  # the engine answers; set by the process that runs it
        self.loaded: OrderedDict[str, str] = OrderedDict()  # name -> path, least recently used first
        self.pinned: set[str] = set()
        self.leases: dict[str, Lease] = {}
        self._loading: dict[str, threading.Event] = {}
        self._unloading: dict[str, threading.Event] = {}
        self._retired: set[str] = set()  # undeployed while leased: unloaded at the last release
        self.evictions = 0
        self.loads = 0
        self.load_failures = 0
        self.on_load = on_load
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # a lease ended or a slot came free

    # --- queries (no I/O) ---------------------------------------------------------------------

    def state(self) -> dict:
        with self._lock:
            self._expire()
            return {"ready": self.ready, "slots": self.slots, "loaded": list(self.loaded),
                    "loading": list(self._loading), "pinned": sorted(self.pinned),
                    "leased": sorted(self._leased()), "evictions": self.evictions,
                    "loads": self.loads, "load_failures": self.load_failures}

    def _leased(self) -> set[str]:
        return {lease.adapter for lease in self.leases.values()}

    def _expire(self) -> None:
        now = time.monotonic()
        gone = [key for key, lease in self.leases.items() if lease.expires < now]
        for key in gone:
            log.warning("lease %s on %s expired (holder %s stopped renewing)", key,
                        self.leases[key].adapter, self.leases[key].holder)
            del self.leases[key]
        if gone:
            self._changed.notify_all()

    def _new_lease(self, name: str, holder: str) -> Lease:
        lease = Lease(secrets.token_hex(8), name, holder, time.monotonic() + self.lease_seconds)
        self.leases[lease.id] = lease
        self.loaded.move_to_end(name)
        return lease

    # --- leases -------------------------------------------------------------------------------

    def acquire(self, name: str, adapter_id: str, holder: str, wait: float | None = None) -> Lease:
        """A lease on ``name``, loading it first if this replica does not hold it; waits up to
        ``wait`` seconds (at most ``wait_seconds``) for a slot when every one is pinned or leased."""
        wait = self.wait_seconds if wait is None else max(0.0, min(wait, self.wait_seconds))
        deadline = time.monotonic() + wait
        with self._lock:
            while True:
                self._expire()
                if not self.ready:
                    raise EngineDown("the engine of this replica is not running")
                if name in self.loaded:
                    self._retired.discard(name)
                    return self._new_lease(name, holder)
                busy = self._loading.get(name) or self._unloading.get(name)
                if busy is None:
                    victim = self._make_room()
                    if victim is not False:
                        break
                    busy = None  # every slot pinned, leased or changing: wait for a release
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise SlotsBusy(f"all {self.slots} adapter slots of this replica are pinned "
                                    f"or serving requests")
                if busy is not None:
                    self._lock.release()
                    try:
                        busy.wait(remaining)
                    finally:
                        self._lock.acquire()
                else:
                    self._changed.wait(remaining)
            done = self._loading[name] = threading.Event()
        return self._load(name, adapter_id, holder, victim, done)

    def _make_room(self) -> str | None | bool:
        """Under the lock: None if a slot is free, the name of the adapter to evict (now marked
        unloading), or False when nothing can be evicted."""
        if len(self.loaded) + len(self._loading) < self.slots:
            return None
        leased = self._leased()
        victim = next((n for n in self.loaded if n not in self.pinned and n not in leased), None)
        if victim is None:
            return False
        del self.loaded[victim]
        self._unloading[victim] = threading.Event()
        self.evictions += 1
        return victim

    def _load(self, name: str, adapter_id: str, holder: str, victim: str | None,
              done: threading.Event) -> Lease:
        try:
            if victim is not None:
                self._unload_now(victim)
                log.info("evicted %s (least recently used) for %s", victim, name)
            started = time.monotonic()
            path = self.stage_adapter(adapter_id, name)
            self.engine.load(name, path)
        except BaseException:
            with self._lock:
                del self._loading[name]
                self.load_failures += 1
                self._changed.notify_all()
            done.set()
            self._observe_load(0.0, ok=False)
            raise
        with self._lock:
            del self._loading[name]
            self.loaded[name] = path
            self.loads += 1
            lease = self._new_lease(name, holder)
            self._changed.notify_all()
        done.set()
        self._observe_load(time.monotonic() - started, ok=True)
        return lease

    def _observe_load(self, seconds: float, *, ok: bool) -> None:
        if self.on_load is not None:
            try:
                self.on_load(seconds, ok)
            except Exception:  # noqa: BLE001 - bookkeeping must never fail a load
                log.exception("load observer failed")

    def _unload_now(self, name: str) -> None:
        """``name`` is marked unloading (out of ``loaded``): tell the engine, then clear the mark."""
        try:
            self.engine.unload(name)
        except httpx.HTTPError as exc:  # a dead engine has lost it anyway
            log.warning("unloading %s reached no engine: %s", name, exc)
        finally:
            with self._lock:
                self._unloading.pop(name).set()
                self._changed.notify_all()

    def stage(self, adapter_id: str, name: str) -> str:
        """Stage and validate without loading (a deploy while every slot is busy)."""
        return self.stage_adapter(adapter_id, name)

    def renew(self, lease_ids: list[str]) -> list[str]:
        """Extend the leases; returns the ids this replica does not know (expired, or lost in an
        engine restart): their holder must acquire again."""
        with self._lock:
            self._expire()
            expires = time.monotonic() + self.lease_seconds
            unknown = []
            for key in lease_ids:
                lease = self.leases.get(key)
                if lease is None:
                    unknown.append(key)
                else:
                    lease.expires = expires
            return unknown

    def release(self, lease_ids: list[str]) -> None:
        with self._lock:
            for key in lease_ids:
                self.leases.pop(key, None)
            retire = self._retirable()
            self._changed.notify_all()
        for name in retire:
            self._unload_now(name)

    def _retirable(self) -> list[str]:
        """Under the lock: retired adapters no lease holds any more, marked unloading."""
        leased = self._leased()
        names = [n for n in self._retired if n not in leased and n in self.loaded]
        for name in names:
            self._retired.discard(name)
            del self.loaded[name]
            self._unloading[name] = threading.Event()
        return names

    # --- deploy state -------------------------------------------------------------------------

    def unload(self, name: str) -> bool:
        """Undeployed: unload now, or at the last release if a lease holds it. True if unloaded."""
        with self._lock:
            if name not in self.loaded:
                return False
            self._retired.add(name)
            retire = self._retirable()
        for victim in retire:
            self._unload_now(victim)
        return bool(retire)

    def reconcile(self, deployed: Mapping[str, tuple[str, bool]]) -> dict[str, list[str]]:
        """Follow the platform's deployed set (name -> (adapter id, pinned)) and the engine's view.

        Unloads adapters no longer deployed (once no lease holds them), forgets adapters the
        engine lost (it restarted), adopts deployed ones it has that we did not know, then loads
        pinned adapters (evicting if needed) and other deployed ones into free slots only.
        """
        with self._lock:
            self.pinned = {name for name, (_, pinned) in deployed.items() if pinned}
            # A leased adapter missing from the set may be one being deployed right now (loaded,
            # its row not yet committed): only an explicit unload retires a leased adapter.
            leased = self._leased()
            self._retired |= {n for n in self.loaded if n not in deployed and n not in leased}
            retire = self._retirable()
        for name in retire:
            self._unload_now(name)
        actual = self.engine.adapters()  # raises when the engine does not answer
        stray = []
        with self._lock:
            for name in [n for n in self.loaded if n not in actual]:
                del self.loaded[name]
            for name, path in actual.items():
                if name in self.loaded or name in self._loading or name in self._unloading:
                    continue
                if name in deployed and len(self.loaded) + len(self._loading) < self.slots:
                    self.loaded[name] = path
                    self.loaded.move_to_end(name, last=False)
                else:
                    stray.append(name)
        for name in stray:
            self.engine.unload(name)
        loaded = []
        order = sorted(deployed.items(), key=lambda item: not item[1][1])  # pinned first
        for name, (adapter_id, pinned) in order:
            with self._lock:
                if name in self.loaded or name in self._loading:
                    continue
                full = len(self.loaded) + len(self._loading) >= self.slots
            if full and not pinned:
                continue
            try:
                lease = self.acquire(name, adapter_id, holder="reconcile")
            except (AdapterLoadError, NoReplicaAvailable, httpx.HTTPError) as exc:
                log.error("could not load deployed adapter %s: %s", name, exc)
                continue
            self.release([lease.id])
            loaded.append(name)
        return {"unloaded": retire + stray, "loaded": loaded}

    def engine_started(self) -> None:
        with self._lock:
            self.ready = True
            self._changed.notify_all()

    def engine_stopped(self) -> None:
        """The engine died: it lost every adapter, and leases on it mean nothing any more."""
        with self._lock:
            self.ready = False
            self.loaded.clear()
            self.leases.clear()
            self._retired.clear()
            self._changed.notify_all()


def _engine_message(response: httpx.Response) -> str:
    try:
        body = response.json()
        message = body.get("message") or body.get("error", {}).get("message") or body.get("detail")
    except (ValueError, AttributeError):
        message = None
    return f"engine answered {response.status_code}: {message or response.text[:500]}"
