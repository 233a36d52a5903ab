"""The signed-in user's active organization: the organization switcher's choice, in the session."""

from __future__ import annotations

from django.http import HttpRequest

from tuneplex.tenancy.models import Membership
from tuneplex.tenancy.selectors import membership_for

SESSION_KEY = "tuneplex_organization_id"
_CACHE_ATTR = "_tuneplex_membership"


def active_membership(request: HttpRequest) -> Membership | None:
    """The user's membership in their chosen organization (this session's choice, else the one
    they selected last, else the one they joined first), cached per request."""
    if not hasattr(request, _CACHE_ATTR):
        user = getattr(request, "user", None)
        membership = None
        if user is not None and user.is_authenticated:
            membership = membership_for(user=user,
                                        organization_id=request.session.get(SESSION_KEY))
        setattr(request, _CACHE_ATTR, membership)
    return getattr(request, _CACHE_ATTR)


def switch_organization(request: HttpRequest, membership: Membership) -> None:
    """The user chose this organization: for this session and, remembered, the next ones."""
    from tuneplex.tenancy.services import user_select_organization

    request.session[SESSION_KEY] = membership.organization_id
    user_select_organization(user=membership.user, organization=membership.organization)
    setattr(request, _CACHE_ATTR, membership)
