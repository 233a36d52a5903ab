"""The organization switcher."""

from __future__ import annotations

from django.contrib.auth.decorators import login_required
from django.http import Http404
from django.shortcuts import redirect
from django.views.decorators.http import require_POST

from tuneplex.tenancy.selectors import membership_for
from tuneplex.tenancy.sessions import switch_organization


@login_required
@require_POST
def organization_switch(request):
    organization_id = request.POST.get("organization", "")
    membership = membership_for(user=request.user, organization_id=organization_id)
    if membership is None or membership.organization_id != organization_id:
        raise Http404("No such organization.")
    switch_organization(request, membership)
    return redirect("frontend:home")
