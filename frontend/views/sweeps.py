"""Hyperparameter sweeps: the list, and a sweep's page (what it searches and scores by, its trials
table and their validation-loss curves overlaid, the best trial marked), polled until the sweep has
ended, with a cancel button. Sweeps are created through the API (POST /v1/sweeps)."""

from __future__ import annotations

from django.contrib.auth.decorators import login_required
from django.shortcuts import render
from django.views.decorators.http import require_POST
from tuneplex.adapters.selectors import adapter_list
from tuneplex.core.errors import ApiError
from tuneplex.core.scopes import TRAIN
from tuneplex.sweeps import selectors, services
from tuneplex.sweeps.models import Sweep, SweepTrial

from frontend.views.common import get_or_404, polled_section, principal_of

POLL_SECONDS = 3
# Badges in the colours the job pages use for the same meaning.
BADGES = {"complete": "succeeded", "completed": "succeeded", "pruned": "cancelled",
          "waiting": "running"}


@login_required
def sweeps(request):
    principal = principal_of(request)
    rows = selectors.sweep_list(organization=principal.organization).order_by("-created_at")[:200]
    return render(request, "frontend/sweeps.html", {
        "sweeps": [(sweep, BADGES.get(sweep.status, sweep.status), sorted(sweep.search_space))
                   for sweep in rows]})


def _context(principal, sweep: Sweep) -> dict:
    trials = list(selectors.trial_list(sweep=sweep))
    finished = sweep.status != Sweep.Status.RUNNING
    curves = {"best": sweep.best_trial.number if sweep.best_trial_id else None, "trials": [
        {"number": t.number, "state": t.state,
         "label": f"#{t.number} " + ", ".join(f"{k}={_short(v)}" for k, v in sorted(t.params.items())),
         "points": [{"x": step, "y": value} for step, value in t.intermediate_values]}
        for t in trials]}
    ended = [t for t in trials if t.state not in SweepTrial.ACTIVE]
    # By name: PostgreSQL's jsonb keeps its own key order (shortest first), not the request's.
    return {"sweep": sweep, "badge": BADGES.get(sweep.status, sweep.status),
            "search_space": sorted(sweep.search_space.items()),
            "template": sorted(sweep.hyperparameters.items()),
            "trials": [(t, BADGES.get(t.state, t.state), sorted(t.params.items())) for t in trials],
            "ended": len(ended), "curves": curves, "finished": finished,
            "parallel": selectors.parallel_limit(sweep=sweep), "poll_seconds": POLL_SECONDS,
            "can_cancel": TRAIN in principal.scopes and not finished,
            "score_label": _score_label(sweep), "best_adapter": _best_adapter(sweep)}


def _score_label(sweep: Sweep) -> str:
    if sweep.metric == Sweep.Metric.EVAL:
        return f"{sweep.eval_statistic.replace('_', ' ')} on '{sweep.eval_criterion}'"
    return "validation loss"


def _best_adapter(sweep: Sweep):
    if not sweep.best_trial_id or not sweep.best_trial.job_id:
        return None
    return adapter_list(organization=sweep.organization).filter(job_id=sweep.best_trial.job_id).first()


def _short(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


@login_required
def sweep(request, id: str):
    principal = principal_of(request)
    found = get_or_404(selectors.sweep_get, organization=principal.organization, sweep_id=id)
    return render(request, "frontend/sweep.html", _context(principal, found))


@login_required
def sweep_progress(request, id: str):
    """The live part of the sweep page; 286 stops htmx polling once the sweep has ended."""
    principal = principal_of(request)
    found = get_or_404(selectors.sweep_get, organization=principal.organization, sweep_id=id)
    context = _context(principal, found)
    return polled_section(request, "frontend/sweep.html#progress", context,
                          done=context["finished"])


@login_required
@require_POST
def sweep_cancel(request, id: str):
    principal = principal_of(request, TRAIN)
    found = get_or_404(selectors.sweep_get, organization=principal.organization, sweep_id=id)
    error = ""
    try:
        found = services.sweep_cancel(organization=principal.organization, actor=principal,
                                      sweep=found)
    except ApiError as exc:
        error = exc.message
    found = selectors.sweep_get(organization=principal.organization, sweep_id=id)
    return render(request, "frontend/sweep.html#progress",
                  _context(principal, found) | {"cancel_error": error})
