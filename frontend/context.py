from django.conf import settings

from tuneplex.tenancy.selectors import memberships_of_user
from tuneplex.tenancy.sessions import active_membership


def navigation(request):
    """The active organization and the user's others, for the header and its switcher."""
    user = getattr(request, "user", None)
    if user is None or not user.is_authenticated:
        return {"signup_enabled": settings.SIGNUP_ENABLED, "oidc_enabled": settings.OIDC_ENABLED,
                "sso_failed": request.GET.get("sso") == "failed"}
    return {"membership": active_membership(request),
            "memberships": sorted(memberships_of_user(user=user),
                                  key=lambda m: (m.organization.name.lower(), m.organization_id))}
