"""The overview: what is running, what is new, and this month's usage against the limits."""

from __future__ import annotations

from django.conf import settings
from django.contrib.auth.decorators import login_required
from django.db.models import Sum
from django.shortcuts import redirect, render
from django.utils import timezone

from frontend.views.common import principal_of
from tuneplex.adapters.selectors import adapter_list
from tuneplex.files.selectors import storage_used
from tuneplex.finetuning.models import FineTuningJob
from tuneplex.finetuning.selectors import job_list
from tuneplex.inference.selectors import usage_since
from tuneplex.tenancy.sessions import active_membership


@login_required
def home(request):
    if active_membership(request) is None:
        return redirect("frontend:invitations")  # not a member anywhere yet
    organization = principal_of(request).organization
    month_start = timezone.now().replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    jobs = job_list(organization=organization)
    active = list(jobs.filter(status__in=FineTuningJob.ACTIVE).order_by("created_at")[:20])
    used = storage_used(organization=organization)
    quota = organization.storage_quota
    trained = (jobs.filter(finished_at__gte=month_start).aggregate(total=Sum("trained_tokens"))
               ["total"] or 0)
    return render(request, "frontend/home.html", {
        "active_jobs": active,
        "running": sum(1 for job in active if job.status == FineTuningJob.Status.RUNNING),
        "max_concurrent": settings.ORG_MAX_CONCURRENT_JOBS,
        "recent_adapters": adapter_list(organization=organization).order_by("-created_at")[:5],
        "recent_jobs": jobs.filter(status__in=FineTuningJob.FINISHED).order_by("-finished_at")[:5],
        "usage": usage_since(organization=organization, start=month_start.date()),
        "month": month_start,
        "trained_tokens": trained,
        "storage_used": used, "storage_quota": quota,
        "storage_percent": min(100, round(100 * used / quota)) if quota else 0,
        "rate_limit": settings.INFERENCE_RATE_LIMIT,
    })
