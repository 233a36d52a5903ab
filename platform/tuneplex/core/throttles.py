"""A per-organization request rate on the REST API (the inference endpoints have their own
limits): one organization's scripts cannot crowd out the others. Counted in the shared cache
(Redis when REDIS_URL is set), so every web process agrees."""

from __future__ import annotations

from django.conf import settings
from rest_framework.throttling import SimpleRateThrottle


class OrganizationRateThrottle(SimpleRateThrottle):
    scope = "organization"

    def get_rate(self) -> str | None:
        return f"{settings.ORG_API_RATE_LIMIT}/min" if settings.ORG_API_RATE_LIMIT else None

    def get_cache_key(self, request, view) -> str | None:
        organization = getattr(getattr(request, "auth", None), "organization", None)
        if organization is None:
            return None  # unauthenticated: refused by authentication, not counted here
        return f"tuneplex:throttle:org:{organization.pk}"
