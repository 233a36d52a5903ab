from __future__ import annotations

from django.conf import settings
from django.db.models import QuerySet

from tuneplex.basemodels.models import BaseModel
from tuneplex.core.errors import NotFound


def base_model_list(*, enabled_only: bool = False) -> QuerySet[BaseModel]:
    models = BaseModel.objects.order_by("name")
    return models.filter(enabled=True) if enabled_only else models


def base_model_get(*, name: str) -> BaseModel:
    model = BaseModel.objects.filter(name=name).first()
    if model is None:
        raise NotFound(f"No base model named {name!r}.", param="model")
    return model


def served_base_models() -> QuerySet[BaseModel]:
    """Enabled base models that an engine replica serves (the playground's and /v1/models' list)."""
    return base_model_list(enabled_only=True).filter(name__in=list(settings.ENGINE_REPLICAS))
