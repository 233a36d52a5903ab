"""What every dashboard view shares: who is acting, and objects of their organization only."""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import TypeVar

from django.core.exceptions import PermissionDenied
from django.http import Http404, HttpResponse
from django.shortcuts import render
from django_htmx.http import HttpResponseStopPolling

from tuneplex.core.actors import Principal
from tuneplex.core.errors import ApiError, NotFound
from tuneplex.tenancy.sessions import active_membership

T = TypeVar("T")


def principal_of(request, scope: str | None = None) -> Principal:
    """The signed-in user acting in their active organization; 403 without ``scope``."""
    membership = active_membership(request)
    if membership is None:
        raise PermissionDenied("You are not a member of any organization.")
    if scope is not None and scope not in membership.scopes:
        raise PermissionDenied(f"Your role ({membership.role}) cannot do this.")
    return Principal.of_member(membership)


def get_or_404(selector: Callable[..., T], **kwargs) -> T:
    """A selector's object, or a 404 page: another organization's object looks like a missing one."""
    try:
        return selector(**kwargs)
    except NotFound:
        raise Http404("No such object.") from None


def field_errors(error: ApiError, fields: Collection[str]) -> dict[str, str]:
    """Place an API error on the form field its ``param`` names (else on the form as a whole: "form")."""
    param = error.param or ""
    for prefix in ("hyperparameters.", ""):
        name = param.removeprefix(prefix) if param.startswith(prefix) else None
        if name in fields:
            return {name: error.message}
    return {"form": error.message}


def polled_section(request, template: str, context: dict, *, done: bool) -> HttpResponse:
    """A section htmx polls; once ``done``, status 286 tells htmx to stop polling."""
    response = render(request, template, context)
    if done:
        response.status_code = HttpResponseStopPolling.status_code
    return response
