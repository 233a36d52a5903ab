"""The organization switcher, and the invitations the signed-in user may accept or decline."""

from __future__ import annotations

from django.contrib.auth.decorators import login_required
from django.http import Http404
from django.shortcuts import redirect, render
from django.views.decorators.http import require_POST

from frontend.views.common import get_or_404
from tuneplex.core.errors import ApiError
from tuneplex.tenancy.selectors import (
    invitation_for_user_get,
    invitations_for_user,
    membership_for,
)
from tuneplex.tenancy.services import invitation_respond
from tuneplex.tenancy.sessions import active_membership, switch_organization


@login_required
@require_POST
def organization_switch(request):
    organization_id = request.POST.get("organization", "")
    membership = membership_for(user=request.user, organization_id=organization_id)
    if membership is None or membership.organization_id != organization_id:
        raise Http404("No such organization.")
    switch_organization(request, membership)
    return redirect("frontend:home")


@login_required
def invitations(request):
    """The signed-in user's pending invitations, to accept or decline."""
    return render(request, "frontend/invitations.html", {
        "invitations": invitations_for_user(user=request.user),
        "member_somewhere": active_membership(request) is not None})


@login_required
@require_POST
def invitation_respond_view(request, id: str):
    invitation = get_or_404(invitation_for_user_get, user=request.user, invitation_id=id)
    accept = request.POST.get("answer") == "accept"
    try:
        membership = invitation_respond(user=request.user, invitation=invitation, accept=accept)
    except ApiError as exc:
        return render(request, "frontend/invitations.html", {
            "invitations": invitations_for_user(user=request.user), "error": exc.message,
            "member_somewhere": active_membership(request) is not None}, status=exc.status)
    if membership is not None and active_membership(request) is None:
        switch_organization(request, membership)  # their first organization: nothing to leave
    return redirect("frontend:invitations")
