"""An eval run's page: its progress followed live (polled until the run ends), its statistics
(each pass rate and mean score with its 95% interval), its events, cancel, and its items side
by side (input, output, reference, each grader's verdict), filtered to failures and paged."""

from __future__ import annotations

import json

from django.contrib.auth.decorators import login_required
from django.core.paginator import Paginator
from django.shortcuts import render
from django.views.decorators.http import require_POST
from django_htmx.http import trigger_client_event

from frontend.views.common import get_or_404, polled_section, principal_of
from frontend.views.evals import POLL_SECONDS, run_row
from tuneplex.core.errors import ApiError
from tuneplex.core.scopes import INFER
from tuneplex.evals import selectors, services
from tuneplex.evals.models import EvalOutputItem, EvalRun

ITEMS_PAGE = 20
EVENTS_SHOWN = 100
# The items filter: query value → (label, statuses shown; None: all).
FILTERS = {"all": ("All items", None),
           "failing": ("Failures and errors", (EvalOutputItem.Status.FAIL, EvalOutputItem.Status.ERROR)),
           "fail": ("Failures", (EvalOutputItem.Status.FAIL,)),
           "error": ("Errors", (EvalOutputItem.Status.ERROR,)),
           "tie": ("Ties (pairwise)", (EvalOutputItem.Status.TIE,))}
RUN_ENDED = "eval-run-ended"  # the client event that reloads the items once the run is over


def _run(principal, eval_id: str, run_id: str) -> EvalRun:
    found = get_or_404(selectors.eval_get, organization=principal.organization, eval_id=eval_id)
    return get_or_404(selectors.run_get, eval=found, run_id=run_id)


def _statistics(run: EvalRun) -> list[dict]:
    """Per criterion, in the eval's order: the counts so far and, once the run has ended, the
    pass rate and mean score with their intervals."""
    if run.data_source.get("type") == "pairwise":
        return []  # the eval's criteria are not applied: the comparison is shown instead
    counts = {row["testing_criteria"]: row for row in run.per_testing_criteria_results or []}
    rows = []
    for criterion in run.eval.testing_criteria:
        name = criterion["name"]
        figures = (run.statistics or {}).get(name) or {}
        row = counts.get(name) or {}
        rows.append({"name": name, "type": criterion["type"], "passed": row.get("passed", 0),
                     "failed": row.get("failed", 0), "errored": row.get("errored", 0),
                     "pass_rate": figures.get("pass_rate"), "mean_score": figures.get("mean_score")})
    return rows


def _pairwise(run: EvalRun) -> dict | None:
    """A pairwise run's comparison: the two models, and (once it has ended) wins, losses, ties
    and the first model's win rate with its interval; the counts so far before that."""
    if run.data_source.get("type") != "pairwise":
        return None
    figures = (run.statistics or {}).get("pairwise")
    counts = (run.per_testing_criteria_results or [{}])[0]
    return {"first": run.data_source["models"][0], "second": run.data_source["models"][1],
            "judge": run.data_source["judge"]["model"], "figures": figures,
            "wins_so_far": counts.get("passed", 0), "errored_so_far": counts.get("errored", 0)}


def _progress_context(principal, run: EvalRun) -> dict:
    finished = run.status not in EvalRun.ACTIVE
    return {**run_row(run), "eval": run.eval, "finished": finished, "poll_seconds": POLL_SECONDS,
            "statistics": _statistics(run), "usage": run.per_model_usage or [],
            "pairwise": _pairwise(run),
            "events": list(reversed(run.events or []))[:EVENTS_SHOWN],
            "can_cancel": INFER in principal.scopes and not finished}


def _text(message_content) -> str:
    if isinstance(message_content, str):
        return message_content
    return json.dumps(message_content, ensure_ascii=False)


def _item_view(item: EvalOutputItem) -> dict:
    """An output item as the page shows it: what was asked, answered and expected, and each
    grader's verdict."""
    sample = item.sample or {}
    output = sample.get("output") or []
    verdicts = []
    for result in item.results or []:
        judged = result.get("sample") or {}
        error = result.get("error") or None
        verdicts.append({"name": result.get("name"), "type": result.get("type"),
                         "status": "error" if error else "tie" if result.get("winner") == "tie"
                         else "pass" if result.get("passed") else "fail",
                         "score": result.get("score"), "error": error,
                         "said": judged.get("label") or judged.get("reason") or _said(result)})
    compared = sample.get("compare") or {}
    other = compared.get("output") or []
    return {"item": item, "input": [{"role": m.get("role"), "content": _text(m.get("content"))}
                                    for m in sample.get("input") or []],
            "output": _text(output[-1].get("content")) if output else "",
            "model": sample.get("model") or "",
            "compare": {"model": compared.get("model"),
                        "output": _text(other[-1].get("content")) if other else "",
                        "error": compared.get("error")} if compared else None,
            "sample_error": sample.get("error") or None,
            "reference": json.dumps(item.datasource_item, indent=2, ensure_ascii=False),
            "verdicts": verdicts}


def _said(result: dict) -> str:
    """A pairwise verdict in words: each reading, and who won."""
    if result.get("type") != "pairwise" or not result.get("verdicts"):
        return ""
    first, second = result["verdicts"]
    winner = {"a": "the first model wins", "b": "the second model wins", "tie": "a tie"}.get(
        result.get("winner"), "")
    return f"first model's answer read first: {first}; read second: {second} — {winner}"


def _items_context(request, run: EvalRun) -> dict:
    chosen = request.GET.get("status", "all")
    chosen = chosen if chosen in FILTERS else "all"
    statuses = FILTERS[chosen][1]
    items = selectors.output_item_list(run=run)
    if statuses is not None:
        items = items.filter(status__in=statuses)
    page = Paginator(items.order_by("datasource_item_id"), ITEMS_PAGE).get_page(
        request.GET.get("page"))
    return {"eval": run.eval, "run": run, "page": page, "chosen": chosen,
            "finished": run.status not in EvalRun.ACTIVE,
            "filters": {key: label for key, (label, _) in FILTERS.items()},
            "rows": [_item_view(item) for item in page]}


@login_required
def eval_run(request, eval_id: str, run_id: str):
    principal = principal_of(request)
    run = _run(principal, eval_id, run_id)
    return render(request, "frontend/eval_run.html",
                  _progress_context(principal, run) | _items_context(request, run))


@login_required
def eval_run_progress(request, eval_id: str, run_id: str):
    """The live part of the run page, polled; once the run has ended, 286 stops the polling and
    the items reload (the client event)."""
    principal = principal_of(request)
    run = _run(principal, eval_id, run_id)
    context = _progress_context(principal, run)
    response = polled_section(request, "frontend/eval_run.html#progress", context,
                              done=context["finished"])
    return trigger_client_event(response, RUN_ENDED) if context["finished"] else response


@login_required
def eval_run_items(request, eval_id: str, run_id: str):
    """The items section: one page of one filter."""
    principal = principal_of(request)
    run = _run(principal, eval_id, run_id)
    return render(request, "frontend/eval_run.html#items", _items_context(request, run))


@login_required
@require_POST
def eval_run_cancel(request, eval_id: str, run_id: str):
    principal = principal_of(request, INFER)
    run = _run(principal, eval_id, run_id)
    error, was_active = "", run.status in EvalRun.ACTIVE
    try:
        run = services.eval_run_cancel(organization=principal.organization, actor=principal, run=run)
    except ApiError as exc:
        error = exc.message
        run.refresh_from_db()
    else:
        if not was_active or run.status != EvalRun.Status.CANCELED:
            error = f"The run had already ended: {run.status}."
    context = _progress_context(principal, run) | {"cancel_error": error}
    response = render(request, "frontend/eval_run.html#progress", context)
    return trigger_client_event(response, RUN_ENDED)
