"""The organization switcher, and invitation links: whoever opens one and signs in may accept or
decline it (the link's token is the proof)."""

from __future__ import annotations

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import Http404
from django.shortcuts import redirect, render
from django.views.decorators.http import require_POST
from tuneplex.core.errors import ApiError
from tuneplex.tenancy.models import Invitation
from tuneplex.tenancy.selectors import invitation_by_token, membership_for
from tuneplex.tenancy.services import invitation_respond
from tuneplex.tenancy.sessions import active_membership, switch_organization

from frontend.views.common import get_or_404

_TOKEN_KEY = "tuneplex_invitation_token:"  # + the invitation's id: the link's token, in the session


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
    """Where a signed-in user who belongs to no organization yet lands: how to join one."""
    return render(request, "frontend/invitations.html",
                  {"member_somewhere": active_membership(request) is not None})


def invitation_link(request, token: str):
    """An invitation link as it was given: its token is kept in this browser's session and the
    browser moves on to the invitation's page, so the token leaves the address bar (and with it
    Referer headers and request logs), as Django's password reset does."""
    found = get_or_404(invitation_by_token, token=token)
    request.session[_TOKEN_KEY + found.id] = token
    return redirect("frontend:invitation", id=found.id)


def invitation(request, id: str):
    """The invitation whose link this browser opened. Anyone holding the link sees what it offers;
    a signed-in user accepts or declines it (a POST: opening the link, or a mail scanner
    following it, answers nothing)."""
    found = get_or_404(invitation_by_token, token=request.session.get(_TOKEN_KEY + id, ""))
    if found.id != id:
        raise Http404("No such invitation.")
    context = {"invitation": found, "pending": found.effective_status == Invitation.Status.PENDING}
    if request.method != "POST" or not context["pending"]:
        return render(request, "frontend/invitation.html", context,
                      status=200 if context["pending"] else 410)
    if not request.user.is_authenticated:
        return redirect(request.path)  # the page asks them to sign in first
    accept = request.POST.get("answer") == "accept"
    try:
        membership = invitation_respond(user=request.user, invitation=found, accept=accept)
    except ApiError as exc:
        found.refresh_from_db()
        return render(request, "frontend/invitation.html", {
            **context, "error": exc.message,
            "pending": found.effective_status == Invitation.Status.PENDING}, status=exc.status)
    del request.session[_TOKEN_KEY + id]
    if membership is None:
        return render(request, "frontend/invitation.html", {**context, "declined": True,
                                                            "pending": False})
    if active_membership(request) is None:
        switch_organization(request, membership)  # their first organization: nothing to leave
        messages.success(request, f"You joined {membership.organization.name}.")
    else:
        messages.success(request, f"You joined {membership.organization.name}; switch to it with "
                                  "the organization menu at the top.")
    return redirect("frontend:home")
