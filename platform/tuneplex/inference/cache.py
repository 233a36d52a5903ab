"""A short-lived memory of admissions, so the gateway does not ask the database on every request.

Who a key is (its principal) and what a model name resolves to for an organization are kept for
TUNEPLEX_INFERENCE_AUTH_CACHE_SECONDS (2 by default; 0 turns it off), and why a key was refused
for TUNEPLEX_INFERENCE_AUTH_REFUSAL_CACHE_SECONDS (10 by default). In this process every
change that could matter (a key revoked or changed, a membership changed, an adapter deployed or
undeployed) clears them at once through model signals; other web processes see it when their
entries expire, within that many seconds.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from django.conf import settings


class TtlCache:
    def __init__(self, max_entries: int = 10_000, ttl_setting: str = "INFERENCE_AUTH_CACHE_SECONDS") -> None:
        self._entries: dict[Any, tuple[float, Any]] = {}
        self._lock = threading.Lock()
        self.max_entries = max_entries
        self.ttl_setting = ttl_setting

    def get(self, key: Any) -> Any | None:
        entry = self._entries.get(key)
        if entry is None or entry[0] < time.monotonic():
            return None
        return entry[1]

    def known(self, key: Any) -> bool:
        """Whether ``key`` was put here, even if it has expired since (until it is cleared)."""
        return key in self._entries

    def put(self, key: Any, value: Any) -> None:
        ttl = getattr(settings, self.ttl_setting)
        if ttl <= 0:
            return
        with self._lock:
            if len(self._entries) >= self.max_entries:
                self._entries.clear()
            self._entries[key] = (time.monotonic() + ttl, value)

    def clear(self, *args, **kwargs) -> None:  # usable as a signal receiver
        with self._lock:
            self._entries.clear()


principals = TtlCache()  # sha256 of the key -> Principal
# sha256 of a key that failed -> why (TUNEPLEX_INFERENCE_AUTH_REFUSAL_CACHE_SECONDS): a flood of
# the same bad key costs no database look-up
refusals = TtlCache(ttl_setting="INFERENCE_AUTH_REFUSAL_CACHE_SECONDS")
targets = TtlCache()  # (organization id, model) -> Target


def connect_signals() -> None:
    from django.db.models.signals import post_delete, post_save

    from tuneplex.adapters.models import Adapter
    from tuneplex.apikeys.models import ApiKey
    from tuneplex.basemodels.models import BaseModel
    from tuneplex.tenancy.models import Membership

    for model in (ApiKey, Membership):
        for kept in (principals, refusals):
            name = f"{model.__name__}-{kept.ttl_setting}"
            post_save.connect(kept.clear, sender=model, dispatch_uid=f"gateway-principals-{name}")
            post_delete.connect(kept.clear, sender=model, dispatch_uid=f"gateway-principals-d-{name}")
    for model in (Adapter, BaseModel):
        post_save.connect(targets.clear, sender=model, dispatch_uid=f"gateway-targets-{model.__name__}")
        post_delete.connect(targets.clear, sender=model, dispatch_uid=f"gateway-targets-d-{model.__name__}")
