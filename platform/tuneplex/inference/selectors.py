from __future__ import annotations

import datetime

from django.db.models import Sum

from tuneplex.inference.models import UsageDaily
from tuneplex.tenancy.models import Organization


def usage_since(*, organization: Organization, start: datetime.date) -> dict:
    """The organization's inference usage from ``start`` (UTC days, inclusive): totals and per model."""
    rows = UsageDaily.objects.filter(organization=organization, day__gte=start)
    sums = {"requests": Sum("requests"), "prompt_tokens": Sum("prompt_tokens"),
            "completion_tokens": Sum("completion_tokens")}
    totals = {name: value or 0 for name, value in rows.aggregate(**sums).items()}
    per_model = list(rows.values("model").annotate(**sums).order_by("-completion_tokens", "model")[:10])
    return {**totals, "total_tokens": totals["prompt_tokens"] + totals["completion_tokens"],
            "per_model": per_model}
