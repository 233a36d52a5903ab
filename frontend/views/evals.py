"""Evals: the list, the new-eval form (a criteria editor or pasted JSON, each error at its
field), and an eval's page (its criteria, its runs followed live, and the start-a-run form).
A run's own page is in :mod:`frontend.views.eval_runs`."""

from __future__ import annotations

import json

from django.contrib.auth.decorators import login_required
from django.shortcuts import redirect, render
from django.views.decorators.http import require_POST

from frontend.views import eval_forms as forms
from frontend.views.common import get_or_404, polled_section, principal_of
from frontend.views.serving import served_models
from tuneplex.core.errors import ApiError
from tuneplex.core.scopes import INFER
from tuneplex.evals import selectors, services
from tuneplex.evals.models import Eval, EvalRun
from tuneplex.files import services as file_services
from tuneplex.files.models import File
from tuneplex.files.selectors import file_list

POLL_SECONDS = 2
EVALS_SHOWN = 100
RUNS_SHOWN = 50


def run_row(run: EvalRun) -> dict:
    """A run as a row of a table: its figures so far and its share done."""
    counts = run.result_counts or {}
    return {"run": run, "active": run.status in EvalRun.ACTIVE,
            "percent": round(100 * run.items_done / run.items_total) if run.items_total else 0,
            "passed": counts.get("passed", 0), "failed": counts.get("failed", 0),
            "errored": counts.get("errored", 0)}


@login_required
def evals(request):
    principal = principal_of(request)
    shown = list(selectors.eval_list(organization=principal.organization)
                 .order_by("-created_at")[:EVALS_SHOWN])
    latest = selectors.latest_runs(evals=shown)
    rows = [{"eval": found, "criteria": [c["name"] for c in found.testing_criteria],
             "latest": run_row(latest[found.id]) if found.id in latest else None}
            for found in shown]
    return render(request, "frontend/evals.html", {"rows": rows,
                                                   "can_create": INFER in principal.scopes})


# --- a new eval ------------------------------------------------------------------------------------

def _model_choices(principal) -> list[str]:
    deployed, bases = served_models(principal.organization)
    return deployed + bases


def _new_context(principal, *, values: dict, blocks: list, errors: dict) -> dict:
    return {"values": values, "blocks": blocks, "errors": errors, "models": _model_choices(principal),
            "grader_types": forms.GRADER_TYPES, "operations": forms.OPERATIONS,
            "metrics": forms.METRICS, "max_criteria": forms.MAX_EDITOR_CRITERIA}


@login_required
def eval_new(request):
    """GET: the form. POST: an editor button (add, remove, a changed type) redraws the
    criteria; otherwise the eval is created, or the form comes back with each error at its
    field and nothing stored."""
    principal = principal_of(request, INFER)
    models = _model_choices(principal)
    first_model = models[0] if models else ""
    if request.method != "POST":
        return render(request, "frontend/eval_new.html", _new_context(
            principal, values={}, blocks=[forms.new_block(0, model=first_model)], errors={}))
    action = request.POST.get("editor", "")
    if action:
        blocks = forms.edit(forms.editor_blocks(request.POST, model=first_model), action,
                            model=first_model)
        context = _new_context(principal, values=request.POST, blocks=blocks, errors={})
        template = "frontend/eval_new.html#criteria" if request.htmx else "frontend/eval_new.html"
        return render(request, template, context)
    form = forms.read_eval_form(request.POST, model=first_model)
    if form.valid:
        try:
            created = services.eval_create(organization=principal.organization, actor=principal,
                                           **form.arguments())
        except ApiError as exc:
            forms.place_eval_error(form, exc)
        else:
            return redirect("frontend:eval", eval_id=created.id)
    return render(request, "frontend/eval_new.html", _new_context(
        principal, values=request.POST, blocks=form.blocks, errors=form.errors), status=400)


# --- an eval's page --------------------------------------------------------------------------------

def _criterion_summary(criterion: dict) -> str:
    kind = criterion["type"]
    if kind == "string_check":
        return (f"{criterion['input']} {forms.OPERATIONS.get(criterion['operation'])} "
                f"{criterion['reference']}")
    if kind == "text_similarity":
        return (f"{criterion['evaluation_metric']} of {criterion['input']} against "
                f"{criterion['reference']} ≥ {criterion.get('pass_threshold', 0.5):g}")
    if kind == "json_check":
        return f"{criterion['input']} is JSON" + (" matching its schema" if "schema" in criterion
                                                   else "")
    if kind == "label_model":
        return (f"{criterion['model']} labels it ({', '.join(criterion['labels'])}); passing: "
                f"{', '.join(criterion['passing_labels'])}")
    if kind == "score_model":
        low, high = criterion["range"]
        threshold = criterion.get("pass_threshold", (low + high) / 2)
        return f"{criterion['model']} scores it from {low:g} to {high:g}; passes at {threshold:g}"
    return kind


def _runs_context(found: Eval) -> dict:
    rows = [run_row(run) for run in selectors.run_list(eval=found)
            .order_by("-created_at")[:RUNS_SHOWN]]
    return {"eval": found, "runs": rows, "polling": any(row["active"] for row in rows),
            "poll_seconds": POLL_SECONDS}


def _eval_context(principal, found: Eval, *, values: dict | None = None,
                  errors: dict | None = None) -> dict:
    models = _model_choices(principal)
    files = (file_list(organization=principal.organization, purpose=File.Purpose.EVALS)
             .filter(status=File.Status.PROCESSED).order_by("-created_at")[:200])
    criteria = [{"spec": c, "summary": _criterion_summary(c),
                 "json": json.dumps(c, indent=2, ensure_ascii=False)} for c in found.testing_criteria]
    return {**_runs_context(found), "criteria": criteria, "models": models, "files": files,
            "item_schema": json.dumps(found.data_source_config.get("item_schema"), indent=2),
            "values": values or forms.run_defaults(models[0] if models else ""),
            "errors": errors or {}, "can_run": INFER in principal.scopes}


@login_required
def eval_page(request, eval_id: str):
    principal = principal_of(request)
    found = get_or_404(selectors.eval_get, organization=principal.organization, eval_id=eval_id)
    return render(request, "frontend/eval.html", _eval_context(principal, found))


@login_required
def eval_runs(request, eval_id: str):
    """The runs table, polled while a run is queued or in progress; 286 stops htmx polling."""
    principal = principal_of(request)
    found = get_or_404(selectors.eval_get, organization=principal.organization, eval_id=eval_id)
    context = _runs_context(found)
    return polled_section(request, "frontend/eval.html#runs", context, done=not context["polling"])


def _items_file(request, principal, errors: dict) -> str | None:
    """The file of items the run form names: one uploaded now (purpose evals), or one chosen."""
    upload = request.FILES.get("upload")
    if upload is not None:
        try:
            file = file_services.file_create(organization=principal.organization, actor=principal,
                                             upload=upload, purpose=File.Purpose.EVALS,
                                             filename=upload.name)
        except ApiError as exc:
            errors["file"] = exc.message
            return None
        if file.status != File.Status.PROCESSED:
            problems = (file.validation or {}).get("errors") or []
            said = "; ".join(f"line {p.get('line')}: {p.get('message')}" if p.get("line")
                             else p.get("message", "") for p in problems[:3])
            errors["file"] = f"The file {file.filename} is not usable: {said}"
            return None
        return file.id
    return request.POST.get("file_id") or None  # the service reads it in this organization


@login_required
@require_POST
def eval_run_new(request, eval_id: str):
    """Start a run from the eval's page: to the run's page, or the form again with each error
    at its field (no run stored)."""
    principal = principal_of(request, INFER)
    found = get_or_404(selectors.eval_get, organization=principal.organization, eval_id=eval_id)
    errors: dict[str, str] = {}
    file_id = _items_file(request, principal, errors) \
        if request.POST.get("items_from") == "file" else None
    form = forms.read_run_form(request.POST, file_id=file_id)
    form.errors.update(errors)
    status = 400
    if not form.errors:
        try:
            run = services.eval_run_create(organization=principal.organization, actor=principal,
                                           eval=found, data_source=form.data_source,
                                           name=form.values.get("name") or None)
        except ApiError as exc:
            forms.place_run_error(form, exc)
            status = exc.status if 400 <= exc.status < 500 else 400
        else:
            return redirect("frontend:eval-run", eval_id=found.id, run_id=run.id)
    return render(request, "frontend/eval.html", _eval_context(
        principal, found, values=form.values, errors=form.errors), status=status)
