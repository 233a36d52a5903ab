"""This process's view of the serving pool: one :class:`LoraPool` per served base model.

The database is the record of what is deployed (``Adapter.deployed``/``pinned``); every web
process keeps its pool in line with it and with the replicas through a reconciler thread that,
every TUNEPLEX_ENGINE_RECONCILE_SECONDS, notices restarted replicas (their adapters are loaded
again), unloads adapters undeployed elsewhere and preloads newly deployed ones into free slots.
Requests load a deployed adapter lazily when it is not loaded anywhere, so nothing waits for
the reconciler.
"""

from __future__ import annotations

import functools
import logging
import threading
from pathlib import Path

from django.conf import settings
from django.db import close_old_connections

from serving.adapters import base_linear_shapes
from serving.pool import LoraPool
from tuneplex.core.errors import ApiError

log = logging.getLogger(__name__)

_pools: dict[str, LoraPool] | None = None
_config: tuple = ()
_lock = threading.Lock()
_reconciler: threading.Thread | None = None


class EngineUnavailable(ApiError):
    status = 503

    def __init__(self, message: str) -> None:
        super().__init__(message, code="engine_unavailable")


def pools() -> dict[str, LoraPool]:
    """The pools of this process, created (and the reconciler started) on first use."""
    global _pools, _config, _reconciler
    config = tuple((base, tuple(urls)) for base, urls in settings.ENGINE_REPLICAS.items())
    with _lock:
        if _pools is None or config != _config:
            _pools = {base: LoraPool(list(urls), slots=settings.ENGINE_LORA_SLOTS, timeout=60)
                      for base, urls in config}
            _config = config
            if _pools and _reconciler is None:
                _reconciler = threading.Thread(target=_reconcile_forever, name="pool-reconciler",
                                               daemon=True)
                _reconciler.start()
        return _pools


def pool_for(base_model: str) -> LoraPool:
    pool = pools().get(base_model)
    if pool is None:
        raise EngineUnavailable(f"No engine replica serves {base_model} (TUNEPLEX_ENGINE_MODE / "
                                f"TUNEPLEX_ENGINE_URLS).")
    return pool


def is_loaded(adapter) -> bool:
    """Whether this process's pool has the adapter on a replica (as of its last look)."""
    pool = pools().get(adapter.base_model.name)
    return pool is not None and bool(pool.loaded_on(adapter.name))


def serves(base_model: str) -> bool:
    return base_model in settings.ENGINE_REPLICAS


@functools.lru_cache(maxsize=32)
def base_shapes(model_dir: str) -> dict[str, tuple[int, int]]:
    return base_linear_shapes(Path(model_dir))


def deployed_by_base() -> dict[str, dict[str, tuple[str, bool]]]:
    """Deployed adapters per base model: name -> (staged path, pinned)."""
    from serving.adapters import AdapterInvalid
    from tuneplex.adapters.models import Adapter
    from tuneplex.inference.staging import ensure_staged

    found: dict[str, dict[str, tuple[str, bool]]] = {}
    for adapter in Adapter.objects.filter(deployed=True).select_related("base_model"):
        try:
            path = ensure_staged(adapter)
        except AdapterInvalid as exc:
            log.error("deployed adapter %s cannot be staged: %s", adapter.name, exc)
            continue
        found.setdefault(adapter.base_model.name, {})[adapter.name] = (str(path), adapter.pinned)
    return found


def reconcile_once() -> None:
    deployed = deployed_by_base()
    for base, pool in pools().items():
        pool.sync(deployed.get(base, {}))
        pool.reconcile()
        pool.preload()


def _reconcile_forever() -> None:
    stop = threading.Event()
    while not stop.wait(settings.ENGINE_RECONCILE_SECONDS):
        try:
            reconcile_once()
        except Exception:  # the loop must survive a database or engine hiccup
            log.exception("pool reconciliation failed")
        finally:
            close_old_connections()
