from __future__ import annotations

import datetime
from dataclasses import dataclass

from django.db.models import Sum

from tuneplex.adapters.models import Adapter
from tuneplex.basemodels.models import BaseModel
from tuneplex.core.errors import ApiError
from tuneplex.inference.models import UsageDaily
from tuneplex.inference.pools import serves
from tuneplex.tenancy.models import Organization


class ModelNotFound(ApiError):
    status = 404

    def __init__(self, model: str, *, deployed_hint: bool = False, param: str = "model") -> None:
        if deployed_hint:
            super().__init__(f"The model '{model}' is not deployed; deploy it with "
                             f"POST /v1/adapters/{{id}}/deploy.", code="model_not_deployed", param=param)
        else:
            super().__init__(f"The model '{model}' does not exist or you do not have access to it.",
                             code="model_not_found", param=param)


@dataclass(frozen=True)
class ServableModel:
    model: str  # the engine's name for it
    base_model: str
    adapter_id: str | None


def servable_model(*, organization: Organization, model: str, param: str = "model",
                   undeployed_ok: bool = False) -> ServableModel:
    """The organization's deployed adapter, or a served base model, named ``model``; else a 404
    (``model_not_deployed`` for an adapter of its own that is not deployed). ``undeployed_ok``:
    the platform's own evaluation of a candidate adapter before it is deployed (the pool loads
    it for the requests' leases and unloads it afterwards)."""
    adapter = (Adapter.objects.filter(organization=organization, name=model)
               .select_related("base_model").first())
    if adapter is not None:
        if not adapter.deployed and not undeployed_ok:
            raise ModelNotFound(model, deployed_hint=True, param=param)
        return ServableModel(adapter.name, adapter.base_model.name, adapter.id)
    if serves(model) and BaseModel.objects.filter(name=model, enabled=True).exists():
        return ServableModel(model, model, None)
    raise ModelNotFound(model, param=param)


def usage_since(*, organization: Organization, start: datetime.date) -> dict:
    """The organization's inference usage from ``start`` (UTC days, inclusive): totals and per model."""
    rows = UsageDaily.objects.filter(organization=organization, day__gte=start)
    sums = {"requests": Sum("requests"), "prompt_tokens": Sum("prompt_tokens"),
            "completion_tokens": Sum("completion_tokens")}
    totals = {name: value or 0 for name, value in rows.aggregate(**sums).items()}
    per_model = list(rows.values("model").annotate(**sums).order_by("-completion_tokens", "model")[:10])
    return {**totals, "total_tokens": totals["prompt_tokens"] + totals["completion_tokens"],
            "per_model": per_model}
