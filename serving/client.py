"""A gateway's side of the pool: routing to replicas through their pool agents.

Each gateway process keeps, per served base model, a :class:`PoolClient`: what every replica's
agent last said (up or down, which adapters it holds) and the leases this process holds. The
request path never does I/O under a lock and, for an adapter this process already leases, no
I/O at all: ``acquire_nowait`` counts the request against the held lease. Otherwise ``acquire``
(in a worker thread) asks the agents, preferring a replica that already holds the adapter.

A maintenance thread (``run``) renews held leases well before they expire, hands back a lease
as soon as this process's last request on it ends (the request path only queues it), so that no
slot stays pinned by an idle gateway, and looks at the replicas: in a fleet, it reads the
membership and the states the replicas published once per heartbeat (their changes in between
arrive through :meth:`PoolClient.apply_state`); with a fixed list, it asks every agent each
second. A replica whose engine or agent does not answer is marked down at once and routed around
until it reports itself ready again.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx

from serving.engine import auth_headers
from serving.pool import AdapterLoadError, NoReplicaAvailable, SlotsBusy

log = logging.getLogger(__name__)


@dataclass
class ReplicaView:
    agent_url: str
    engine_url: str = ""
    up: bool = False
    loaded: frozenset[str] = frozenset()
    slots: int = 0
    in_flight: int = 0  # this process's requests on it
    reason: str = "not asked yet"


@dataclass
class HeldLease:
    replica: ReplicaView
    adapter: str
    ids: list[str] = field(default_factory=list)
    count: int = 0  # this process's requests on it now


@dataclass(frozen=True)
class Route:
    """Where one request goes; hand it back to :meth:`PoolClient.release` when it ends."""

    engine_url: str
    replica: ReplicaView
    held: HeldLease | None


class PoolClient:
    def __init__(self, agent_urls: list[str], *, api_key: str, slots: int,
                 lease_seconds: float = 15.0, timeout: float = 60.0,
                 fleet: Callable[[], dict[str, dict | None]] | None = None,
                 resync_every: float = 1.0) -> None:
        """``agent_urls``: the replicas always in the pool. ``fleet``: where the replicas that
        joined are read, with the state each published (agent URL -> state, or None when it
        published none: that one is asked over HTTP), every ``resync_every`` seconds; changes in
        between come by :meth:`apply_state`. Without ``fleet`` every agent is asked each second."""
        if not agent_urls and fleet is None:
            raise ValueError("a pool needs at least one replica, or a fleet to find them in")
        self.fixed = {url.rstrip("/") for url in agent_urls}
        self.fleet = fleet
        self.resync_every = resync_every if fleet is not None else 1.0
        self.replicas = [ReplicaView(url.rstrip("/")) for url in agent_urls]
        self.slots = slots  # per replica; the pin limit is half of it
        self.holder = f"gateway-{uuid.uuid4().hex[:12]}"
        self.renew_every = max(1.0, lease_seconds / 3)
        self.client = httpx.Client(timeout=timeout, headers=auth_headers(api_key))
        self.held: dict[tuple[str, str], HeldLease] = {}
        self._lock = threading.Lock()
        self._turn = itertools.count()
        self._last_renew = 0.0
        self._last_refresh = 0.0
        self._to_release: dict[str, list[str]] = {}  # agent URL -> lease ids, sent by the thread
        self._wake = threading.Event()
        self._closed = threading.Event()
        self.refreshed = threading.Event()  # set after the first look at every agent

    # --- the request path ---------------------------------------------------------------------

    def any_replica(self) -> Route:
        """A replica that is up, for a base-model request (the least busy of this process's)."""
        with self._lock:
            up = [r for r in self.replicas if r.up]
            if not up:
                raise NoReplicaAvailable("no engine replica is up")
            turn = next(self._turn)
            replica = min(up, key=lambda r: (r.in_flight, (self.replicas.index(r) - turn) % len(self.replicas)))
            replica.in_flight += 1
            return Route(replica.engine_url, replica, None)

    def acquire_nowait(self, adapter: str) -> Route | None:
        """A route on a lease this process holds already, or None (then call :meth:`acquire`)."""
        with self._lock:
            return self._reuse(adapter)

    def _reuse(self, adapter: str) -> Route | None:
        best = None
        for replica in self.replicas:
            held = self.held.get((replica.agent_url, adapter))
            if held is not None and held.ids and replica.up and (
                    best is None or replica.in_flight < best.replica.in_flight):
                best = held
        if best is None:
            return None
        best.count += 1
        best.replica.in_flight += 1
        return Route(best.replica.engine_url, best.replica, best)

    def acquire(self, adapter: str, adapter_id: str, wait: float | None = None) -> Route:
        """Lease ``adapter`` on a replica (loading it there if none holds it; each agent waits up
        to ``wait`` seconds, or its own limit, for a slot to come free). Blocking I/O."""
        self.ensure_fresh()
        with self._lock:
            route = self._reuse(adapter)
            if route is not None:
                return route
            candidates = sorted((r for r in self.replicas if r.up),
                                key=lambda r: (adapter not in r.loaded, -(r.slots - len(r.loaded)),
                                               r.in_flight))
        if not candidates:
            raise NoReplicaAvailable("no engine replica is up")
        busy = None
        for replica in candidates:
            try:
                response = self.client.post(f"{replica.agent_url}/v1/leases", json={
                    "adapter": adapter, "adapter_id": adapter_id, "holder": self.holder, "wait": wait})
            except httpx.HTTPError as exc:
                self.mark_down(replica, f"its agent did not answer ({type(exc).__name__})")
                continue
            if response.status_code == 200:
                return self._hold(replica, adapter, response.json()["lease"])
            error = _error_of(response)
            if response.status_code == 422:
                raise AdapterLoadError(error["message"], code=error["code"])
            if response.status_code == 503:
                self.mark_down(replica, error["message"])
            busy = error["message"]
        if busy is not None:
            raise SlotsBusy(busy)
        raise NoReplicaAvailable("no engine replica could take the adapter")

    def _hold(self, replica: ReplicaView, adapter: str, lease_id: str) -> Route:
        with self._lock:
            held = self.held.setdefault((replica.agent_url, adapter), HeldLease(replica, adapter))
            held.ids.append(lease_id)
            held.count += 1
            replica.in_flight += 1
            replica.loaded = replica.loaded | {adapter}
            return Route(replica.engine_url, replica, held)

    def release(self, route: Route) -> None:
        """The request ended. No I/O (called from the event loop): the last request on a lease
        queues it for the maintenance thread to hand back at once."""
        with self._lock:
            route.replica.in_flight -= 1
            held = route.held
            if held is None:
                return
            held.count -= 1
            if held.count <= 0:
                key = (held.replica.agent_url, held.adapter)
                if self.held.get(key) is held:
                    del self.held[key]  # a new request leases afresh: never on a lease being released
                if held.ids:
                    self._to_release.setdefault(held.replica.agent_url, []).extend(held.ids)
                    held.ids = []
                    self._wake.set()

    def mark_down(self, replica: ReplicaView, reason: str) -> None:
        """The replica failed a request: route around it until its agent says it is ready."""
        with self._lock:
            self._mark_down(replica, reason)

    def _mark_down(self, replica: ReplicaView, reason: str) -> None:
        if replica.up:
            log.warning("engine replica %s is down: %s", replica.agent_url, reason)
        replica.up = False
        replica.reason = reason
        for key in [k for k, h in self.held.items() if h.replica is replica]:
            self.held[key].ids.clear()  # lost with the engine; in-flight routes end on their own

    def forget(self, route: Route) -> None:
        """The engine does not know the adapter although we lease it (it restarted): drop it."""
        with self._lock:
            if route.held is not None:
                route.held.ids.clear()
            route.replica.loaded = route.replica.loaded - {route.held.adapter if route.held else ""}

    # --- what the agents say ------------------------------------------------------------------

    def loaded_anywhere(self, adapter: str) -> bool:
        return any(r.up and adapter in r.loaded for r in list(self.replicas))

    def ensure_fresh(self) -> None:
        """Ask the agents once, if nobody has yet in this process (blocking: not on the loop)."""
        if not self.refreshed.is_set():
            self.refresh()

    def health(self) -> tuple[bool, str]:
        """(any replica up, a reason when none is)."""
        self.ensure_fresh()
        replicas = list(self.replicas)
        up = [r for r in replicas if r.up]
        if up:
            return True, f"{len(up)} of {len(replicas)} replicas up"
        if not replicas:
            return False, "no replica has joined the fleet"
        return False, "; ".join(f"{r.agent_url}: {r.reason}" for r in replicas)

    def refresh(self) -> None:
        """Look at the replicas: in a fleet, read the membership with the states the replicas
        published (adding those that joined, dropping those whose entry expired); ask over HTTP
        the agents whose state is not known so (all of them without a fleet, or while the
        fleet cannot be read: then the pool keeps the replicas it knows)."""
        found = self._read_fleet()
        with self._lock:
            if found is not None:
                self._sync(found)
            ask = [r for r in self.replicas
                   if found is None or r.agent_url in self.fixed or found.get(r.agent_url) is None]
        for replica in ask:
            try:
                response = self.client.get(f"{replica.agent_url}/v1/state", timeout=2)
                response.raise_for_status()
                state = response.json()
            except (httpx.HTTPError, ValueError) as exc:
                self.mark_down(replica, f"its agent did not answer ({type(exc).__name__})")
                continue
            with self._lock:
                self._set_state(replica, state)
        self.refreshed.set()

    def _read_fleet(self) -> dict[str, dict | None] | None:
        if self.fleet is None:
            return None
        try:
            return {url.rstrip("/"): state for url, state in self.fleet().items()}
        except Exception as exc:  # noqa: BLE001 - Redis down or slow: route as before
            log.warning("could not read the fleet (keeping %d replicas): %s", len(self.replicas), exc)
            return None

    def _sync(self, found: dict[str, dict | None]) -> None:
        """Under the lock: the pool's replicas become the fixed ones and those ``found``."""
        for url in sorted(set(found) - {r.agent_url for r in self.replicas}):
            log.info("engine replica %s joined", url)
            self.replicas.append(ReplicaView(url, reason="joined, not asked yet"))
        for replica in [r for r in self.replicas
                        if r.agent_url not in found and r.agent_url not in self.fixed]:
            self._drop(replica)
        for replica in self.replicas:
            if found.get(replica.agent_url):
                self._set_state(replica, found[replica.agent_url])

    def _drop(self, replica: ReplicaView) -> None:
        self._mark_down(replica, "it left the fleet")
        self.replicas.remove(replica)
        log.info("engine replica %s left", replica.agent_url)

    def apply_state(self, agent_url: str, state: dict | None) -> None:
        """A replica's published change (``None``: it left the fleet). No I/O."""
        url = agent_url.rstrip("/")
        with self._lock:
            replica = next((r for r in self.replicas if r.agent_url == url), None)
            if state is None:
                if replica is not None and url not in self.fixed:
                    self._drop(replica)
                return
            if replica is None:
                log.info("engine replica %s joined", url)
                replica = ReplicaView(url)
                self.replicas.append(replica)
            if state:
                self._set_state(replica, state)

    def _set_state(self, replica: ReplicaView, state: dict) -> None:
        replica.engine_url = state["engine_url"].rstrip("/")
        replica.loaded = frozenset(state["loaded"])
        replica.slots = state["slots"]
        if state["ready"] and not replica.up:
            log.info("engine replica %s is up", replica.agent_url)
        replica.up = bool(state["ready"])
        replica.reason = "ok" if replica.up else "its engine is starting or restarting"

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self.run, name="pool-upkeep", daemon=True)
        thread.start()
        return thread

    def run(self) -> None:
        """Upkeep until closed: releases as soon as they are queued; looks and renewals on time."""
        while not self._closed.is_set():
            self._wake.wait(1.0)
            self._wake.clear()
            try:
                self.maintain()
            except Exception:  # the loop must survive anything one agent does
                log.exception("pool upkeep failed")

    def maintain(self) -> None:
        """One round: hand back released leases; refresh states and renew leases when due."""
        with self._lock:
            release, self._to_release = self._to_release, {}
        for url, ids in release.items():
            self._post(f"{url}/v1/leases/release", {"leases": ids})
        now = time.monotonic()
        if now - self._last_refresh >= self.resync_every:
            self._last_refresh = now
            self.refresh()
        if now - self._last_renew < self.renew_every:
            return
        self._last_renew = now
        renew: dict[str, list[str]] = {}
        with self._lock:
            for held in self.held.values():
                if held.ids:
                    renew.setdefault(held.replica.agent_url, []).extend(held.ids)
        for url, ids in renew.items():
            answer = self._post(f"{url}/v1/leases/renew", {"leases": ids})
            unknown = set(answer.get("unknown", ())) if answer is not None else set()
            if unknown:
                with self._lock:
                    for held in self.held.values():
                        held.ids[:] = [i for i in held.ids if i not in unknown]

    def _post(self, url: str, body: dict) -> dict | None:
        try:
            response = self.client.post(url, json=body, timeout=5)
            return response.json() if response.status_code == 200 else None
        except (httpx.HTTPError, ValueError) as exc:
            log.warning("pool agent call %s failed: %s", url, exc)
            return None

    # --- deploy / undeploy (the platform's services) ------------------------------------------

    def deploy(self, adapter: str, adapter_id: str) -> Route | None:
        """Load the adapter now, so that a refusal (validation or the engine's) is the caller's
        error; the route's lease is the caller's to release. When every slot of every replica is
        pinned or serving requests, a replica only stages and validates it (None): it is loaded
        on first use."""
        try:
            return self.acquire(adapter, adapter_id, wait=2.0)
        except SlotsBusy:
            pass
        for replica in [r for r in self.replicas if r.up]:
            try:
                response = self.client.post(f"{replica.agent_url}/v1/adapters/stage",
                                            json={"adapter": adapter, "adapter_id": adapter_id})
            except httpx.HTTPError as exc:
                self.mark_down(replica, f"its agent did not answer ({type(exc).__name__})")
                continue
            if response.status_code == 200:
                return None
            if response.status_code == 422:
                error = _error_of(response)
                raise AdapterLoadError(error["message"], code=error["code"])
        raise NoReplicaAvailable("no engine replica could take the adapter")

    def follow_deployed(self) -> None:
        """Ask every agent to follow the deployed set now (pinned adapters go onto every replica,
        others into free slots) instead of at its next reconciliation."""
        self.broadcast("/v1/reconcile", {})

    def undeploy(self, adapter: str) -> None:
        """Every replica unloads it (a replica where a request holds it: when that ends)."""
        self.broadcast("/v1/adapters/unload", {"adapter": adapter})

    def broadcast(self, path: str, body: dict) -> None:
        for replica in list(self.replicas):
            self._post(f"{replica.agent_url}{path}", body)

    def close(self) -> None:
        self._closed.set()
        self._wake.set()
        with self._lock:
            release, self._to_release = self._to_release, {}
            for held in self.held.values():
                release.setdefault(held.replica.agent_url, []).extend(held.ids)
            self.held.clear()
        for url, ids in release.items():
            self._post(f"{url}/v1/leases/release", {"leases": ids})
        self.client.close()


def _error_of(response: httpx.Response) -> dict:
    try:
        error = response.json()["error"]
        return {"code": str(error.get("code")), "message": str(error.get("message"))}
    except (ValueError, KeyError, TypeError, AttributeError):
        return {"code": "engine_error", "message": f"pool agent answered {response.status_code}"}
