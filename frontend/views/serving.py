"""Adapters (deploy, undeploy, download), the playground, and the feedback it collects (the
playground rates answers through POST /v1/feedback)."""

from __future__ import annotations

from django.conf import settings
from django.contrib.auth.decorators import login_required
from django.shortcuts import redirect, render
from django.views.decorators.http import require_POST

from frontend.views.common import get_or_404, principal_of
from tuneplex.adapters import selectors as adapter_selectors
from tuneplex.basemodels.selectors import served_base_models
from tuneplex.core.actors import Principal
from tuneplex.core.errors import ApiError
from tuneplex.core.scopes import INFER, TRAIN
from tuneplex.feedback import selectors as feedback_selectors
from tuneplex.feedback.services import (
    feedback_export,
    preference_export,
    preference_exportable_count,
)
from tuneplex.inference.pools import is_loaded
from tuneplex.inference.services import adapter_deploy, adapter_undeploy


def _adapter_row(request, principal: Principal, adapter, error: str = ""):
    return render(request, "frontend/adapters.html#adapter-row", {
        "adapter": adapter, "loaded": adapter.deployed and is_loaded(adapter), "error": error,
        "can_deploy": TRAIN in principal.scopes})


@login_required
def adapters(request):
    principal = principal_of(request)
    rows = [{"adapter": a, "loaded": a.deployed and is_loaded(a)}
            for a in adapter_selectors.adapter_list(organization=principal.organization)
            .order_by("-created_at")[:200]]
    return render(request, "frontend/adapters.html", {"rows": rows,
                                                      "can_deploy": TRAIN in principal.scopes})


@login_required
@require_POST
def adapter_deploy_view(request, id: str):
    principal = principal_of(request, TRAIN)
    adapter = get_or_404(adapter_selectors.adapter_get, organization=principal.organization,
                         adapter_id=id)
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
    principal = principal_of(request, TRAIN)
    adapter = get_or_404(adapter_selectors.adapter_get, organization=principal.organization,
                         adapter_id=id)
    adapter = adapter_undeploy(organization=principal.organization, actor=principal, adapter=adapter)
    return _adapter_row(request, principal, adapter)


def served_models(organization) -> tuple[list[str], list[str]]:
    """What the organization can ask now: its deployed adapters (newest first) and the base
    models an engine serves (the playground's and the eval run form's choices)."""
    bases = [b.name for b in served_base_models()]
    deployed = [a.name for a in adapter_selectors.adapter_list(organization=organization)
                .filter(deployed=True).order_by("-created_at")]
    return deployed, bases


@login_required
def playground(request):
    """Chat with an adapter, side by side with the base model or another adapter (streamed)."""
    principal = principal_of(request)
    deployed, bases = served_models(principal.organization)
    models = deployed + bases
    return render(request, "frontend/playground.html", {
        "models": models, "left": request.GET.get("model") or (models[0] if models else ""),
        "right": bases[0] if bases else "", "can_infer": INFER in principal.scopes,
        "max_tokens": settings.INFERENCE_MAX_TOKENS, "can_compare": INFER in principal.scopes})


def _feedback_context(principal: Principal, **extra) -> dict:
    organization = principal.organization
    return {"rows": feedback_selectors.feedback_list(organization=organization)[:200],
            "exportable": feedback_selectors.feedback_exportable(organization=organization).count(),
            "minimum": settings.DATASET_MIN_EXAMPLES, "can_export": TRAIN in principal.scopes,
            "comparisons": feedback_selectors.comparison_list(organization=organization)[:200],
            "preference_exportable": preference_exportable_count(organization=organization),
            **extra}


@login_required
def feedback(request):
    return render(request, "frontend/feedback.html", _feedback_context(principal_of(request)))


def _export(request, export, error_key: str):
    principal = principal_of(request, TRAIN)
    try:
        file = export(organization=principal.organization, actor=principal)
    except ApiError as exc:
        return render(request, "frontend/feedback.html",
                      _feedback_context(principal, **{error_key: exc.message}), status=exc.status)
    return redirect("frontend:dataset", id=file.id)


@login_required
@require_POST
def feedback_export_view(request):
    return _export(request, feedback_export, "error")


@login_required
@require_POST
def preference_export_view(request):
    """"Create a preference dataset": the comparisons and 👍/👎 pairs as a DPO file."""
    return _export(request, preference_export, "preference_error")
