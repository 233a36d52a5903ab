"""Eval-gated deploys: what happens to an adapter once its job succeeded.

    job succeeded ──(on commit, signal finetuning.signals.adapter_trained)──> after_training(adapter)
        no gate for its family:  deployed as before (the organization's auto-deploy setting)
        a gate:                  two runs of the gate's eval: the candidate (not deployed yet)
                                 and the incumbent (the family's adapter deployed most recently,
                                 or the base model); when both have ended: decide()
    decide(): deployed if the candidate's statistic beats the incumbent's by the margin,
              else left undeployed; the decision and its figures are job events.

The candidate is served for its run's requests only: the pool loads it for their leases and
unloads it at its next reconciliation, since it is not deployed.
"""

from __future__ import annotations

import logging

from django.db import transaction
from django.utils import timezone

from tuneplex.adapters.models import Adapter
from tuneplex.core.actors import Principal
from tuneplex.core.errors import ApiError
from tuneplex.evals import services
from tuneplex.evals.models import DeployGate, EvalRun, GateDecision
from tuneplex.finetuning.services.lifecycle import job_event
from tuneplex.inference.pools import serves
from tuneplex.inference.services import adapter_auto_deploy

log = logging.getLogger(__name__)

ENDED = (EvalRun.Status.COMPLETED, EvalRun.Status.FAILED, EvalRun.Status.CANCELED)


def gate_for(adapter: Adapter, *, suffix: str | None = None) -> DeployGate | None:
    """The enabled gate of the adapter's family: its suffix's own (or ``suffix``'s: a sweep's
    trials are named after the sweep's), else its base model's."""
    gates = DeployGate.objects.filter(organization_id=adapter.organization_id, enabled=True,
                                      base_model_id=adapter.base_model_id).select_related("eval")
    if suffix is None:
        suffix = adapter.job.suffix if adapter.job_id else ""
    return gates.filter(suffix=suffix).first() or gates.filter(suffix="").first()


def incumbent_for(adapter: Adapter, gate: DeployGate) -> str:
    """The family's adapter deployed most recently, or the base model."""
    family = Adapter.objects.filter(organization_id=adapter.organization_id, deployed=True,
                                    base_model_id=adapter.base_model_id).exclude(pk=adapter.pk)
    if gate.suffix:
        family = family.filter(job__suffix=gate.suffix)
    current = family.order_by("-deployed_at", "-created_at").first()
    return current.name if current is not None else adapter.base_model.name


def on_adapter_trained(sender, *, adapter_id: str, **kwargs) -> None:
    after_training(adapter_id)


def after_training(adapter_id: str) -> str:
    """Gate the new adapter, or deploy it as the organization's setting says (in the process that
    finished the job, after its commit)."""
    adapter = (Adapter.objects.select_related("organization", "base_model", "job")
               .filter(pk=adapter_id).first())
    if adapter is None or adapter.deployed or GateDecision.objects.filter(adapter=adapter).exists():
        return "nothing to do"  # deleted, deployed by hand, or a message delivered twice
    sweep = (adapter.job.metadata or {}).get("sweep_id")
    if sweep:  # one trial of many: the sweep deploys its best when asked to (deploy_best)
        job_event(adapter.job, f"Adapter not deployed: it is a trial of sweep {sweep}, which "
                               "deploys its best trial if it was created with deploy_best.")
        return "sweep trial"
    gate = gate_for(adapter)
    if gate is None:
        return _deploy(adapter, gated=False)
    return gate_start(gate, adapter)


def _deploy(adapter: Adapter, *, gated: bool) -> str:
    """Deploy as after any job, and say so in its events (or why not)."""
    not_deployed = adapter_auto_deploy(adapter, gated=gated)
    if not_deployed is None:
        job_event(adapter.job, f"Adapter deployed: use model '{adapter.name}' on "
                               "/v1/chat/completions.")
        return "deployed"
    if gated:
        job_event(adapter.job, f"The deploy gate passed but the adapter could not be deployed: "
                               f"{not_deployed}", level="warning")
    elif adapter.organization.auto_deploy:
        job_event(adapter.job, f"Adapter not deployed automatically: {not_deployed}",
                  level="warning")
    return "not deployed"


def gate_start(gate: DeployGate, adapter: Adapter) -> str:
    incumbent = incumbent_for(adapter, gate)
    system = Principal(organization=adapter.organization, scopes=frozenset())
    with transaction.atomic():
        decision, created = GateDecision.objects.get_or_create(
            adapter=adapter, defaults={"gate": gate, "incumbent": incumbent})
    if not created:
        return "already gated"
    if not serves(adapter.base_model.name):
        return _fail(decision, f"no engine replica serves {adapter.base_model.name}")
    runs = {}
    try:
        for role, model in (("candidate", adapter.name), ("incumbent", incumbent)):
            runs[role] = services.comparison_run(
                organization=adapter.organization, eval=gate.eval, data_source=gate.data_source,
                model=model, name=f"gate {gate.id}: {role} {model}",
                metadata={"gate": gate.id, "adapter": adapter.id, "role": role},
                undeployed_ok=role == "candidate")
    except ApiError as exc:
        for run in runs.values():
            services.eval_run_cancel(organization=adapter.organization, actor=system, run=run)
        return _fail(decision, f"its eval runs could not start: {exc.message}")
    GateDecision.objects.filter(pk=decision.pk).update(candidate_run=runs["candidate"],
                                                       incumbent_run=runs["incumbent"])
    job_event(adapter.job, f"Evaluating {adapter.name} against {incumbent} with eval "
                           f"'{gate.eval.name or gate.eval.id}' before deploying it (deploy gate "
                           f"{gate.id}).", data={"gate": gate.id, "candidate_run": runs["candidate"].id,
                                                 "incumbent_run": runs["incumbent"].id})
    return "evaluating"


def _fail(decision: GateDecision, reason: str) -> str:
    GateDecision.objects.filter(pk=decision.pk).update(status=GateDecision.Status.FAILED,
                                                       decided_at=timezone.now(),
                                                       figures={"reason": reason})
    job_event(decision.adapter.job, f"Not deployed: the deploy gate could not evaluate "
                                    f"{decision.adapter.name}: {reason}.", level="warning")
    return "failed"


def run_ended(run_id: str) -> None:
    """After a run ends (completed, failed or canceled): decide its gate if both runs ended."""
    decision = (GateDecision.objects.filter(status=GateDecision.Status.EVALUATING)
                .filter(candidate_run_id=run_id).first()
                or GateDecision.objects.filter(status=GateDecision.Status.EVALUATING)
                .filter(incumbent_run_id=run_id).first())
    if decision is not None:
        decide(decision.pk)


def decide(decision_id: int) -> str | None:
    with transaction.atomic(durable=True):
        decision = (GateDecision.objects.select_for_update(of=("self",)).select_related(
            "gate", "adapter", "adapter__job", "candidate_run", "incumbent_run")
            .filter(pk=decision_id, status=GateDecision.Status.EVALUATING).first())
        if decision is None:
            return None
        candidate, incumbent = decision.candidate_run, decision.incumbent_run
        if candidate is None or incumbent is None:  # a run was deleted
            status, figures = GateDecision.Status.FAILED, {"reason": "a run of the gate was deleted"}
            message = f"Not deployed: a run of the deploy gate of {decision.adapter.name} was deleted."
        elif candidate.status in ENDED and incumbent.status in ENDED:
            status, figures, message = _verdict(decision, candidate, incumbent)
        else:
            return None
        decision.status, decision.figures, decision.decided_at = status, figures, timezone.now()
        decision.save()
        job_event(decision.adapter.job, message, data=figures,
                  level="info" if status == GateDecision.Status.DEPLOYED else "warning")
        if status == GateDecision.Status.DEPLOYED:
            adapter_id = decision.adapter_id
            transaction.on_commit(lambda: _deploy_winner(adapter_id))
    return status


def _verdict(decision: GateDecision, candidate: EvalRun, incumbent: EvalRun):
    gate = decision.gate
    name = decision.adapter.name
    if candidate.status != EvalRun.Status.COMPLETED or incumbent.status != EvalRun.Status.COMPLETED:
        failed = candidate if candidate.status != EvalRun.Status.COMPLETED else incumbent
        reason = (failed.error or {}).get("message") or failed.status
        return (GateDecision.Status.FAILED, {"reason": reason, "run": failed.id},
                f"Not deployed: the deploy gate's run {failed.id} ended {failed.status} ({reason}).")
    mine = (candidate.statistics.get(gate.criterion) or {}).get(gate.statistic) or {}
    theirs = (incumbent.statistics.get(gate.criterion) or {}).get(gate.statistic) or {}
    if mine.get("estimate") is None or theirs.get("estimate") is None:
        return (GateDecision.Status.FAILED, {"reason": "no item was graded", "candidate": mine,
                                             "incumbent": theirs},
                f"Not deployed: the deploy gate graded no item of {name} or {decision.incumbent} "
                f"on '{gate.criterion}'.")
    difference = mine["estimate"] - theirs["estimate"]
    figures = {"criterion": gate.criterion, "statistic": gate.statistic, "margin": gate.margin,
               "candidate": mine, "incumbent": theirs, "incumbent_model": decision.incumbent,
               "difference": difference, "candidate_run": candidate.id,
               "incumbent_run": incumbent.id}
    shown = (f"{gate.statistic} on '{gate.criterion}': {mine['estimate']:.3f} "
             f"[{mine['low']:.3f}, {mine['high']:.3f}] against {decision.incumbent}'s "
             f"{theirs['estimate']:.3f} [{theirs['low']:.3f}, {theirs['high']:.3f}]")
    if difference > 0 and difference >= gate.margin:
        return (GateDecision.Status.DEPLOYED, figures,
                f"Deploy gate passed, deploying {name}: {shown} (margin {gate.margin:g}).")
    return (GateDecision.Status.REFUSED, figures,
            f"Not deployed: {name} is not better by the deploy gate's margin of {gate.margin:g}: "
            f"{shown}.")


def _deploy_winner(adapter_id: str) -> None:
    adapter = Adapter.objects.select_related("organization", "base_model", "job").get(pk=adapter_id)
    _deploy(adapter, gated=True)
