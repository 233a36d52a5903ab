"""Which adapter is loaded on which vLLM replica, kept within each replica's slots.

The one small interface the gateway and the platform use: ``ensure_loaded`` (load lazily, evict
the least recently used unpinned adapter when a replica is full), ``deploy``/``undeploy`` (with
pinning), ``route``/``acquire``/``release`` (a replica that has the adapter, loading it if none
has; an acquired adapter is never evicted while its request runs), ``sync`` (the deployed set from the platform's database)
and ``reconcile`` (compare with each replica's ``/v1/models``: a replica that restarted has lost
its adapters, and the deployed ones are loaded again). Adapter names and paths come from
the platform (generated ids, paths confined under the artifact root); nothing here trusts a
tenant's input.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter, OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field

import httpx

log = logging.getLogger(__name__)


class AdapterLoadError(RuntimeError):
    """The engine refused an adapter (missing, corrupt, rank too high, wrong shapes)."""


class NoReplicaAvailable(RuntimeError):
    pass


@dataclass
class Replica:
    url: str
    loaded: OrderedDict[str, str] = field(default_factory=OrderedDict)  # name -> path, LRU first
    healthy: bool = True


class LoraPool:
    def __init__(self, replica_urls: list[str], *, slots: int,
                 client: httpx.Client | None = None, timeout: float = 60.0) -> None:
        if not replica_urls:
            raise ValueError("a pool needs at least one replica")
        self.replicas = [Replica(url.rstrip("/")) for url in replica_urls]
        self.slots = slots
        self.client = client or httpx.Client(timeout=timeout)
        self.pinned: set[str] = set()
        self.wanted: dict[str, str] = {}  # deployed adapters: name -> path
        self.in_flight: Counter[str] = Counter()  # requests running per adapter: never evicted
        self._flight_lock = threading.Lock()  # never held across I/O: release() must not wait
        self._turn = -1
        self._lock = threading.RLock()

    # --- queries ------------------------------------------------------------------------------

    def loaded_on(self, name: str) -> list[str]:
        return [r.url for r in self.replicas if name in r.loaded]

    def engine_adapters(self, replica: Replica) -> dict[str, str]:
        """What the engine itself reports: LoRA name -> path (``root``)."""
        response = self.client.get(f"{replica.url}/v1/models")
        response.raise_for_status()
        return {m["id"]: m.get("root", "") for m in response.json()["data"] if m.get("parent")}

    # --- deploy / undeploy ----------------------------------------------------------------------

    def deploy(self, name: str, path: str, *, pinned: bool = False) -> str:
        """Remember the adapter as wanted (pinned or not) and load it now; returns the replica URL."""
        with self._lock:
            url = self.ensure_loaded(name, path)
            self.wanted[name] = path
            if pinned:
                self.pinned.add(name)
            else:
                self.pinned.discard(name)
            return url

    def undeploy(self, name: str) -> None:
        with self._lock:
            self.wanted.pop(name, None)
            self.pinned.discard(name)
            self.unload(name)

    # --- loading ------------------------------------------------------------------------------

    def _touch(self, name: str) -> str | None:
        """The URL of a healthy replica that has ``name`` loaded (marked as just used), or None."""
        for replica in self.replicas:
            if name in replica.loaded and replica.healthy:
                replica.loaded.move_to_end(name)
                return replica.url
        return None

    def route(self, name: str, path: str | None = None) -> str:
        """A replica URL that has ``name`` loaded, loading it (lazily) if it is deployed.

        ``path`` marks the adapter as deployed (the platform's database says so) when this
        process's pool has not heard of it yet.
        """
        with self._lock:
            url = self._touch(name)
            if url is not None:
                return url
            if path is not None:
                self.wanted[name] = path
            if name not in self.wanted:
                raise KeyError(name)
            return self.ensure_loaded(name, self.wanted[name])

    def acquire(self, name: str, path: str | None = None) -> str:
        """``route`` for the length of one request: the adapter is not evicted until the matching
        :meth:`release`, which the gateway calls when the answer (or its stream) ends."""
        with self._lock:
            url = self.route(name, path)
            with self._flight_lock:
                self.in_flight[name] += 1
            return url

    def acquire_nowait(self, name: str) -> str | None:
        """:meth:`acquire` if ``name`` is loaded and nothing holds the pool; else None, at once."""
        if not self._lock.acquire(blocking=False):
            return None
        try:
            url = self._touch(name)
            if url is not None:
                with self._flight_lock:
                    self.in_flight[name] += 1
            return url
        finally:
            self._lock.release()

    def release(self, name: str) -> None:
        """Cheap and never blocked by a load in progress (called from the gateway's event loop)."""
        with self._flight_lock:
            self.in_flight[name] -= 1
            if self.in_flight[name] <= 0:
                del self.in_flight[name]

    def _busy(self) -> set[str]:
        with self._flight_lock:
            return set(self.in_flight)

    def any_replica(self) -> str:
        """A healthy replica for a base-model request, in turn (never waits on the pool's lock)."""
        with self._flight_lock:
            healthy = [r for r in self.replicas if r.healthy]
            if not healthy:
                raise NoReplicaAvailable("no healthy engine replica")
            self._turn = (self._turn + 1) % len(healthy)
            return healthy[self._turn].url

    def mark_unhealthy(self, url: str) -> None:
        """A replica did not answer: route around it until ``reconcile`` sees it again."""
        with self._lock:
            for replica in self.replicas:
                if replica.url == url.rstrip("/"):
                    replica.healthy = False

    def forget(self, url: str, name: str) -> None:
        """The engine at ``url`` no longer knows ``name`` (it restarted): drop our record of it."""
        with self._lock:
            for replica in self.replicas:
                if replica.url == url.rstrip("/"):
                    replica.loaded.pop(name, None)

    def ensure_loaded(self, name: str, path: str) -> str:
        with self._lock:
            url = self._touch(name)
            if url is not None:
                return url
            candidates = [r for r in self.replicas if r.healthy]
            if not candidates:
                raise NoReplicaAvailable("no healthy engine replica")
            replica = max(candidates, key=lambda r: self.slots - len(r.loaded))
            while len(replica.loaded) >= self.slots:
                self._evict_one(replica)
            self._load(replica, name, path)
            return replica.url

    def _evict_one(self, replica: Replica) -> None:
        busy = self._busy()
        victim = next((n for n in replica.loaded if n not in self.pinned and n not in busy), None)
        if victim is None:
            raise NoReplicaAvailable(f"all {self.slots} adapter slots of the engine are pinned or "
                                     f"serving requests; try again shortly")
        self._unload_from(replica, victim)
        log.info("evicted %s from %s (least recently used)", victim, replica.url)

    def _load(self, replica: Replica, name: str, path: str) -> None:
        response = self.client.post(f"{replica.url}/v1/load_lora_adapter",
                                    json={"lora_name": name, "lora_path": path})
        if response.status_code == 400 and "already" in response.text.lower():
            pass  # the engine has it (e.g. loaded by another process): adopt it
        elif response.status_code != 200:
            raise AdapterLoadError(_engine_message(response))
        replica.loaded[name] = path
        replica.loaded.move_to_end(name)

    def unload(self, name: str) -> None:
        with self._lock:
            for replica in self.replicas:
                if name in replica.loaded:
                    self._unload_from(replica, name)

    def _unload_from(self, replica: Replica, name: str) -> None:
        response = self.client.post(f"{replica.url}/v1/unload_lora_adapter",
                                    json={"lora_name": name})
        if response.status_code not in (200, 404):
            log.warning("unloading %s from %s: %s", name, replica.url, _engine_message(response))
        replica.loaded.pop(name, None)

    # --- reconciliation -----------------------------------------------------------------------

    def sync(self, deployed: Mapping[str, tuple[str, bool]]) -> None:
        """Take the deployed set (name -> (path, pinned)) from the platform; unload the rest.

        Several web processes may share the replicas: the database is the one record of what is
        deployed, and each process's pool follows it.
        """
        with self._lock:
            self.wanted = {name: path for name, (path, _) in deployed.items()}
            self.pinned = {name for name, (_, pinned) in deployed.items() if pinned}
            busy = self._busy()
            for replica in self.replicas:
                for name in [n for n in replica.loaded if n not in self.wanted and n not in busy]:
                    self._unload_from(replica, name)

    def preload(self) -> list[str]:
        """Load deployed adapters that no replica holds, into free slots only (never evicting)."""
        loaded = []
        with self._lock:
            for name, path in self.wanted.items():
                if any(name in r.loaded for r in self.replicas):
                    continue
                free = [r for r in self.replicas if r.healthy and len(r.loaded) < self.slots]
                if not free:
                    break
                try:
                    self._load(max(free, key=lambda r: self.slots - len(r.loaded)), name, path)
                    loaded.append(name)
                except (AdapterLoadError, httpx.HTTPError) as exc:
                    log.error("could not preload %s: %s", name, exc)
        return loaded

    def reconcile(self) -> dict[str, list[str]]:
        """Align our view with each replica's; reload deployed adapters a restart dropped.

        Returns, per replica URL, the adapters that had to be loaded again.
        """
        restored: dict[str, list[str]] = {}
        with self._lock:
            for replica in self.replicas:
                try:
                    actual = self.engine_adapters(replica)
                except httpx.HTTPError:
                    replica.healthy = False
                    continue
                replica.healthy = True
                lost = [n for n in replica.loaded if n not in actual]
                for name in lost:
                    replica.loaded.pop(name)
                for name, path in actual.items():
                    replica.loaded.setdefault(name, path)
                again = []
                for name in lost:
                    if name in self.wanted and not any(name in r.loaded for r in self.replicas):
                        try:
                            self._load(replica, name, self.wanted[name])
                            again.append(name)
                        except (AdapterLoadError, httpx.HTTPError) as exc:
                            log.error("could not reload %s on %s: %s", name, replica.url, exc)
                restored[replica.url] = again
        return restored


def _engine_message(response: httpx.Response) -> str:
    try:
        body = response.json()
        message = body.get("message") or body.get("error", {}).get("message") or body.get("detail")
    except (ValueError, AttributeError):
        message = None
    return f"engine answered {response.status_code}: {message or response.text[:500]}"
