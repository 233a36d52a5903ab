from django.conf import settings
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.http import Http404
from django.shortcuts import redirect, render
from django.views.decorators.http import require_POST

from tuneplex.adapters import selectors as adapter_selectors
from tuneplex.basemodels.models import BaseModel
from tuneplex.core.actors import Principal
from tuneplex.core.errors import ApiError
from tuneplex.core.scopes import INFER, TRAIN
from tuneplex.inference.pools import is_loaded
from tuneplex.inference.services import adapter_deploy, adapter_undeploy
from tuneplex.tenancy.selectors import membership_for
from tuneplex.tenancy.sessions import active_membership, switch_organization


def _principal(request, scope: str | None = None) -> Principal:
    """The signed-in user acting in their active organization; 403 without ``scope``."""
    membership = active_membership(request)
    if membership is None:
        raise PermissionDenied("You are not a member of any organization.")
    if scope is not None and scope not in membership.scopes:
        raise PermissionDenied(f"Your role ({membership.role}) cannot do this.")
    return Principal.of_member(membership)


def _adapter_row(request, principal: Principal, adapter, error: str = ""):
    return render(request, "frontend/_adapter_row.html", {
        "adapter": adapter, "loaded": adapter.deployed and is_loaded(adapter), "error": error,
        "can_deploy": TRAIN in principal.scopes})


@login_required
def adapters(request):
    principal = _principal(request)
    rows = [{"adapter": a, "loaded": a.deployed and is_loaded(a)}
            for a in adapter_selectors.adapter_list(organization=principal.organization)[:200]]
    return render(request, "frontend/adapters.html", {"rows": rows, "can_deploy": TRAIN in principal.scopes})


def _adapter(principal: Principal, adapter_id: str):
    """The organization's adapter; another organization's is a 404 page, like a missing one."""
    try:
        return adapter_selectors.adapter_get(organization=principal.organization, adapter_id=adapter_id)
    except ApiError:
        raise Http404("No such adapter.") from None


@login_required
@require_POST
def adapter_deploy_view(request, id: str):
    principal = _principal(request, TRAIN)
    adapter = _adapter(principal, id)
    error = ""
    try:
        adapter = adapter_deploy(organization=principal.organization, actor=principal, adapter=adapter,
                                 pinned=request.POST.get("pinned") == "on")
    except ApiError as exc:
        error = exc.message
        adapter.refresh_from_db()
    return _adapter_row(request, principal, adapter, error)


@login_required
@require_POST
def adapter_undeploy_view(request, id: str):
    principal = _principal(request, TRAIN)
    adapter = _adapter(principal, id)
    adapter = adapter_undeploy(organization=principal.organization, actor=principal, adapter=adapter)
    return _adapter_row(request, principal, adapter)


@login_required
def playground(request):
    """Chat with an adapter, side by side with the base model or another adapter (streamed)."""
    principal = _principal(request)
    bases = [b.name for b in BaseModel.objects.filter(enabled=True, name__in=list(settings.ENGINE_REPLICAS))
             .order_by("name")]
    deployed = [a.name for a in adapter_selectors.adapter_list(organization=principal.organization)
                .filter(deployed=True)]
    models = deployed + bases
    return render(request, "frontend/playground.html", {
        "models": models, "left": request.GET.get("model") or (models[0] if models else ""),
        "right": bases[0] if bases else "", "can_infer": INFER in principal.scopes})


@login_required
def home(request):
    return render(request, "frontend/home.html", {"membership": active_membership(request)})


@login_required
@require_POST
def organization_switch(request):
    organization_id = request.POST.get("organization", "")
    membership = membership_for(user=request.user, organization_id=organization_id)
    if membership is None or membership.organization_id != organization_id:
        raise Http404("No such organization.")
    switch_organization(request, membership)
    return redirect("frontend:home")
