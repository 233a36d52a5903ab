"""Every write a person makes to evals and runs: create, update, delete, start and cancel a run.

The worker's own writes (claims, items, results) are in :mod:`tuneplex.evals.worker_writes`.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from django.conf import settings
from django.db import transaction
from django.db.models.functions import Now
from django.utils import timezone

from jobs.training.jsonl import LineError, iter_lines, parse_line
from tuneplex.audit.services import audit_record
from tuneplex.basemodels.selectors import base_model_get
from tuneplex.core import queue
from tuneplex.core.actors import Principal
from tuneplex.core.errors import ApiError, NotFound
from tuneplex.core.storage import delete_blobs, open_stream, upload_file
from tuneplex.core.storage_layout import eval_run_items_blob
from tuneplex.evals import specs
from tuneplex.evals.models import DeployGate, Eval, EvalRun
from tuneplex.evals.selectors import active_runs
from tuneplex.evals.worker_writes import summarize
from tuneplex.files.models import File
from tuneplex.files.selectors import file_get
from tuneplex.inference.selectors import servable_model
from tuneplex.tenancy.models import Organization


def _creator(actor: Principal):
    return actor.user if actor.api_key is None else actor.api_key.created_by


def _name(value, param: str = "name") -> str:
    if value is None:
        return ""
    if not isinstance(value, str) or len(value) > 300:
        raise ApiError("name must be a string of at most 300 characters.", code="invalid_type",
                       param=param)
    return value


def eval_create(*, organization: Organization, actor: Principal, data_source_config,
                testing_criteria, name=None, metadata=None) -> Eval:
    config = specs.data_source_config(data_source_config)
    criteria = specs.testing_criteria(testing_criteria)
    record = Eval(organization=organization, name=_name(name), data_source_config=config,
                  testing_criteria=criteria, metadata=specs.metadata(metadata),
                  created_by=_creator(actor))
    with transaction.atomic(durable=True):
        record.save(force_insert=True)
        audit_record(actor=actor, action="eval.create", obj=record,
                     metadata={"name": record.name, "criteria": [c["name"] for c in criteria]})
    return record


def eval_update(*, organization: Organization, actor: Principal, eval: Eval, name=None,
                metadata=None) -> Eval:
    """OpenAI's update: the name and the metadata, nothing that would change what runs mean."""
    with transaction.atomic(durable=True):
        locked = Eval.objects.select_for_update().get(pk=eval.pk, organization=organization)
        if name is not None:
            locked.name = _name(name)
        if metadata is not None:
            locked.metadata = specs.metadata(metadata)
        locked.save(update_fields=["name", "metadata", "updated_at"])
        audit_record(actor=actor, action="eval.update", obj=locked, metadata={"name": locked.name})
    return locked


def eval_delete(*, organization: Organization, actor: Principal, eval: Eval) -> None:
    """The eval, its runs (running ones stop at their next write) and their items."""
    with transaction.atomic(durable=True):
        locked = Eval.objects.select_for_update().get(pk=eval.pk, organization=organization)
        blobs = list(locked.runs.values_list("items_blob", flat=True))
        audit_record(actor=actor, action="eval.delete", obj=locked, metadata={"name": locked.name})
        locked.delete()
        transaction.on_commit(lambda: delete_blobs(blobs))


# --- runs ------------------------------------------------------------------------------------------

def eval_run_create(*, organization: Organization, actor: Principal, eval: Eval, data_source,
                    name=None, metadata=None, undeployed_ok: bool = False,
                    system: bool = False) -> EvalRun:
    """Check the source and every item against the eval, copy the items into the run's own blob
    (so the run can resume anywhere, whatever happens to an uploaded file), then store the run
    and enqueue it on commit. Refused with nothing stored when any item does not fit.

    ``undeployed_ok`` and ``system`` are the deploy gate's (never the API's): its candidate is
    not deployed yet, and its runs do not count against TUNEPLEX_ORG_MAX_ACTIVE_EVAL_RUNS."""
    source = specs.run_source(data_source)
    if source.kind in ("completions", "pairwise"):
        servable_model(organization=organization, model=source.model,
                       param="data_source.model" if source.kind == "completions"
                       else "data_source.models[0]", undeployed_ok=undeployed_ok)
    asked = specs.judge_models(eval.testing_criteria) if source.kind != "pairwise" else []
    for model, param in asked + specs.judge_models_of_source(source.stored):
        servable_model(organization=organization, model=model, param=param)
    if not system and active_runs(organization=organization) >= settings.ORG_MAX_ACTIVE_EVAL_RUNS:
        raise ApiError(f"The organization has {settings.ORG_MAX_ACTIVE_EVAL_RUNS} eval runs queued "
                       "or in progress (TUNEPLEX_ORG_MAX_ACTIVE_EVAL_RUNS); wait for one to end or "
                       "cancel one.", code="too_many_active_runs", status=429)
    run = EvalRun(organization=organization, eval=eval, name=_name(name),
                  metadata=specs.metadata(metadata), model=source.model,
                  data_source=source.stored, created_by=_creator(actor),
                  undeployed_ok=undeployed_ok)
    run.items_blob = eval_run_items_blob(organization.id, run.id)
    entries = source.inline if source.inline is not None else \
        _file_entries(organization, source.file_id)
    where = "data_source.source." + ("content" if source.inline is not None else "id")
    run.items_total = _store_items(run.items_blob, entries, kind=source.kind,
                                   item_schema=eval.data_source_config["item_schema"], where=where)
    try:
        with transaction.atomic(durable=True):
            run.save(force_insert=True)
            audit_record(actor=actor, action="eval.run.create", obj=run,
                         metadata={"eval": eval.id, "model": run.model, "items": run.items_total})
            transaction.on_commit(lambda: enqueue_run(run.id))
    except BaseException:
        delete_blobs([run.items_blob])
        raise
    return run


def enqueue_run(run_id: str) -> None:
    EvalRun.objects.filter(pk=run_id, status=EvalRun.Status.QUEUED).update(
        enqueued_at=Now())
    queue.enqueue(queue.EVAL_RUN, run_id)


def _file_entries(organization: Organization, file_id: str) -> Iterator[tuple[str, object]]:
    """(where, entry) of each line of an uploaded evals file, read as a stream."""
    file = file_get(organization=organization, file_id=file_id)
    if file.purpose != File.Purpose.EVALS or file.status != File.Status.PROCESSED:
        raise ApiError(f"File {file_id} is not a processed file of purpose 'evals'.",
                       code="invalid_file", param="data_source.source.id")
    with open_stream(file.blob_name) as stream:
        for number, raw in iter_lines(stream, max_line_bytes=settings.EVAL_MAX_ITEM_BYTES):
            if raw is None or not raw.strip():
                if raw is None:
                    raise ApiError(f"Line {number} of file {file_id} is longer than "
                                   f"{settings.EVAL_MAX_ITEM_BYTES} bytes.", code="item_too_large",
                                   param="data_source.source.id")
                continue
            try:
                yield f"line {number}", parse_line(raw)
            except LineError as exc:
                raise ApiError(f"Line {number} of file {file_id}: {exc.message}", code=exc.code,
                               param="data_source.source.id") from None


def _store_items(blob: str, entries: Iterable, *, kind: str, item_schema: dict, where: str) -> int:
    """Write the checked entries to ``blob`` (through a local temporary file: bounded memory,
    no storage I/O in a transaction); the number of items."""
    count = 0
    settings.DATA_DIR.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", dir=settings.DATA_DIR,
                                     encoding="utf-8") as out:
        for index, entry in enumerate(entries):
            at, entry = entry if isinstance(entry, tuple) else (f"{where}[{index}]", entry)
            if count >= settings.EVAL_MAX_ITEMS:
                raise ApiError(f"A run has at most {settings.EVAL_MAX_ITEMS} items "
                               "(TUNEPLEX_EVAL_MAX_ITEMS).", code="too_many_items", param=where)
            try:
                line = specs.run_entry(entry, kind=kind, item_schema=item_schema, where=at)
            except ApiError as exc:
                if not at.startswith("line "):
                    raise
                raise ApiError(f"{at}: {exc.message}", code=exc.code, param=where) from None
            out.write(json.dumps(line, ensure_ascii=False) + "\n")
            count += 1
        if count == 0:
            raise ApiError("The run has no items.", code="empty_source", param=where)
        out.flush()
        upload_file(Path(out.name), blob)
    return count


def eval_run_cancel(*, organization: Organization, actor: Principal, run: EvalRun) -> EvalRun:
    """A queued run ends at once; a running one is canceled now, and its worker stops at its
    next write (which the row refuses): the items graded so far are kept and counted."""
    with transaction.atomic(durable=True):
        locked = EvalRun.objects.select_for_update().get(pk=run.pk, organization=organization)
        if locked.status in EvalRun.ACTIVE:
            locked.status = EvalRun.Status.CANCELED
            locked.cancel_requested = True
            locked.finished_at = timezone.now()
            summarize(locked)
            locked.save()
            audit_record(actor=actor, action="eval.run.cancel", obj=locked,
                         metadata={"eval": locked.eval_id})
    return locked


def eval_run_delete(*, organization: Organization, actor: Principal, run: EvalRun) -> None:
    with transaction.atomic(durable=True):
        locked = EvalRun.objects.select_for_update().get(pk=run.pk, organization=organization)
        blob = locked.items_blob
        audit_record(actor=actor, action="eval.run.delete", obj=locked,
                     metadata={"eval": locked.eval_id})
        locked.delete()
        transaction.on_commit(lambda: delete_blobs([blob]))


# --- deploy gates ----------------------------------------------------------------------------------

def comparison_check(eval: Eval, data_source, criterion=None, statistic=None, *, model: str,
                     where: str = "") -> tuple[dict, str, str]:
    """What runs the eval on models chosen later (a deploy gate's candidate and incumbent, a
    sweep's trials), checked now: a completions data source without its model (``model``
    stands in for the check), the testing criterion compared (the first by default) and its
    statistic. The source as stored, the criterion, the statistic; errors name ``where``'s
    fields."""
    if not isinstance(data_source, dict):
        raise ApiError("data_source must be an object.", code="invalid_type",
                       param=f"{where}data_source")
    if "model" in data_source:
        raise ApiError("This data source has no model: the models compared are chosen for each "
                       "run.", code="invalid_value", param=f"{where}data_source.model")
    source = specs.run_source({**data_source, "type": "completions", "model": model})
    if source.inline is not None:
        for index, entry in enumerate(source.inline):
            specs.run_entry(entry, kind="completions",
                            item_schema=eval.data_source_config["item_schema"],
                            where=f"{where}data_source.source.content[{index}]")
    names = [c["name"] for c in eval.testing_criteria]
    criterion = names[0] if criterion is None else criterion
    if criterion not in names:
        raise ApiError(f"criterion must name one of the eval's testing criteria: "
                       f"{', '.join(names)}.", code="invalid_value", param=f"{where}criterion")
    statistic = statistic or DeployGate.Statistic.PASS_RATE
    if statistic not in DeployGate.Statistic.values:
        raise ApiError("statistic must be pass_rate or mean_score.", code="invalid_value",
                       param=f"{where}statistic")
    stored = {k: v for k, v in source.stored.items() if k not in ("model", "type")}
    if source.inline is not None:
        stored["source"] = {"type": "file_content", "content": source.inline}
    return stored, criterion, statistic


def comparison_run(*, organization: Organization, eval: Eval, data_source: dict, model: str,
                   name: str, metadata: dict, undeployed_ok: bool) -> EvalRun:
    """A run of ``eval`` on ``model`` from a source :func:`comparison_check` stored: the
    platform's own (a gate's, a sweep's), not counted against the organization's active runs."""
    return eval_run_create(organization=organization, eval=eval, name=name, metadata=metadata,
                           actor=Principal(organization=organization, scopes=frozenset()),
                           data_source={**data_source, "type": "completions", "model": model},
                           undeployed_ok=undeployed_ok, system=True)


def deploy_gate_create(*, organization: Organization, actor: Principal, eval: Eval,
                       base_model: str, data_source, suffix=None, criterion=None,
                       statistic=None, margin=None, enabled=None) -> DeployGate:
    """A gate for a family of adapters (its base model, and its suffix when given). The data
    source is a completions run's without the model, checked as a run's would be."""
    if not isinstance(base_model, str):
        raise ApiError("base_model must be a base model's name.", code="invalid_type",
                       param="base_model")
    try:
        base = base_model_get(name=base_model)
    except NotFound:
        raise NotFound(f"No base model named {base_model!r}.", param="base_model") from None
    suffix = "" if suffix is None else suffix
    if not isinstance(suffix, str) or len(suffix) > 64:
        raise ApiError("suffix must be a string of at most 64 characters.", code="invalid_type",
                       param="suffix")
    stored, criterion, statistic = comparison_check(eval, data_source, criterion, statistic,
                                                    model=base.name)
    margin = 0.0 if margin is None else margin
    if isinstance(margin, bool) or not isinstance(margin, int | float) or not 0 <= margin <= 1e6:
        raise ApiError("margin must be a number of at least 0.", code="invalid_value", param="margin")
    gate = DeployGate(organization=organization, eval=eval, base_model=base, suffix=suffix,
                      data_source=stored, criterion=criterion, statistic=statistic,
                      margin=float(margin), enabled=True if enabled is None else bool(enabled))
    with transaction.atomic(durable=True):
        if DeployGate.objects.filter(organization=organization, base_model=base,
                                     suffix=suffix).exists():
            raise ApiError(f"The family {base.name}{' / ' + suffix if suffix else ''} has a deploy "
                           "gate already; delete it first.", code="gate_exists", param="suffix",
                           status=409)
        gate.save(force_insert=True)
        audit_record(actor=actor, action="deploy_gate.create", obj=gate,
                     metadata={"eval": eval.id, "base_model": base.name, "suffix": suffix})
    return gate


def deploy_gate_delete(*, organization: Organization, actor: Principal, gate: DeployGate) -> None:
    with transaction.atomic(durable=True):
        locked = DeployGate.objects.select_for_update().get(pk=gate.pk, organization=organization)
        audit_record(actor=actor, action="deploy_gate.delete", obj=locked,
                     metadata={"eval": locked.eval_id})
        locked.delete()
