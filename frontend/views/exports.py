"""The adapter page: what the adapter is, and its Export panel (a format and quantization to
export in, its exports with their status, progress, check and download; the panel polls while
one is in flight)."""

from __future__ import annotations

from django.contrib.auth.decorators import login_required
from django.shortcuts import render
from django.views.decorators.http import require_POST

from frontend.views.common import get_or_404, polled_section, principal_of
from jobs.export import formats
from tuneplex.adapters import selectors as adapter_selectors
from tuneplex.core.actors import Principal
from tuneplex.core.errors import ApiError
from tuneplex.core.scopes import TRAIN
from tuneplex.exports import selectors, services
from tuneplex.exports.models import Export

POLL_SECONDS = 2
EXPORTS_SHOWN = 50


def export_choices() -> list[dict]:
    """The select's option groups: each format, its quantizations (the default first)."""
    return [{"format": spec.name, "summary": spec.summary, "options": [
        {"value": f"{spec.name}:{quantization}", "label": f"{spec.name} · {quantization}"
         + (" (default)" if quantization == spec.default_quantization else "")}
        for quantization in spec.quantizations] or [{"value": f"{spec.name}:",
                                                     "label": spec.name}]}
        for spec in formats.FORMATS.values()]


def _panel_context(principal: Principal, adapter, **extra) -> dict:
    exports = list(selectors.export_list(organization=principal.organization, adapter=adapter)
                   .order_by("-created_at")[:EXPORTS_SHOWN])
    return {"adapter": adapter, "exports": exports, "choices": export_choices(),
            "can_export": TRAIN in principal.scopes, "poll_seconds": POLL_SECONDS,
            "in_flight": any(e.status in Export.IN_FLIGHT for e in exports), **extra}


def _adapter(principal: Principal, adapter_id: str):
    return get_or_404(adapter_selectors.adapter_get, organization=principal.organization,
                      adapter_id=adapter_id)


@login_required
def adapter_page(request, id: str):
    principal = principal_of(request)
    adapter = _adapter(principal, id)
    return render(request, "frontend/adapter.html", _panel_context(principal, adapter))


@login_required
def adapter_exports(request, id: str):
    """The Export panel, polled while an export is in flight; 286 stops htmx polling."""
    principal = principal_of(request)
    context = _panel_context(principal, _adapter(principal, id))
    return polled_section(request, "frontend/adapter.html#exports", context,
                          done=not context["in_flight"])


@login_required
@require_POST
def adapter_export_create(request, id: str):
    principal = principal_of(request, TRAIN)
    adapter = _adapter(principal, id)
    format_name, _, quantization = request.POST.get("kind", "").partition(":")
    error = ""
    try:
        services.export_create(organization=principal.organization, actor=principal,
                               adapter=adapter, format=format_name,
                               quantization=quantization or None)
    except ApiError as exc:
        error = exc.message
    return render(request, "frontend/adapter.html#exports",
                  _panel_context(principal, adapter, error=error))


@login_required
@require_POST
def adapter_export_delete(request, id: str, export_id: str):
    principal = principal_of(request, TRAIN)
    adapter = _adapter(principal, id)
    export = get_or_404(selectors.export_get, organization=principal.organization,
                        adapter=adapter, export_id=export_id)
    services.export_delete(organization=principal.organization, actor=principal, export=export)
    return render(request, "frontend/adapter.html#exports", _panel_context(principal, adapter))
