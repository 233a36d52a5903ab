"""Datasets: upload (to /v1/files, with a progress bar), list, and a detail page with the
validation report, the token statistics and histogram, and a preview of the first examples."""

from __future__ import annotations

from django.conf import settings
from django.contrib.auth.decorators import login_required
from django.shortcuts import redirect, render
from django.views.decorators.http import require_POST

from frontend.views.common import get_or_404, polled_section, principal_of
from tuneplex.core.errors import ApiError
from tuneplex.core.scopes import TRAIN
from tuneplex.files import selectors, services
from tuneplex.files.models import File

PREVIEW_EXAMPLES = 5
STATISTICS_SETTLED = (File.StatisticsStatus.READY, File.StatisticsStatus.FAILED,
                      File.StatisticsStatus.NONE)


@login_required
def datasets(request):
    principal = principal_of(request)
    files = selectors.file_list(organization=principal.organization).order_by("-created_at")
    used = selectors.storage_used(organization=principal.organization)
    return render(request, "frontend/datasets.html", {
        "files": files[:200], "can_upload": TRAIN in principal.scopes,
        "max_bytes": settings.FILE_UPLOAD_MAX_BYTES, "storage_used": used,
        "storage_quota": principal.organization.storage_quota})


def _histogram(file: File) -> list[dict]:
    return ((file.statistics or {}).get("token_length") or {}).get("histogram") or []


def _detail_context(file: File, **extra) -> dict:
    return {"file": file, "report": file.validation or {}, "stats": file.statistics or {},
            "histogram": _histogram(file), "settled": file.statistics_status in STATISTICS_SETTLED,
            **extra}


@login_required
def dataset(request, id: str):
    principal = principal_of(request)
    file = get_or_404(selectors.file_get, organization=principal.organization, file_id=id)
    preview, preview_error = [], ""
    try:
        preview = selectors.file_preview(file=file, limit=PREVIEW_EXAMPLES)
    except OSError as exc:  # storage unreachable: the rest of the page still shows
        preview_error = f"The file could not be read: {exc}"
    return render(request, "frontend/dataset.html", _detail_context(
        file, preview=preview, preview_error=preview_error, can_delete=TRAIN in principal.scopes,
        used_by=services.file_in_use_by(file)))


@login_required
def dataset_statistics(request, id: str):
    """The statistics section, polled while the worker computes them; polling stops after."""
    principal = principal_of(request)
    file = get_or_404(selectors.file_get, organization=principal.organization, file_id=id)
    context = _detail_context(file)
    return polled_section(request, "frontend/dataset.html#statistics", context,
                          done=context["settled"])


@login_required
@require_POST
def dataset_delete(request, id: str):
    principal = principal_of(request, TRAIN)
    file = get_or_404(selectors.file_get, organization=principal.organization, file_id=id)
    try:
        services.file_delete(organization=principal.organization, actor=principal, file=file)
    except ApiError as exc:
        return render(request, "frontend/dataset.html", _detail_context(
            file, preview=[], can_delete=True, delete_error=exc.message,
            used_by=services.file_in_use_by(file)), status=exc.status)
    return redirect("frontend:datasets")
