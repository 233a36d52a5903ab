"""Every write a person makes to exports: request one, delete one.

Sending an export to its worker, the worker's own writes (claim, progress, the end) and the
sweep are in :mod:`tuneplex.exports.worker_writes`.
"""

from __future__ import annotations

from django.conf import settings
from django.db import IntegrityError, transaction

from jobs.export import formats
from tuneplex.adapters.models import Adapter
from tuneplex.adapters.services import adapter_request_merge
from tuneplex.audit.services import audit_record
from tuneplex.core.actors import Principal
from tuneplex.core.errors import ApiError, Conflict
from tuneplex.core.storage import delete_prefix
from tuneplex.core.storage_layout import export_prefix
from tuneplex.exports.models import Export
from tuneplex.exports.selectors import active_exports, export_live
from tuneplex.exports.worker_writes import export_send
from tuneplex.files.selectors import storage_quota_check
from tuneplex.tenancy.models import Organization

Merge = Adapter.MergeStatus


def export_kind(format_name, quantization) -> tuple[formats.Format, str]:
    """The format and the resolved quantization (the format's default when none is given), or a
    400 naming the field at fault: ``unsupported_format`` or ``unsupported_quantization``."""
    if quantization is not None and not isinstance(quantization, str):
        raise ApiError("quantization must be a string.", code="invalid_type", param="quantization")
    try:
        return formats.resolve(format_name, quantization)
    except ValueError as exc:
        field, allowed = exc.args
        raise ApiError(f"{field} {allowed}.", code=f"unsupported_{field}", param=field) from None


def export_create(*, organization: Organization, actor: Principal, adapter: Adapter,
                  format: str, quantization: str | None = None) -> tuple[Export, bool]:
    """The adapter's model in ``format`` (and ``quantization``): ``(export, created)``.

    An export of the same kind that is in flight or has succeeded is returned instead of a new
    one (``created`` False). A format of the merged model asks for the adapter's merge when
    there is none (it runs on a GPU worker under the scheduler) and waits queued until it ends.
    Refused with nothing stored when the format or quantization is wrong (400), the
    organization has TUNEPLEX_ORG_MAX_ACTIVE_EXPORTS in flight (429) or its storage is full
    (403)."""
    spec, resolved = export_kind(format, quantization)
    existing = export_live(adapter=adapter, format=spec.name, quantization=resolved)
    if existing is not None:
        return existing, False
    if active_exports(organization=organization) >= settings.ORG_MAX_ACTIVE_EXPORTS:
        raise ApiError(f"The organization has {settings.ORG_MAX_ACTIVE_EXPORTS} exports queued or "
                       "running (TUNEPLEX_ORG_MAX_ACTIVE_EXPORTS); wait for one to end.",
                       code="too_many_active_exports", status=429)
    storage_quota_check(organization, 0, what="an export", param=None)
    if spec.merged:
        _merge_requested(organization, actor, adapter)
    export = Export(organization=organization, adapter=adapter, format=spec.name,
                    quantization=resolved, needs_merge=spec.merged,
                    created_by=actor.user if actor.api_key is None else actor.api_key.created_by)
    try:
        with transaction.atomic(durable=True):
            export.save(force_insert=True)
            audit_record(actor=actor, action="export.create", obj=export, metadata={
                "adapter_id": adapter.id, "format": spec.name, "quantization": resolved})
            transaction.on_commit(lambda: export_send(export.id))
    except IntegrityError:  # the same kind, requested at the same moment: that one
        existing = export_live(adapter=adapter, format=spec.name, quantization=resolved)
        if existing is None:
            raise
        return existing, False
    return export, True


def _merge_requested(organization: Organization, actor: Principal, adapter: Adapter) -> None:
    """The adapter's merge is there, running or queued (asked for now if it was not)."""
    adapter.refresh_from_db(fields=["merge_status"])
    if adapter.merge_status in (Merge.QUEUED, Merge.RUNNING, Merge.SUCCEEDED):
        return
    try:
        adapter_request_merge(organization=organization, actor=actor, adapter=adapter)
    except Conflict:  # another request started it meanwhile
        pass


def export_delete(*, organization: Organization, actor: Principal, export: Export) -> None:
    """Delete the export and its artifact (the quota counts its bytes no more). One in flight
    is deleted too: its worker finds the row gone, stops and deletes what it stored."""
    with transaction.atomic(durable=True):
        locked = Export.objects.select_for_update().filter(pk=export.pk,
                                                           organization=organization).first()
        if locked is None:  # deleted meanwhile
            return
        audit_record(actor=actor, action="export.delete", obj=locked, metadata={
            "adapter_id": locked.adapter_id, "format": locked.format,
            "quantization": locked.quantization, "status": locked.status,
            "bytes": locked.bytes})
        prefix = export_prefix(organization.id, locked.id)
        locked.delete()
        transaction.on_commit(lambda: delete_prefix(prefix))
