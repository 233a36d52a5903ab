"""Scope checks for API views: each view names the scope each HTTP method needs."""

from __future__ import annotations

from rest_framework.exceptions import NotAuthenticated, PermissionDenied
from rest_framework.permissions import BasePermission

from tuneplex.core.actors import Principal


class HasScope(BasePermission):
    """Allows a request when its principal holds the scope the view maps the method to.

    Views declare ``scopes = {"GET": "read", "POST": "train"}``. A method the view does not
    list is refused: forgetting to declare a scope fails closed.
    """

    def has_permission(self, request, view) -> bool:
        if getattr(view, "public", False):
            return True
        principal = request.auth
        if not isinstance(principal, Principal):
            raise NotAuthenticated(
                "Authentication required: send 'Authorization: Bearer <api key>' or sign in."
            )
        method = "GET" if request.method in ("HEAD", "OPTIONS") else request.method
        needed = getattr(view, "scopes", {}).get(method)
        if needed is None and not hasattr(view, request.method.lower()):
            return True  # the view answers 405 Method Not Allowed
        if needed is None:
            raise PermissionDenied(f"{request.method} is not allowed here.")
        if not principal.has_scope(needed):
            who = "This API key" if principal.api_key is not None else "Your role"
            raise PermissionDenied(f"{who} lacks the '{needed}' scope needed for this request.")
        return True
