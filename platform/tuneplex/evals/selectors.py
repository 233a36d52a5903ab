"""Every read of evals, runs and output items: always within one organization (another's is a 404)."""

from __future__ import annotations

from django.db import connection
from django.db.models import QuerySet

from tuneplex.core.errors import ApiError, NotFound
from tuneplex.evals.models import DeployGate, Eval, EvalOutputItem, EvalRun, GateDecision
from tuneplex.tenancy.models import Organization


def eval_list(*, organization: Organization) -> QuerySet[Eval]:
    return Eval.objects.filter(organization=organization)


def eval_get(*, organization: Organization, eval_id: str) -> Eval:
    found = eval_list(organization=organization).filter(id=eval_id).first()
    if found is None:
        raise NotFound(f"No such eval: {eval_id}.", param="eval_id")
    return found


def run_list(*, eval: Eval, status: str | None = None) -> QuerySet[EvalRun]:
    runs = EvalRun.objects.filter(organization_id=eval.organization_id, eval=eval)
    if status is not None:
        if status not in EvalRun.Status.values:
            raise ApiError(f"status must be one of {', '.join(EvalRun.Status.values)}.",
                           code="invalid_value", param="status")
        runs = runs.filter(status=status)
    return runs


def run_get(*, eval: Eval, run_id: str) -> EvalRun:
    found = run_list(eval=eval).filter(id=run_id).select_related("eval").first()
    if found is None:
        raise NotFound(f"No such run of eval {eval.id}: {run_id}.", param="run_id")
    return found


def active_runs(*, organization: Organization) -> int:
    return EvalRun.objects.filter(organization=organization, status__in=EvalRun.ACTIVE).count()


def output_item_list(*, run: EvalRun, status: str | None = None) -> QuerySet[EvalOutputItem]:
    items = EvalOutputItem.objects.filter(organization_id=run.organization_id, run=run)
    if status is not None:
        if status not in EvalOutputItem.Status.values:
            raise ApiError(f"status must be one of {', '.join(EvalOutputItem.Status.values)}.",
                           code="invalid_value", param="status")
        items = items.filter(status=status)
    return items.select_related("run")


def output_item_get(*, run: EvalRun, output_item_id: str) -> EvalOutputItem:
    found = output_item_list(run=run).filter(id=output_item_id).first()
    if found is None:
        raise NotFound(f"No such output item of run {run.id}: {output_item_id}.",
                       param="output_item_id")
    return found


def graded_item_ids(*, run: EvalRun) -> set[int]:
    """The indexes of the run's items already stored: a resumed run skips them."""
    return set(EvalOutputItem.objects.filter(run=run).values_list("datasource_item_id", flat=True))


def gate_list(*, organization: Organization) -> QuerySet[DeployGate]:
    return DeployGate.objects.filter(organization=organization).select_related("eval", "base_model")


def gate_get(*, organization: Organization, gate_id: str) -> DeployGate:
    found = gate_list(organization=organization).filter(id=gate_id).first()
    if found is None:
        raise NotFound(f"No such deploy gate: {gate_id}.", param="gate_id")
    return found


def gate_decisions(*, gate: DeployGate, limit: int = 20) -> list[GateDecision]:
    return list(GateDecision.objects.filter(gate=gate).select_related("adapter")
                .order_by("-created_at")[:limit])


def latest_runs(*, evals: list[Eval]) -> dict[str, EvalRun]:
    """Each eval's most recent run, in one query (eval id -> run)."""
    if not evals:
        return {}
    runs = (EvalRun.objects.filter(organization_id=evals[0].organization_id,
                                   eval_id__in=[e.id for e in evals])
            .order_by("eval_id", "-created_at", "-pk").distinct("eval_id")
            if connection.vendor == "postgresql" else None)
    if runs is None:  # SQLite (the embedded default) has no DISTINCT ON
        latest: dict[str, EvalRun] = {}
        for run in (EvalRun.objects.filter(organization_id=evals[0].organization_id,
                                           eval_id__in=[e.id for e in evals])
                    .order_by("-created_at", "-pk")):
            latest.setdefault(run.eval_id, run)
        return latest
    return {run.eval_id: run for run in runs}
