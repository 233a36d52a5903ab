"""Browser sessions on the REST API: Django's session with CSRF, acting in the active organization."""

from __future__ import annotations

from rest_framework import authentication, exceptions

from tuneplex.core.actors import Principal
from tuneplex.tenancy.sessions import active_membership


class OrganizationSessionAuthentication(authentication.SessionAuthentication):
    def authenticate(self, request):
        result = super().authenticate(request)  # enforces CSRF on unsafe methods
        if result is None:
            return None
        user, _ = result
        membership = active_membership(request._request)
        if membership is None:
            raise exceptions.PermissionDenied("You are not a member of any organization.")
        principal = Principal.of_member(membership)
        return (user, principal)
