from tuneplex.tenancy.selectors import memberships_of_user
from tuneplex.tenancy.sessions import active_membership


def navigation(request):
    """The active organization and the user's others, for the header and its switcher."""
    user = getattr(request, "user", None)
    if user is None or not user.is_authenticated:
        return {}
    return {"membership": active_membership(request),
            "memberships": list(memberships_of_user(user=user))}
