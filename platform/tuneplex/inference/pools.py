"""This process's way into the serving pool: one :class:`PoolClient` per served base model.

The residency of adapters is decided by the pool agent beside each replica (``serving/pool.py``
says why); this process only routes, and leases the adapters its requests use. The replicas
are those that registered in the fleet (``membership``: their changes pushed to this process,
every entry read again once a heartbeat), or those ``TUNEPLEX_ENGINE_URLS`` lists (each agent
asked for its state every second). Each pool's upkeep thread also renews the leases this process
holds and hands back those no request uses any more; each agent tells where its engine listens.
"""

from __future__ import annotations

import atexit
import functools
import logging
import threading
from pathlib import Path

from django.conf import settings

from serving.adapters import base_linear_shapes
from serving.client import PoolClient
from tuneplex.core.errors import ApiError
from tuneplex.inference import membership

log = logging.getLogger(__name__)

_pools: dict[str, PoolClient] | None = None
_watcher: membership.Watcher | None = None
_config: tuple = ()
_lock = threading.Lock()
_exit_hook = False


class EngineUnavailable(ApiError):
    status = 503

    def __init__(self, message: str) -> None:
        super().__init__(message, code="engine_unavailable")


def _new_pool(urls: list[str], fleet=None) -> PoolClient:
    pool = PoolClient(urls, api_key=settings.ENGINE_API_KEY, slots=settings.ENGINE_LORA_SLOTS,
                      lease_seconds=settings.ENGINE_LEASE_SECONDS, timeout=settings.ENGINE_TIMEOUT,
                      fleet=fleet, resync_every=settings.MEMBERSHIP_HEARTBEAT_SECONDS)
    pool.start()
    return pool


def _fleet_pool(base_model: str) -> PoolClient:
    """Under ``_lock``: a pool of the replicas of ``base_model`` in the fleet, and this process's
    subscription to the fleet's changes (one for all its pools) on first use."""
    global _watcher
    if _watcher is None:
        _watcher = membership.Watcher(_on_fleet_change).start()
    return _new_pool([], fleet=functools.partial(membership.entries, base_model))


def _on_fleet_change(base_model: str, url: str, state: dict | None) -> None:
    pool = (_pools or {}).get(base_model)
    if pool is not None:
        pool.apply_state(url, state)


def pools() -> dict[str, PoolClient]:
    """The pools of this process, created (and their upkeep threads started) on first use. With
    TUNEPLEX_ENGINE_URLS, one per base model listed; in a fleet (``ENGINE_DISCOVERY``), one per
    base model asked for so far (:func:`pool_for`), its replicas read from the membership."""
    global _pools, _config, _exit_hook
    config = (tuple((base, tuple(urls)) for base, urls in settings.ENGINE_REPLICAS.items()),
              settings.ENGINE_DISCOVERY, settings.SERVING_FLEET)
    old = None
    with _lock:
        if _pools is None or config != _config:
            old = _pools
            _pools = {base: _new_pool(list(urls)) for base, urls in config[0]}
            _config = config
            if not _exit_hook:
                atexit.register(_release_all)
                _exit_hook = True
        current = _pools
    for pool in (old or {}).values():  # the settings changed (tests): hand its leases back
        pool.close()
    return current


def pool_for(base_model: str) -> PoolClient:
    pool = pools().get(base_model)
    if pool is None and settings.ENGINE_DISCOVERY:
        with _lock:
            pool = _pools.get(base_model)
            if pool is None:
                pool = _pools[base_model] = _fleet_pool(base_model)
    if pool is None:
        raise EngineUnavailable(f"No engine replica serves {base_model} (TUNEPLEX_ENGINE_MODE / "
                                f"TUNEPLEX_ENGINE_URLS).")
    return pool


def is_loaded(adapter) -> bool:
    """Whether a replica that is up holds the adapter (as of the last look, at most a second ago)."""
    base = adapter.base_model.name
    return serves(base) and pool_for(base).loaded_anywhere(adapter.name)


def serves(base_model: str) -> bool:
    """Whether this install serves the base model: listed in TUNEPLEX_ENGINE_URLS, or any in a
    fleet (replicas of it may join at any time; until one has, its requests are 503)."""
    return settings.ENGINE_DISCOVERY or base_model in settings.ENGINE_REPLICAS


def serving_health() -> dict[str, tuple[bool, str]]:
    """Per served base model: (a replica is up, why not). In a fleet: the default base model's
    and those asked for so far."""
    if settings.ENGINE_DISCOVERY:
        pool_for(settings.DEFAULT_BASE_MODEL)
    return {base: pool.health() for base, pool in pools().items()}


@functools.lru_cache(maxsize=32)
def base_shapes(model_dir: str) -> dict[str, tuple[int, int]]:
    return base_linear_shapes(Path(model_dir))


def _release_all() -> None:
    """On a clean exit, hand our leases back at once instead of letting them expire."""
    for pool in list((_pools or {}).values()):
        try:
            pool.close()
        except Exception:  # noqa: BLE001 - exiting anyway
            pass
