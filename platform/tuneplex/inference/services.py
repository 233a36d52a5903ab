"""Writes for serving: deploy and undeploy adapters, record token usage."""

from __future__ import annotations

import datetime
import logging

import httpx
from django.db import IntegrityError, transaction
from django.db.models import F
from django.utils import timezone

from serving.adapters import AdapterInvalid
from serving.pool import AdapterLoadError, NoReplicaAvailable
from tuneplex.adapters.models import Adapter
from tuneplex.audit.services import audit_record
from tuneplex.basemodels.models import BaseModel
from tuneplex.core.actors import Principal
from tuneplex.core.errors import ApiError, Conflict
from tuneplex.inference import cache
from tuneplex.inference.models import UsageDaily
from tuneplex.inference.pools import EngineUnavailable, pool_for, serves
from tuneplex.inference.staging import stage_adapter

log = logging.getLogger(__name__)


class AdapterRefused(ApiError):
    status = 422


def adapter_deploy(*, organization, actor: Principal, adapter: Adapter, pinned: bool = False) -> Adapter:
    """Validate the adapter and load it into the pool now; the engine's refusal is the caller's error.

    A replica's pool agent stages it from artifact storage onto its own node, validates and loads
    it; the lease taken for that is held until the row says deployed, so no agent unloads it in
    between (when every slot is busy serving requests it is only staged and validated, and
    loaded on first use). On any failure the adapter stays undeployed and ``deploy_error`` says why.
    """
    pool = pool_for(adapter.base_model.name)
    if pinned and not adapter.pinned:
        _check_pin_limit(adapter, pool.slots)
    try:
        route = pool.deploy(adapter.name, adapter.id)
    except AdapterLoadError as exc:
        _deploy_failed(adapter, str(exc))
        code = exc.code if exc.code.startswith("adapter_") else "adapter_load_failed"
        message = str(exc) if code != "adapter_load_failed" else f"The engine refused the adapter: {exc}"
        raise AdapterRefused(message, code=code) from None
    except (NoReplicaAvailable, httpx.HTTPError) as exc:
        raise EngineUnavailable(f"The serving pool cannot take the adapter now: {exc}") from None
    try:
        with transaction.atomic():
            if pinned and not adapter.pinned:
                # Again, under the base model's row lock: two pins that both passed the check
                # above cannot both take its last place.
                BaseModel.objects.select_for_update().filter(pk=adapter.base_model_id).first()
                _check_pin_limit(adapter, pool.slots)
            Adapter.objects.filter(pk=adapter.pk).update(
                deployed=True, pinned=pinned, deploy_error="",
                deployed_at=adapter.deployed_at if adapter.deployed else timezone.now())
            audit_record(actor=actor, action="adapter.deploy", obj=adapter, metadata={"pinned": pinned})
    finally:
        if route is not None:
            pool.release(route)
    pool.follow_deployed()  # pinned adapters onto every replica
    adapter.refresh_from_db()
    return adapter


def adapter_undeploy(*, organization, actor: Principal, adapter: Adapter) -> Adapter:
    """Stop serving the adapter: requests for it get 404 from now on."""
    with transaction.atomic():
        Adapter.objects.filter(pk=adapter.pk).update(deployed=False, pinned=False)
        audit_record(actor=actor, action="adapter.undeploy", obj=adapter)
    cache.targets.clear()  # this process's admissions; others' expire within seconds
    if serves(adapter.base_model.name):
        # Every replica unloads it (once no request holds it); an agent that does not answer
        # now unloads it at its next reconciliation.
        pool_for(adapter.base_model.name).undeploy(adapter.name)
    adapter.refresh_from_db()
    return adapter


def adapter_auto_deploy(adapter: Adapter, *, gated: bool = False) -> str | None:
    """After a job succeeds (on a worker): stage and validate, then mark it deployed.

    The replicas' pool agents load it (into a free slot within seconds, or on its first request).
    Returns why it was not deployed, or None. ``gated``: a deploy gate decided it is better,
    which is the organization's explicit choice whatever its auto-deploy setting.
    """
    if not adapter.organization.auto_deploy and not gated:
        return "auto-deploy is off for this organization"
    if not serves(adapter.base_model.name):
        return f"no engine replica serves {adapter.base_model.name}"
    try:
        stage_adapter(adapter)
    except AdapterInvalid as exc:
        _deploy_failed(adapter, str(exc))
        return str(exc)
    Adapter.objects.filter(pk=adapter.pk).update(deployed=True, deployed_at=timezone.now(),
                                                 deploy_error="")
    return None


def _deploy_failed(adapter: Adapter, reason: str) -> None:
    Adapter.objects.filter(pk=adapter.pk).update(deploy_error=reason[:2000])


def _check_pin_limit(adapter: Adapter, slots: int) -> None:
    """Pinned adapters may hold at most half of a replica's slots, so others can still be served."""
    pinned = Adapter.objects.filter(base_model=adapter.base_model, deployed=True, pinned=True).count()
    if pinned >= max(1, slots // 2):
        raise Conflict(f"{pinned} adapters of {adapter.base_model.name} are already pinned, the most "
                       f"the pool allows ({max(1, slots // 2)} of {slots} slots).",
                       code="pin_limit_reached")


def usage_record(*, organization_id: str, model: str, adapter_id: str | None, day: datetime.date,
                 requests: int, prompt_tokens: int, completion_tokens: int) -> None:
    """Add requests and tokens to the organization's row for this model and UTC day."""
    increments = {"requests": F("requests") + requests,
                  "prompt_tokens": F("prompt_tokens") + prompt_tokens,
                  "completion_tokens": F("completion_tokens") + completion_tokens}
    rows = UsageDaily.objects.filter(organization_id=organization_id, model=model, day=day)
    if rows.update(**increments):
        return
    try:
        with transaction.atomic():
            UsageDaily.objects.create(organization_id=organization_id, model=model, day=day,
                                      adapter_id=adapter_id, requests=requests, prompt_tokens=prompt_tokens,
                                      completion_tokens=completion_tokens)
    except IntegrityError:  # another request created today's row first
        rows.update(**increments)
