"""The pin limit holds when two pins race (PostgreSQL, two threads; the pool is the one stand-in)."""

from __future__ import annotations

import threading

import pytest
from django.db import connection

from tests.conftest import make_tenant
from tests.fixtures.adapter_rows import adapter_row
from tuneplex.adapters.models import Adapter
from tuneplex.core.errors import Conflict
from tuneplex.inference import services

pytestmark = pytest.mark.django_db(transaction=True)


class RacingPool:
    """Both deploys reach the pool before either writes its row: the window the race needs."""

    slots = 2  # a pin limit of one

    def __init__(self) -> None:
        self.both_loading = threading.Barrier(2, timeout=30)

    def deploy(self, name, adapter_id):
        self.both_loading.wait()
        return None

    def release(self, route):
        pass

    def follow_deployed(self):
        pass


def test_two_pins_racing_for_the_last_place_cannot_both_take_it(default_model, monkeypatch):
    tenant = make_tenant("Pins")
    first, second = (adapter_row(tenant.organization, default_model) for _ in range(2))
    pool = RacingPool()
    monkeypatch.setattr(services, "pool_for", lambda name: pool)
    outcomes: list[str] = []

    def pin(adapter: Adapter) -> None:
        try:
            services.adapter_deploy(organization=tenant.organization, actor=tenant.principal(),
                                    adapter=adapter, pinned=True)
            outcomes.append("pinned")
        except Conflict as exc:
            outcomes.append(exc.code)
        finally:
            connection.close()

    threads = [threading.Thread(target=pin, args=(a,)) for a in (first, second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(outcomes) == ["pin_limit_reached", "pinned"]
    assert Adapter.objects.filter(pinned=True).count() == 1
