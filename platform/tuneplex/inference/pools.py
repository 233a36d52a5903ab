"""This process's way into the serving pool: one :class:`PoolClient` per served base model.

The residency of adapters is decided by the pool agent beside each replica (``serving/pool.py``
says why); this process only routes, and leases the adapters its requests use. Each pool's
upkeep thread refreshes every agent's state each second, renews the leases this process holds
and hands back those no request uses any more. ``TUNEPLEX_ENGINE_URLS`` lists the replicas' agent addresses; each agent
tells where its engine listens.
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

log = logging.getLogger(__name__)

_pools: dict[str, PoolClient] | None = None
_config: tuple = ()
_lock = threading.Lock()
_exit_hook = False


class EngineUnavailable(ApiError):
    status = 503

    def __init__(self, message: str) -> None:
        super().__init__(message, code="engine_unavailable")


def pools() -> dict[str, PoolClient]:
    """The pools of this process, created (and the maintenance thread started) on first use."""
    global _pools, _config, _exit_hook
    config = tuple((base, tuple(urls)) for base, urls in settings.ENGINE_REPLICAS.items())
    old = None
    with _lock:
        if _pools is None or config != _config:
            old = _pools
            _pools = {base: PoolClient(list(urls), api_key=settings.ENGINE_API_KEY,
                                       slots=settings.ENGINE_LORA_SLOTS,
                                       lease_seconds=settings.ENGINE_LEASE_SECONDS,
                                       timeout=settings.ENGINE_TIMEOUT)
                      for base, urls in config}
            _config = config
            for pool in _pools.values():
                pool.start()
            if not _exit_hook:
                atexit.register(_release_all)
                _exit_hook = True
        current = _pools
    for pool in (old or {}).values():  # the settings changed (tests): hand its leases back
        pool.close()
    return current


def pool_for(base_model: str) -> PoolClient:
    pool = pools().get(base_model)
    if pool is None:
        raise EngineUnavailable(f"No engine replica serves {base_model} (TUNEPLEX_ENGINE_MODE / "
                                f"TUNEPLEX_ENGINE_URLS).")
    return pool


def is_loaded(adapter) -> bool:
    """Whether a replica that is up holds the adapter (as of the last look, at most a second ago)."""
    pool = pools().get(adapter.base_model.name)
    return pool is not None and pool.loaded_anywhere(adapter.name)


def serves(base_model: str) -> bool:
    return base_model in settings.ENGINE_REPLICAS


def serving_health() -> dict[str, tuple[bool, str]]:
    """Per served base model: (a replica is up, why not)."""
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
